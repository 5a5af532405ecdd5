"""`fastgrpo grpo`: GRPO training configured as TRL's scripts are (transformers' HfArgumentParser):

    fastgrpo grpo --config run.yaml --learning_rate 1e-5 --max_steps 10

Every GRPOConfig field is a flag and a YAML key; a flag overrides the file, the file the defaults. The run's own
keys (see fastgrpo/run.py) are flags too: --model, --task, --dataset, --rewards, --start_server, --peft, --tools,
--environment. Mappings take JSON or YAML flow style: --task '{name: feedback, num_examples: 16}'. An `env:`
mapping in the file sets environment variables first, as TRL's does. The old `key=value` overrides are gone:
write `--key value`.
"""

import argparse
import json
import os
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    # The flags come from GRPOConfig, so they are parsed in `run` (cli.main hands the arguments over as they
    # are): `fastgrpo --help` then does not import transformers, and `fastgrpo grpo --help` lists them all.
    parser = subparsers.add_parser(
        "grpo", add_help=False, help="GRPO training from a YAML file and/or flags (TRL's syntax: --config run.yaml "
                                     "--learning_rate 1e-5); every GRPOConfig field is a flag")
    parser.set_defaults(func=run, takes_argv=True)


def mapping(text: str) -> dict:
    """A flag's dict value: JSON as TRL reads it (numbers stay numbers), else YAML flow style."""
    import yaml

    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mapping: give JSON or YAML, e.g. '{{name: arithmetic}}'")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser():
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    from fastgrpo.config import GRPOConfig
    from fastgrpo.run import DEFAULT_OUTPUT_DIR, RunArguments

    parser = HfArgumentParser((RunArguments, GRPOConfig), prog="fastgrpo grpo", description=__doc__,
                              usage="%(prog)s [--config RUN.YAML] [--FIELD VALUE ...]", formatter_class=_HelpFormatter)
    parser.add_argument("--config", help="YAML file of defaults: any flag's name as a key, and `env:`")
    for action in list(parser._actions):
        if action.type is dict:  # HfArgumentParser would call dict() on the text
            action.type = mapping
        # TRL's own defaults give some flags a --no_ form (--no_gradient_checkpointing): every bool has one here.
        elif action.type is string_to_bool and f"--no_{action.dest}" not in parser._option_string_actions:
            parser.add_argument(f"--no_{action.dest}", f"--no-{action.dest.replace('_', '-')}", action="store_false",
                                dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(output_dir=DEFAULT_OUTPUT_DIR)
    return parser


def load_yaml(path: str) -> dict:
    import yaml

    from fastgrpo.run import SpecError

    if not Path(path).exists():
        raise SpecError(f"config file {path} does not exist")
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise SpecError(f"{path} must hold a mapping of keys to values")
    return values


def parse(argv: list[str]):
    """(the spec's RunArguments keys as a dict, GRPOConfig): TRL's TrlParser.parse_args_and_config, for our keys."""
    from fastgrpo.run import SpecError, unknown_keys

    parser = build_parser()
    if not argv:
        parser.error("give --config RUN.YAML and/or flags (`fastgrpo grpo --help` lists them)")
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument("--config")
    path = config_flag.parse_known_args(argv)[0].config
    values = load_yaml(path) if path else {}
    env = values.pop("env", None) or {}
    if not isinstance(env, dict):
        raise SpecError(f"{path}: `env` must be a mapping of variable names to values")
    unknown = set(values) - {action.dest for action in parser._actions}
    if unknown:
        raise unknown_keys(unknown)
    os.environ.update({key: str(value) for key, value in env.items()})
    parser.set_defaults(**values)  # YAML text goes through each flag's type, as a typed flag's would
    namespace, rest = parser.parse_known_args(argv)
    for item in rest:
        key, equals, value = item.partition("=")
        if equals and key.isidentifier():
            raise SpecError(f"{item!r}: `key=value` overrides were replaced by flags; write --{key} {value}")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        run_args, config = parser.parse_dict(vars(namespace), allow_extra_keys=True)  # extra: --config
    except ValueError as exc:  # TrainingArguments' own checks, e.g. an unknown lr_scheduler_type in the file
        raise SpecError(str(exc)) from None
    return {key: value for key, value in vars(run_args).items() if value is not None}, config


def run(args: argparse.Namespace) -> int:
    from fastgrpo.config import ConfigError
    from fastgrpo.run import SpecError, print_summary, train

    try:
        spec, config = parse(args.argv)
        summary = train(spec, config=config)
    except (SpecError, ConfigError) as exc:
        print(f"fastgrpo grpo: error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0
