"""``mhc-bench``: benchmarks of this package, one subcommand each (``mhc-bench kernels --help``,
``mhc-bench memory --help``, ``mhc-bench exchange --help``, ``mhc-bench pipeline --help``, ``mhc-bench step --help``)."""

from __future__ import annotations

import argparse

from mhc_megatron.bench import exchange, kernels, memory, pipeline, step

SUBCOMMANDS = {"kernels": kernels, "memory": memory, "exchange": exchange, "pipeline": pipeline,
               "step": step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mhc-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    main()
