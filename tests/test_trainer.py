"""GRPO training end to end: a tiny model really trains, with each generation backend.

Server mode starts the real `fastgrpo vllm-serve` (vLLM CPU build) as a subprocess;
colocate mode an in-process vLLM engine. After every optimizer step the
generator's weights must equal the trainer's: checked by scoring a fixed probe
with both (server: prompt logprobs over HTTP; transformers: a forward pass).
"""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.config import ConfigError
from fastgrpo.transfer import Weights

# Server and trainer both compute in float32 here; differences are kernel rounding.
PROBE_TOL = 2e-3


def reward_digits(completions, **kwargs):
    """Reward completions by how many digits they hold: easy for a random model to move."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def reward_length(completions, completion_ids, **kwargs):
    return [len(ids) / 16 for ids in completion_ids]


def tiny_dataset(n: int = 16, conversational: bool = True) -> Dataset:
    questions = [f"What is {a} + {a + 3}?" for a in range(n)]
    if conversational:
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions],
                                  "solution": [str(2 * a + 3) for a in range(n)]})
    return Dataset.from_dict({"prompt": questions, "solution": [str(2 * a + 3) for a in range(n)]})


def base_config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                    num_generations=4, max_completion_length=16, max_prompt_length=64, learning_rate=5e-3,
                    max_steps=3, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                    dataloader_num_workers=0, disable_tqdm=True, temperature=1.0)
    settings.update(overrides)
    return GRPOConfig(**settings)


class ProbeCallback(TrainerCallback):
    """After each optimizer step, compare the generator's view of a probe with the trainer's."""

    def __init__(self, trainer, probe_ids, generator_logprobs):
        self.trainer, self.probe_ids, self.generator_logprobs = trainer, probe_ids, generator_logprobs
        self.gaps, self.changes, self.previous = [], [], None

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([self.probe_ids])).logits[0].float(), -1)
        ours = [logp[i, self.probe_ids[i + 1]].item() for i in range(len(self.probe_ids) - 1)]
        theirs = self.generator_logprobs(self.probe_ids)
        self.gaps.append(max(abs(a - b) for a, b in zip(ours, theirs)))
        if self.previous is not None:
            self.changes.append(max(abs(a - b) for a, b in zip(ours, self.previous)))
        self.previous = ours


def test_config_rejects_bad_combinations_with_a_fix(tmp_path):
    with pytest.raises(ConfigError, match="not divisible by num_generations=3"):
        base_config(tmp_path, num_generations=3)
    with pytest.raises(ConfigError, match="at least 2"):
        base_config(tmp_path, num_generations=1, per_device_train_batch_size=1)
    with pytest.raises(ConfigError, match="loss_type"):
        base_config(tmp_path, loss_type="ppo")
    with pytest.raises(ConfigError, match="scale_rewards"):
        base_config(tmp_path, scale_rewards="median")
    with pytest.raises(ConfigError, match="vllm_mode"):
        base_config(tmp_path, vllm_mode="remote")
    with pytest.raises(ConfigError, match="vllm_weight_sync_bucket_mb"):
        base_config(tmp_path, vllm_weight_sync_bucket_mb=0.001)
    assert base_config(tmp_path, vllm_weight_sync_bucket_mb=0.046875).weight_sync_bucket_bytes == 48 << 10
    config = base_config(tmp_path, gradient_accumulation_steps=2)
    assert (config.steps_per_generation, config.generation_batch_size) == (2, 8)


@pytest.mark.slow
def test_server_mode_trains_and_keeps_server_weights_equal(transient_server_factory, tiny_qwen2, tmp_path):
    from fastgrpo.client import VLLMClient

    server = transient_server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256"])
    port = int(server.base_url.rsplit(":", 1)[1])
    # 48 KiB buckets: every decoder layer of the tiny model spans about a dozen of them.
    config = base_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_port=port,
                         vllm_server_host="127.0.0.1", vllm_weight_sync_bucket_mb=0.046875)
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset())
    probe = AutoTokenizer.from_pretrained(tiny_qwen2)("What is 12 + 35? The answer is 47.")["input_ids"]
    observer = VLLMClient(base_url=server.base_url)

    def server_logprobs(ids):
        return observer.generate(prompt_token_ids=[ids], max_tokens=1, prompt_logprobs=True).results[0].prompt_logprobs[1:]

    # Step 2's first push breaks half-way, as a trainer's data stream would: the server is left inconsistent,
    # the trainer pushes again by itself, and the probe after step 2 must see exactly the trainer's weights.
    pushes, real_sync = [], trainer.backend.sync_weights

    def breaks_once(weights, version):
        pushes.append(version)
        if pushes == [0, 1, 2]:
            weights = HalfWay(weights, fail_after=5)
        return real_sync(weights, version)

    trainer.backend.sync_weights = breaks_once
    probe_cb = ProbeCallback(trainer, probe, server_logprobs)
    trainer.add_callback(probe_cb)  # after the weight-sync callback: sees the pushed weights
    result = trainer.train()
    trainer.close()
    assert trainer.state.global_step == 3
    assert pushes == [0, 1, 2, 2, 3]  # step 2 pushed twice
    assert len(probe_cb.gaps) == 3 and max(probe_cb.gaps) < PROBE_TOL, probe_cb.gaps
    assert min(probe_cb.changes) > 1e-4  # the model really moved each step
    assert observer.health()["weight_version"] == 3
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 3
    assert max(h["frac_reward_zero_std"] for h in logs) < 1  # groups hold different completions
    for key in ["reward", "reward_std", "rewards/reward_digits/mean", "rewards/reward_length/mean",
                "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std", "entropy",
                "clip_ratio/region_mean", "time/generate", "time/weight_sync", "time/train",
                "generate/tokens_per_second", "num_tokens"]:
        assert key in logs[-1], key
    assert result.training_loss == result.training_loss  # not NaN
    observer.close()


class HalfWay(Weights):
    """Another `Weights`' names and tensors, breaking after `fail_after` tensors."""

    def __init__(self, weights, fail_after: int):
        self.inner, self.fail_after = weights, fail_after
        self.names, self.shapes, self.dtypes, self.device = weights.names, weights.shapes, weights.dtypes, weights.device

    def __iter__(self):
        for i, tensor in enumerate(self.inner):
            if i == self.fail_after:
                raise RuntimeError("the trainer's data stream broke half-way through the push")
            yield tensor


