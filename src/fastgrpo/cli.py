"""The `fastgrpo` command.

Each subcommand lives in its own module exposing `add_parser(subparsers)`, which
registers the parser and sets `func` (called with the parsed args, returns an
exit code). Modules are imported lazily by name so that `fastgrpo --help` does
not pay for importing vLLM or torch. A subcommand that sets `takes_argv` parses
its own arguments: it gets them, as given, in `args.argv`.
"""

import argparse
import importlib
import sys

from fastgrpo import __version__

# subcommand name -> module that defines it. Only commands that work are listed.
SUBCOMMANDS = {
    "demo": "fastgrpo.demo",
    "vllm-serve": "fastgrpo.serve.cli",
    "grpo": "fastgrpo.train_cli",
    "tp-dp": "fastgrpo.planner.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgrpo",
        description="GRPO training with generation on a vLLM server.",
    )
    parser.add_argument("--version", action="version", version=f"fastgrpo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "takes_argv", False):
        args.argv = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
