"""The main job's commands on a tiny model: `fastgrpo demo` (starts its own server) and `fastgrpo grpo --config`."""

import json
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_trains_in_server_mode_and_leaves_metrics_plot_and_model(tiny_qwen2, tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fastgrpo.cli", "demo", "--model", tiny_qwen2, "--max-steps", "2",
         "--output-dir", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "devices: server on vLLM's CPU build, trainer on the CPU" in result.stdout  # no GPU here
    assert re.search(r"trained 2 steps in [\d.]+ s", result.stdout)
    assert re.search(r"mean reward, first 5 steps: [\d.]+ +last 5 steps: [\d.]+", result.stdout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("rewards/number_match_reward/mean" in r and "completions/mean_length" in r for r in steps)
    assert (out / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    assert "weight_transfer_backend" not in result.stdout  # the server's log went to its file
    assert (out / "server.log").exists()


def test_reward_weights_reach_the_config_from_the_task_or_the_spec(tmp_path):
    from fastgrpo.run import DEMO_SPEC, rewards_and_config

    funcs, config = rewards_and_config(dict(DEMO_SPEC, output_dir=str(tmp_path)))
    assert [f.__name__ for f in funcs] == ["number_match_reward", "format_reward"]
    assert config.reward_weights == [1.0, 0.2]  # the arithmetic task's weights
    _, config = rewards_and_config(dict(DEMO_SPEC, output_dir=str(tmp_path), reward_weights=[0.5, 2.0]))
    assert config.reward_weights == [0.5, 2.0]  # a spec's own weights win


def test_grpo_config_errors_fail_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: default\ntask: {name: arithmetic}\nnum_generations: 3\nper_device_train_batch_size: 4\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", "grpo", "--config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "not divisible by num_generations=3" in result.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: default\ntask: {name: arithmetic}\nlearning_rat: 1e-5\n")
    result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", "grpo", "--config", str(typo)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown keys ['learning_rat']" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_grpo_from_yaml_with_transformers_generation(tiny_llama, tmp_path):
    spec = tmp_path / "run.yaml"
    spec.write_text(f"""
model: {tiny_llama}
task: {{name: arithmetic, num_examples: 64}}
rewards: [number_match_reward, format_reward]
reward_weights: [1.0, 0.5]
output_dir: {tmp_path / 'out'}
max_steps: 1
per_device_train_batch_size: 8
num_generations: 4
max_completion_length: 8
use_cpu: true
report_to: []
save_strategy: "no"
lr_scheduler_type: constant
logging_steps: 1
""")
    result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", "grpo", "--config", str(spec),
                             "--learning_rate", "1e-4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["learning_rate"] == pytest.approx(1e-4)  # the command-line override won
    assert "rewards/format_reward/mean" in rows[0]


def test_cli_version_and_help():
    from fastgrpo import __version__

    for args, expected in ((["--version"], f"fastgrpo {__version__}"), (["--help"], "vllm-serve")):
        result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", *args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and expected in result.stdout
    listed = subprocess.run([sys.executable, "-m", "fastgrpo.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("demo", "vllm-serve", "grpo", "tp-dp"):
        assert command in listed


def test_a_multi_turn_task_runs_from_a_spec_and_logs_its_turns(tiny_llama, tmp_path):
    """The feedback task (an environment: the model answers again when wrong) through `fastgrpo grpo`."""
    spec = tmp_path / "run.yaml"
    spec.write_text(f"""
model: {tiny_llama}
task: {{name: feedback, num_examples: 16}}
output_dir: {tmp_path / 'out'}
max_steps: 1
per_device_train_batch_size: 8
num_generations: 4
max_completion_length: 160
generation_kwargs: {{stop_token_ids: [{", ".join(str(t) for t in range(100, 140))}]}}
use_cpu: true
bf16: false
report_to: []
save_strategy: "no"
""")
    result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", "grpo", "--config", str(spec)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "reward" in json.loads(line)]
    assert "rewards/env_reward/mean" in row and row["multi_turn/turns_max"] > 1
