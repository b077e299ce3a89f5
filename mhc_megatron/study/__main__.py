"""``python -m mhc_megatron.study``: the ``mhc-study`` command."""

from mhc_megatron.study.cli import main

if __name__ == "__main__":
    main()
