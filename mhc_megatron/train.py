"""``python -m mhc_megatron.train``: the ``mhc-train`` command, ``mhc_megatron.training.cli``."""

from mhc_megatron.training.cli import main

if __name__ == "__main__":
    main()
