"""`fastgrpo grpo --config run.yaml`: train from a YAML spec (see fastgrpo/run.py for the keys)."""

import argparse
import sys

from fastgrpo.cliutil import add_flag


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "grpo", help="GRPO training from a YAML file (model, data or task, rewards, GRPOConfig fields)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--config", required=True, help="YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override spec keys, e.g. max_steps=10 learning_rate=1e-5 (values parsed as YAML)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from fastgrpo.config import ConfigError
    from fastgrpo.run import SpecError, load_spec, print_summary, train

    try:
        spec = load_spec(args.config)
        for item in args.overrides:
            if "=" not in item:
                raise SpecError(f"override {item!r} must look like key=value")
            key, value = item.split("=", 1)
            spec[key] = yaml.safe_load(value)
        summary = train(spec)
    except (SpecError, ConfigError) as exc:
        print(f"fastgrpo grpo: error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0