@pytest.mark.slow
def test_colocate_mode_trains_and_keeps_engine_weights_equal(tiny_qwen2, tmp_path):
    config = base_config(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_max_model_len=256,
                         model_init_kwargs={"dtype": torch.float32}, vllm_weight_sync_bucket_mb=0.046875)
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset())
    probe = AutoTokenizer.from_pretrained(tiny_qwen2)("What is 12 + 35? The answer is 47.")["input_ids"]

    def engine_logprobs(ids):
        from vllm import SamplingParams

        out = trainer.backend.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                           use_tqdm=False)[0]
        return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]

    probe_cb = ProbeCallback(trainer, probe, engine_logprobs)
    trainer.add_callback(probe_cb)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.state.global_step == 3
    # The colocated engine runs vLLM's default dtype on CPU (bfloat16): a looser tolerance.
    assert max(probe_cb.gaps) < 0.1, probe_cb.gaps
    assert min(probe_cb.changes) > 1e-4
    assert max(h["frac_reward_zero_std"] for h in trainer.state.log_history if "reward" in h) < 1


@pytest.mark.slow
def test_transformers_generation_trains(tiny_llama, tmp_path):
    config = base_config(tmp_path, use_vllm=False, max_steps=2, loss_type="grpo", beta=0.04)
    trainer = GRPOTrainer(tiny_llama, reward_digits, args=config, train_dataset=tiny_dataset(conversational=False))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.state.global_step == 2
    moved = max((trainer.model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 0
    assert "kl" in [h for h in trainer.state.log_history if "reward" in h][-1]


@pytest.mark.slow
def test_checkpoint_resume_matches_uninterrupted_run(transient_server_factory, tiny_qwen2, tmp_path):
    server = transient_server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256"])
    port = int(server.base_url.rsplit(":", 1)[1])

    def run(out, max_steps, resume=False):
        config = base_config(tmp_path, output_dir=str(out), use_vllm=True, vllm_server_port=port,
                             vllm_server_host="127.0.0.1", max_steps=4, save_strategy="steps", save_steps=2)
        trainer = GRPOTrainer(tiny_qwen2, reward_digits, args=config, train_dataset=tiny_dataset())
        if not resume and max_steps < 4:
            trainer.add_callback(StopAt(max_steps))
        trainer.train(resume_from_checkpoint=resume or None)
        trainer.close()
        return {h["step"]: h for h in trainer.state.log_history if "reward" in h}

    full = run(tmp_path / "full", 4)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4, resume=True)
    for step in (3, 4):
        assert resumed[step]["reward"] == pytest.approx(full[step]["reward"], abs=1e-6)
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-3, abs=1e-5)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


@pytest.mark.slow
def test_accelerate_launch_two_processes_with_server(transient_server_factory, tiny_qwen2, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    server = transient_server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256"])
    port = server.base_url.rsplit(":", 1)[1]
    script = Path(__file__).parent / "scripts" / "train_two_processes.py"
    # torchrun-style launch; the config's use_cpu=True makes accelerate use gloo between the processes.
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script), tiny_qwen2, port, str(tmp_path)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert summary["generation_batch_size"] == 8  # 4 per process x 2 processes
    assert len(summary["logs"]) == 2
    from fastgrpo.client import VLLMClient

    with VLLMClient(base_url=server.base_url) as c:
        assert c.health()["weight_version"] == 2
