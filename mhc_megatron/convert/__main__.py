"""``python -m mhc_megatron.convert``: the ``mhc-convert`` command."""

from mhc_megatron.convert.cli import main

if __name__ == "__main__":
    main()
