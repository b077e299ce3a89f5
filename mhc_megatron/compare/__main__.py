"""``python -m mhc_megatron.compare``: the ``mhc-compare`` command."""

from mhc_megatron.compare.cli import main

main()
