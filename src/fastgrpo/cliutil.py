"""Small argparse helpers shared by the subcommands."""

import argparse


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> argparse.Action:
    """Add `--some_flag` that also answers to `--some-flag` (TRL and vLLM users type both)."""
    assert name.startswith("--"), name
    snake = "--" + name[2:].replace("-", "_")
    dash = "--" + name[2:].replace("_", "-")
    names = [snake] if snake == dash else [snake, dash]
    kwargs.setdefault("dest", snake[2:])
    if kwargs.get("action") not in ("store_true", "store_false", "count", argparse.BooleanOptionalAction):
        kwargs.setdefault("metavar", snake[2:].upper().split("_")[-1])
    return parser.add_argument(*names, **kwargs)
