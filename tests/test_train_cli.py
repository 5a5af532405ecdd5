"""`fastgrpo grpo`'s arguments: a YAML file and flags read as TRL's TrlParser reads them (no training here)."""

import json
import os
import warnings

import pytest

from fastgrpo.cli import main
from fastgrpo.run import SpecError, rewards_and_config
from fastgrpo.train_cli import build_parser, mapping, parse


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_flags_override_the_file_and_the_file_the_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTGRPO_TEST_VAR", raising=False)
    path = write(tmp_path, "model: default\ntask: {name: arithmetic, num_examples: 64}\nlearning_rate: 1e-5\n"
                           "max_steps: 5\nreport_to: []\ngeneration_kwargs: {stop_token_ids: [1, 2]}\nuse_cpu: true\n"
                           "env: {FASTGRPO_TEST_VAR: 7}\n")
    spec, config = parse(["--config", path, "--max_steps", "9", "--rewards", "format_reward", "number_match_reward",
                          "--peft", "{r: 8, lora_alpha: 16}", "--chat_template_kwargs", '{"enable_thinking": false}'])
    assert spec == {"model": "default", "task": {"name": "arithmetic", "num_examples": 64},
                    "rewards": ["format_reward", "number_match_reward"], "peft": {"r": 8, "lora_alpha": 16}}
    assert config.learning_rate == 1e-5  # YAML reads 1e-5 as text: the flag's type makes it a number
    assert config.max_steps == 9 and config.report_to == [] and config.use_cpu is True
    assert config.generation_kwargs == {"stop_token_ids": [1, 2]}
    assert config.chat_template_kwargs == {"enable_thinking": False}
    assert config.output_dir == "outputs/grpo"  # ours when neither sets it
    assert os.environ["FASTGRPO_TEST_VAR"] == "7"  # the file's env: mapping, as TRL's


def test_flags_alone_make_a_run_and_a_task_brings_its_reward_weights():
    spec, config = parse(["--task", "{name: arithmetic}", "--use_cpu", "--output_dir", "out"])
    funcs, config = rewards_and_config(spec, config)
    assert [f.__name__ for f in funcs] == ["number_match_reward", "format_reward"]
    assert config.reward_weights == [1.0, 0.2] and config.output_dir == "out"
    spec, config = parse(["--task", "{name: arithmetic}", "--use_cpu", "--reward_weights", "0.5", "2"])
    assert rewards_and_config(spec, config)[1].reward_weights == [0.5, 2.0]  # the run's own weights win


def test_the_old_key_value_form_fails_naming_the_new_one(tmp_path):
    path = write(tmp_path, "task: {name: arithmetic}\n")
    with pytest.raises(SpecError, match=r"'learning_rate=1e-4': `key=value` overrides were replaced by flags; "
                                        r"write --learning_rate 1e-4"):
        parse(["--config", path, "learning_rate=1e-4"])


def test_file_errors_name_the_key_or_the_file(tmp_path):
    with pytest.raises(SpecError, match=r"unknown keys \['learning_rat'\]"):
        parse(["--config", write(tmp_path, "learning_rat: 1e-5\n")])
    with pytest.raises(SpecError, match="does not exist"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SpecError, match="not a valid SchedulerType"):  # TrainingArguments' own check, no traceback
        parse(["--config", write(tmp_path, "lr_scheduler_type: nope\n")])


def test_flag_errors_exit_2_with_the_usage(capsys):
    for argv in (["--max_steps", "x"], ["--task", "arithmetic"], ["--bogus", "1"], []):
        with pytest.raises(SystemExit) as exited:
            parse(argv)
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastgrpo grpo [--config RUN.YAML] [--FIELD VALUE ...]" in err
    assert "invalid int value: 'x'" in err and "'arithmetic' is not a mapping" in err
    assert "unrecognized arguments: --bogus 1" in err and "give --config RUN.YAML and/or flags" in err


def test_help_lists_the_run_keys_and_every_config_field(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    for flag in ("--config", "--task", "--rewards", "--learning_rate", "--vllm_mode", "--num_generations"):
        assert flag in out
    assert "fastgrpo grpo --config run.yaml --learning_rate 1e-5" in out


def test_mapping_reads_json_as_trl_does_and_yaml_flow_style():
    assert mapping('{"lr": 1e-5}') == {"lr": 1e-5}  # JSON numbers stay numbers (YAML 1.1 would read a string)
    assert mapping("{name: feedback, num_examples: 16}") == {"name": "feedback", "num_examples": 16}


# --- the same flags as TRL's, read the same way -----------------------------------------------

def trl_parser():
    trl = pytest.importorskip("trl")  # a test dependency; fastgrpo never imports it

    return trl.TrlParser(trl.GRPOConfig)


def sample(action) -> list[str] | None:
    """Text for a flag of TRL's parser (None: TRL itself cannot read its type from text)."""
    kind = getattr(action.type, "__name__", None)
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[-1])]
    text = {"str": "x", "int": "3", "float": "0.25", "string_to_bool": "false", "DebugOption": "underflow_overflow"}
    if kind not in text:
        return None
    return [text[kind]] * (2 if action.nargs == "+" else 1)


def test_every_trl_flag_is_ours_and_reads_the_same_value():
    ours, theirs = build_parser(), trl_parser()
    compared = 0
    for action in theirs._actions:
        values = sample(action)
        if not action.option_strings or action.dest == "help" or values is None:
            continue
        for option in action.option_strings:
            assert option in ours._option_string_actions, f"TRL's {option} is not a flag of `fastgrpo grpo`"
        ours_action = ours._option_string_actions[action.option_strings[0]]
        if ours_action.type is mapping:  # TRL reads the JSON text in __post_init__: compare after that
            values = ['{"a": 1}']
        got = getattr(ours.parse_known_args([action.option_strings[0], *values])[0], action.dest)
        want = getattr(theirs.parse_known_args([action.option_strings[0], *values])[0], action.dest)
        assert got == (json.loads(want) if ours_action.type is mapping else want), action.option_strings
        compared += 1
    assert compared > 150


def test_a_file_reads_as_trls_does(tmp_path):
    path = write(tmp_path, f"output_dir: {tmp_path / 'out'}\nlearning_rate: 3e-6\nmax_steps: 4\nbf16: false\n"
                           "use_cpu: true\nreport_to: [tensorboard]\nlr_scheduler_type: constant\nbeta: 0.04\n"
                           "generation_kwargs: {min_tokens: 2}\nnum_generations: 4\ngradient_checkpointing: false\n")
    argv = ["--config", path, "--max_steps", "6", "--temperature", "0.7", "--no_gradient_checkpointing"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (theirs,) = trl_parser().parse_args_and_config(argv)
        _, ours = parse(argv)
    for name in ("output_dir", "learning_rate", "max_steps", "bf16", "use_cpu", "report_to", "lr_scheduler_type",
                 "beta", "generation_kwargs", "num_generations", "gradient_checkpointing", "temperature"):
        assert getattr(ours, name) == getattr(theirs, name), name
