"""GRPO training end to end: a tiny model really trains, with each generation backend.

Server mode starts the real `fastgrpo vllm-serve` (vLLM CPU build) as a subprocess;
colocate mode an in-process vLLM engine. After every optimizer step the
generator's weights must equal the trainer's: checked by scoring a fixed probe
with both (server: prompt logprobs over HTTP; transformers: a forward pass).
"""

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.config import ConfigError
from fastgrpo.trainer.generation import Sampling, ServerBackend, prompt_seeds
from fastgrpo.transfer import Weights

# Server and trainer both compute in float32 here (bf16=False: on a CPU with a bf16 unit GRPOConfig's default
# would train in bf16 autocast, whose logprobs differ from float32 by a few 1e-3); differences are kernel rounding.
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
                    bf16=False, dataloader_num_workers=0, disable_tqdm=True, temperature=1.0)
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
    with pytest.raises(ConfigError, match="needs use_vllm=True and vllm_mode='colocate'"):
        base_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_enable_sleep_mode=True)
    with pytest.raises(ConfigError, match="needs a GPU"):  # base_config trains on the CPU
        base_config(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True)
    assert base_config(tmp_path, vllm_weight_sync_bucket_mb=0.046875).weight_sync_bucket_bytes == 48 << 10
    config = base_config(tmp_path, gradient_accumulation_steps=2)
    assert (config.steps_per_generation, config.generation_batch_size) == (2, 8)
    with pytest.raises(ConfigError, match="whole optimizer steps"):
        base_config(tmp_path, gradient_accumulation_steps=2, steps_per_generation=3)
    with pytest.raises(ConfigError, match="multiple of gradient_accumulation_steps"):
        base_config(tmp_path, gradient_accumulation_steps=4, steps_per_generation=2, loss_type="dapo")
    assert base_config(tmp_path, gradient_accumulation_steps=4, steps_per_generation=2, loss_type="grpo")


def test_trl_options_work_with_trl_names_or_fail_naming_the_alternative(tmp_path):
    import warnings

    from fastgrpo.config import UNSUPPORTED_TRL_FIELDS

    for name, (default, _) in UNSUPPORTED_TRL_FIELDS.items():
        other = {bool: not default, float: 0.123, int: 7, str: "other", type(None): "set"}[type(default)]
        with pytest.raises(ConfigError, match=f"{name}=.*not supported by fastgrpo"):
            base_config(tmp_path, **{name: other})
        assert getattr(base_config(tmp_path, **{name: default}), name) == default  # TRL's default constructs
    # With vLLM the server's sampling fields (without it, transformers' GenerationConfig's: test_trl_parity.py).
    with pytest.raises(ConfigError, match=r"generation_kwargs\['temperature'\].*GRPOConfig.temperature"):
        base_config(tmp_path, use_vllm=True, generation_kwargs={"temperature": 0.7})
    with pytest.raises(ConfigError, match=r"generation_kwargs\['max_tokens'\].*max_completion_length"):
        base_config(tmp_path, use_vllm=True, generation_kwargs={"max_tokens": 7})
    with pytest.raises(ConfigError, match="supported keys are"):
        base_config(tmp_path, use_vllm=True, generation_kwargs={"best_of": 2})
    with pytest.raises(ConfigError, match="importance_sampling_level"):
        base_config(tmp_path, importance_sampling_level="group")
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode"):
        base_config(tmp_path, vllm_importance_sampling_mode="token_clip")
    with pytest.raises(ConfigError, match="clamps the ratio"):
        base_config(tmp_path, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None)
    with pytest.raises(ConfigError, match=r"must exceed 1 \+ epsilon_high"):
        base_config(tmp_path, delta=1.1)
    with pytest.raises(ConfigError, match="top_entropy_quantile"):
        base_config(tmp_path, top_entropy_quantile=1.5)
    with pytest.raises(ConfigError, match="differ: set one"):
        base_config(tmp_path, vllm_max_model_len=256, vllm_max_model_length=512)
    with pytest.raises(ConfigError, match="whole groups of 4"):
        base_config(tmp_path, eval_strategy="steps", per_device_eval_batch_size=6)
    assert base_config(tmp_path, vllm_max_model_len=256).vllm_max_model_length == 256  # our old spelling
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert base_config(tmp_path, vllm_importance_sampling_cap=2.5).vllm_importance_sampling_clip_max == 2.5
    assert any("vllm_importance_sampling_clip_max" in str(w.message) for w in caught)
    config = base_config(tmp_path)  # TRL's defaults
    assert (config.vllm_importance_sampling_mode, config.vllm_importance_sampling_clip_max) == ("sequence_mask", 3.0)
    assert (config.importance_sampling_level, config.shuffle_dataset, config.top_entropy_quantile) == ("token", True, 1.0)


@pytest.fixture(scope="module")
def server(server_factory, tiny_qwen2):
    """One server for the module: each trainer pushes its own weights when it starts."""
    return server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256"])


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


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


def test_log_completions_logs_a_table_to_wandb(tiny_llama, tmp_path, monkeypatch):
    """report_to=["wandb"] (offline: the same files a run uploads): each log writes a "completions" table with
    TRL's columns, one row per completion of the step."""
    import glob

    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = base_config(tmp_path, use_vllm=False, max_steps=1, log_completions=True, num_completions_to_print=1,
                         report_to=["wandb"])
    trainer = GRPOTrainer(tiny_llama, [reward_digits, reward_length], args=config,
                          train_dataset=tiny_dataset(conversational=False))
    trainer.train()
    run_dir = wandb.run.dir
    wandb.finish()
    tables = glob.glob(f"{run_dir}/media/table/completions_*.table.json")
    assert len(tables) == 1
    table = json.loads(open(tables[0]).read())
    assert table["columns"] == ["step", "prompt", "completion", "reward_digits", "reward_length", "advantage"]
    assert len(table["data"]) == config.generation_batch_size
    for step, prompt, completion, digits, length, advantage in table["data"]:
        assert step == 0 and prompt.startswith("What is")
        assert digits == pytest.approx(reward_digits([completion])[0], rel=1e-6)  # a float32 of the reward


def test_disable_dropout_makes_training_forwards_deterministic(tiny_llama, tmp_path):
    """The tiny model with attention dropout 0.5: two forwards in training mode differ, unless dropout is off
    (Llama applies it inside attention from a float attribute, not an nn.Dropout module)."""
    def two_forwards(disable: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attention_dropout=0.5,
                                                     attn_implementation="eager")
        config = base_config(tmp_path, use_vllm=False, disable_dropout=disable)
        trainer = GRPOTrainer(model, reward_digits, args=config, train_dataset=tiny_dataset())
        trainer.model.train()
        ids = torch.tensor([[5, 9, 14, 21, 30, 42, 7, 3]])
        return [trainer.model(input_ids=ids).logits for _ in range(2)]

    a, b = two_forwards(disable=False)
    assert not torch.allclose(a, b)
    a, b = two_forwards(disable=True)
    assert torch.equal(a, b)


def test_chat_template_kwargs_reach_the_template_and_shuffle_dataset_keeps_the_order(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if mood is defined %} mood {{ mood }}{% endif %}")
    config = base_config(tmp_path, use_vllm=False, chat_template_kwargs={"mood": "zebra"}, shuffle_dataset=False)
    trainer = GRPOTrainer(tiny_llama, reward_digits, args=config, train_dataset=tiny_dataset(),
                          processing_class=tokenizer)
    ids = trainer.rounds.prompt_ids([[{"role": "user", "content": "hello"}]])[0]
    assert tokenizer.decode(ids).endswith("hello mood zebra")
    order = list(trainer._get_train_sampler(trainer.train_dataset))
    assert order[:8] == [0] * 4 + [1] * 4  # prompts in dataset order, each num_generations times


# Servers: the tests below share one (the module's `server`), which stops after the last of them.


@pytest.mark.slow
def test_server_mode_trains_and_keeps_server_weights_equal(server, tiny_qwen2, tmp_path):
    from fastgrpo.client import VLLMClient

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


# ---------------------------------------------------------------------------------------------------------
# Batch layouts. The trainer's mathematics does not depend on the layout: gradient accumulation, rounds
# that serve several optimizer steps, resuming in the middle of a round, one process or two, per-prompt
# seeds and finish reasons, each against the layout it must equal.
#
# Tolerances: the trainer computes in float32. Two layouts of the same rows pad micro-batches differently
# and sum in another order, which moves logits by about 1e-6 relative; gradients are compared by the norm
# of their difference against 1e-4 of their norm, losses to 1e-4 relative. The bugs these tests guard
# against are factors (GA or GA^2) or other samples.
# ---------------------------------------------------------------------------------------------------------

GRAD_RTOL = 1e-4
STOPS = list(range(100, 140))  # about a tenth of the tiny vocabulary: most completions stop early
LOSS_RTOL = 1e-4


def server_config(tmp_path, server, **overrides):
    port = int(server.base_url.rsplit(":", 1)[1])
    return base_config(tmp_path, use_vllm=True, vllm_server_port=port, vllm_server_host="127.0.0.1", **overrides)


class Gradients(TrainerCallback):
    def __init__(self):
        self.steps, self.trainer = [], None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum((a[k] - b[k]).double().pow(2).sum() for k in a).sqrt()
    return (diff / sum(b[k].double().pow(2).sum() for k in b).sqrt()).item()


def train(tiny_qwen2, config, dataset=None, callbacks=(), rewards=(reward_digits, reward_length), before=None):
    trainer = GRPOTrainer(tiny_qwen2, list(rewards), args=config, train_dataset=dataset or tiny_dataset())
    for callback in callbacks:
        callback.trainer = trainer
        trainer.add_callback(callback)
    if before is not None:
        before(trainer)
    trainer.train()
    trainer.close()
    return trainer


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_gradient_at_ga4_equals_one_batch_of_the_same_rows(server, tiny_qwen2, tmp_path, loss_type):
    """16 completions as one micro-batch, or as 4 accumulated ones: the same gradient. The same round
    (4 prompts x 4) is generated both times: same prompts, same per-prompt seeds, same weights.

    The GA=4 trainer is run with `loss_is_scaled_for_ga` unset, as on transformers before 5.19 (which
    never reads it): there Trainer's training_step divided the loss by GA again."""
    grads = {}
    for ga in (1, 4):
        recorder = Gradients()
        config = server_config(tmp_path, server, loss_type=loss_type, per_device_train_batch_size=16 // ga,
                               gradient_accumulation_steps=ga, max_steps=1, max_grad_norm=0.0,
                               output_dir=str(tmp_path / f"ga{ga}"))

        def like_old_transformers(trainer):
            trainer.loss_is_scaled_for_ga = None

        train(tiny_qwen2, config, callbacks=[recorder], before=like_old_transformers)
        grads[ga] = recorder.steps[0]
    assert relative_difference(grads[4], grads[1]) < GRAD_RTOL


def reference_gradient(model_path: str, micro_batches: list[dict], loss_type: str, top_entropy_quantile: float,
                       ga: int) -> dict:
    """The step's gradient computed apart from the trainer: each row's own forward (no padding, no prompt
    sharing), on-policy (the ratio is 1, so a token's gradient is -A * grad log p), the micro-batch's token
    count as bnpo's normaliser and its own entropy quantile as the entropy mask's threshold."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    for m in micro_batches:
        rows = []
        for i in range(len(m["advantages"])):
            prompt = m["prompt_ids"][i][m["prompt_mask"][i].bool()]
            completion = m["completion_ids"][i][m["completion_attention"][i].bool()]
            logits = model(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1]
            logps = torch.log_softmax(logits, -1)
            token_logps = logps.gather(1, completion[:, None])[:, 0]
            entropy = -(logps.exp() * logps).sum(-1).detach()
            rows.append((token_logps, entropy, float(m["advantages"][i])))
        keep = [torch.ones_like(e, dtype=torch.bool) for _, e, _ in rows]
        if top_entropy_quantile < 1.0:
            threshold = torch.quantile(torch.cat([e for _, e, _ in rows]), 1.0 - top_entropy_quantile)
            keep = [e >= threshold for _, e, _ in rows]
        tokens = sum(len(lp) for lp, _, _ in rows)
        assert loss_type == "bnpo"
        loss = sum((-a * lp * k).sum() for (lp, _, a), k in zip(rows, keep)) / tokens / ga
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])
def test_bnpo_and_the_entropy_mask_at_ga4_use_random_micro_batches_and_their_own_normalisers(
        server, tiny_qwen2, tmp_path, top_entropy_quantile):
    """bnpo divides by each micro-batch's tokens and the entropy mask takes each micro-batch's quantile, so
    their objective depends on which rows share a micro-batch. TRL shuffles its batches; micro-batches of
    rows sorted by length would give short completions more weight per token. The trainer's micro-batches
    must be random samples of the step, and its gradient that of an independent computation on them."""
    recorded = []
    config = server_config(tmp_path, server, loss_type="bnpo", top_entropy_quantile=top_entropy_quantile,
                           per_device_train_batch_size=4, gradient_accumulation_steps=4, max_steps=1,
                           max_grad_norm=0.0, vllm_importance_sampling_correction=False,
                           generation_kwargs={"stop_token_ids": STOPS}, max_completion_length=32)

    def record(trainer):
        split_round = trainer._split_round

        def recording(batch, round_index):
            micro = split_round(batch, round_index)
            recorded.extend(micro)
            return micro

        trainer._split_round = recording

    recorder = Gradients()
    train(tiny_qwen2, config, callbacks=[recorder], before=record)
    assert len(recorded) == 4 and all("parts" not in m for m in recorded)  # never cut: a part is no share
    lengths = [m["completion_attention"].sum(1).tolist() for m in recorded]
    assert len({x for row in lengths for x in row}) > 4, lengths  # ragged, or the order could not matter
    # Sorted by length, each micro-batch's longest row would be at most the next one's shortest.
    assert not all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:])), lengths
    expected = reference_gradient(tiny_qwen2, recorded, "bnpo", top_entropy_quantile, ga=4)
    assert relative_difference(recorder.steps[0], expected) < GRAD_RTOL


def test_micro_batches_for_per_micro_batch_objectives_are_random_samples_of_the_step():
    """split_round without padding order: over many seeds, the longest rows land in every micro-batch alike."""
    from fastgrpo.trainer.batching import split_round

    lengths = torch.arange(1, 17)
    batch = {"prompt_ids": torch.ones(16, 3, dtype=torch.long), "prompt_mask": torch.ones(16, 3, dtype=torch.long),
             "completion_ids": torch.ones(16, 16, dtype=torch.long),
             "completion_attention": (torch.arange(16)[None] < lengths[:, None]).long(),
             "advantages": torch.arange(16.0)}
    batch["completion_mask"] = batch["completion_attention"].clone()
    where_longest = torch.zeros(4)
    for seed in range(400):
        (step,) = split_round(batch, 1, 4, generator=torch.Generator().manual_seed(seed), order_for_padding=False)
        assert sorted(int(a) for m in step for a in m["advantages"]) == list(range(16))
        where_longest[next(i for i, m in enumerate(step) if 15 in m["advantages"].tolist())] += 1
    # Uniform: 100 each; a 4-sigma band (sd = sqrt(400 * 1/4 * 3/4) ~ 8.7).
    assert ((where_longest - 100).abs() < 35).all(), where_longest
    (ordered,) = split_round(batch, 1, 4, generator=torch.Generator().manual_seed(0))
    assert 15 in ordered[-1]["advantages"].tolist()  # with padding order: the longest rows together


def test_a_round_serving_two_steps_trains_the_second_against_the_generating_policy(server, tiny_qwen2, tmp_path):
    """steps_per_generation=2 at GA 1: step 2 trains on samples of the weights before step 1. Its ratio must
    be to those weights (old logprobs computed at generation), and its dapo normaliser its own token count."""
    # Stop tokens make completion lengths differ (the random model seldom says EOS), so the normalisers do.
    config = server_config(tmp_path, server, steps_per_generation=2, max_steps=2, learning_rate=5e-2,
                           generation_kwargs={"stop_token_ids": STOPS})
    initial = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    trainer = train(tiny_qwen2, config)
    first, second = trainer._buffered  # the round's two micro-batches, in training order
    for m in (first, second):
        ids = torch.cat([m["prompt_ids"], m["completion_ids"]], 1)
        attention = torch.cat([m["prompt_mask"], m["completion_attention"]], 1)
        with torch.no_grad():
            logits = initial(input_ids=ids, attention_mask=attention).logits[:, m["prompt_ids"].shape[1] - 1 : -1]
        want = torch.log_softmax(logits.float() / config.temperature, -1).gather(-1, m["completion_ids"][..., None])[..., 0]
        mask = m["completion_attention"].bool()
        assert (m["old_logps"][mask] - want[mask]).abs().max() < 1e-4  # float32, another padding
        assert m["num_items_in_batch"].item() == m["completion_mask"].sum().item()
    assert first["num_items_in_batch"] != second["num_items_in_batch"]  # the fixture tells the normalisers apart
    # The weights moved, so step 2's samples are off-policy: their ratio to the trained policy is not 1.
    with torch.no_grad():
        now = trainer._per_token_logps(trainer.model, second)
    mask = second["completion_attention"].bool()
    assert (now[mask] - second["old_logps"][mask]).abs().max() > 1e-3


def test_resume_at_ga2_with_four_steps_per_round_equals_the_uninterrupted_run(server, tiny_qwen2, tmp_path):
    """A round of 4 micro-batches at GA 2 serves 2 optimizer steps; stopping after step 1 leaves half of it
    to the resumed run, which must train on it, not on a new round, with the token count carried on."""

    def run(out, stop_at=None, resume=False):
        config = server_config(tmp_path, server, output_dir=str(out), per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, steps_per_generation=4, max_steps=4,
                               save_strategy="steps", save_steps=1)
        callbacks = [StopAt(stop_at)] if stop_at else []
        trainer = GRPOTrainer(tiny_qwen2, reward_digits, args=config, train_dataset=tiny_dataset())
        for callback in callbacks:
            trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume or None)
        trainer.close()
        return {h["step"]: h for h in trainer.state.log_history if "loss" in h}

    full = run(tmp_path / "full")
    run(tmp_path / "split", stop_at=1)
    resumed = run(tmp_path / "split", resume=True)
    assert sorted(resumed) == [1, 2, 3, 4]  # step 1 from the checkpoint's history
    for step in (2, 3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=LOSS_RTOL, abs=1e-7), step
        assert resumed[step]["grad_norm"] == pytest.approx(full[step]["grad_norm"], rel=LOSS_RTOL), step
    for step in (3,):  # a round's metrics are logged at the step that generates it
        assert resumed[step]["reward"] == full[step]["reward"]
        assert resumed[step]["num_tokens"] == full[step]["num_tokens"]


def test_each_prompt_samples_with_its_own_seed(server, tiny_qwen2):
    """One seed for a request gives completion j of every prompt the same noise: two copies of a prompt
    get identical groups. Per-prompt seeds give them different ones, and the same seeds the same ones."""
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(tiny_qwen2)("What is 2 + 5?")["input_ids"]
    backend = ServerBackend(server.base_url, "127.0.0.1", 0, 30)
    sampling = Sampling(n=4, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=12)
    try:
        shared = backend.client.generate(prompt_token_ids=[prompt, prompt], n=4, max_tokens=12, seed=7)
        assert [c.token_ids for c in shared.results[0].completions] == [c.token_ids for c in shared.results[1].completions]
        seeds = prompt_seeds(0, 0, 2)
        ours = backend.generate([prompt, prompt], sampling, seeds)
        assert ours.token_ids[0] != ours.token_ids[1]
        assert backend.generate([prompt, prompt], sampling, seeds).token_ids == ours.token_ids  # reproducible
        assert backend.generate([prompt, prompt], sampling, prompt_seeds(0, 1, 2)).token_ids != ours.token_ids
    finally:
        backend.close()


def test_prompt_seeds_are_distinct_across_prompts_and_rounds():
    seeds = [s for r in range(50) for s in prompt_seeds(1234, r, 64)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**62 for s in seeds)
    assert prompt_seeds(1234, 3, 4) == prompt_seeds(1234, 3, 4) != prompt_seeds(1235, 3, 4)


def test_a_completion_ending_on_another_stop_token_is_terminated_not_truncated(server, tiny_qwen2, tmp_path):
    """Stop tokens besides eos_token_id (here from generation_kwargs) end completions with finish reason
    "stop": mask_truncated_completions must keep them, and drop only those cut at the length limit."""
    stops = STOPS
    config = server_config(tmp_path, server, max_steps=1, mask_truncated_completions=True,
                           generation_kwargs={"stop_token_ids": stops})
    trainer = train(tiny_qwen2, config)
    kept = dropped = 0
    for m in trainer._buffered:
        for ids, attention, mask in zip(m["completion_ids"], m["completion_attention"], m["completion_mask"]):
            n = int(attention.sum())
            last = int(ids[n - 1])
            if last in stops or last == trainer.tokenizer.eos_token_id:
                assert int(mask.sum()) == n
                kept += 1
            else:
                assert n == config.max_completion_length and int(mask.sum()) == 0
                dropped += 1
    assert kept > 0
    log = next(h for h in trainer.state.log_history if "reward" in h)
    assert log["completions/clipped_ratio"] == pytest.approx(dropped / (kept + dropped))


def test_gspo_cispo_with_an_eval_dataset_trains_and_logs_eval_rewards(server, tiny_qwen2, tmp_path):
    """TRL's newer options end to end: sequence-level ratios, the CISPO loss, two steps per round (so the
    ratio is not 1), and an eval set scored on the current weights after every step."""
    config = server_config(tmp_path, server, importance_sampling_level="sequence", loss_type="cispo",
                           epsilon_high=5.0, steps_per_generation=2, max_steps=2, eval_strategy="steps", eval_steps=1,
                           per_device_eval_batch_size=4, num_generations_eval=2, log_completions=True,
                           num_completions_to_print=2)
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset(),
                          eval_dataset=tiny_dataset(8))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    trainer.close()
    moved = max((trainer.model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 0
    evals = [h for h in trainer.state.log_history if "eval_reward" in h]
    assert [h["step"] for h in evals] == [1, 2]
    for h in evals:
        assert {"eval_reward_std", "eval_rewards/reward_digits/mean", "eval_completions/mean_length"} <= h.keys()
        # 8 eval prompts x 2 completions: the mean of reward_length is the mean completion length / 16.
        assert h["eval_rewards/reward_length/mean"] == pytest.approx(h["eval_completions/mean_length"] / 16)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("cispo_clip_ratio" in h for h in train_logs)
    assert not any(k.startswith("eval_") for h in train_logs for k in h)  # eval metrics stay in eval logs


def test_bf16_defaults_to_what_the_cpu_computes_fast(tmp_path, monkeypatch):
    """bf16=None: bf16 autocast only where the CPU has a bf16 matrix unit; an explicit bf16=True on a CPU
    without one warns (torch emulates bf16 there, 100x slower than float32 on an AVX2-only EPYC)."""
    import fastgrpo.hardware as hardware

    for flags, fast in ((frozenset({"avx2", "amx_bf16"}), True), (frozenset({"avx2"}), False)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert base_config(tmp_path, bf16=None).bf16 is fast
        if not torch.cuda.is_available():  # use_cpu=False without a GPU: transformers would refuse bf16
            assert base_config(tmp_path, bf16=None, use_cpu=False).bf16 is False
    with pytest.warns(UserWarning, match="without a bf16 matrix unit"):
        assert base_config(tmp_path, bf16=True).bf16


# ---------------------------------------------------------------------------------------------------------
# Asynchronous rounds (async_generation): generated while the previous step trains, within the bound.
# ---------------------------------------------------------------------------------------------------------


def run_async(tmp_path, server, tiny_qwen2, on_loss=None, **overrides) -> list[dict]:
    # 3 prompts, one a round: the run crosses an epoch, which the look-ahead must predict.
    config = server_config(tmp_path, server, async_generation=True, max_steps=4, **overrides)
    trainer = GRPOTrainer(tiny_qwen2, reward_digits, args=config, train_dataset=tiny_dataset(3))
    if on_loss is not None:  # sees each micro-batch as the loss gets it
        compute_loss = trainer.compute_loss
        trainer.compute_loss = lambda model, inputs, **kw: (on_loss(trainer, model, inputs),
                                                            compute_loss(model, inputs, **kw))[1]
    try:
        trainer.train()
    finally:
        trainer.close()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_an_async_run_trains_every_round_within_the_staleness_bound_and_says_so(server, tiny_qwen2, tmp_path,
                                                                                 caplog):
    with caplog.at_level(logging.WARNING, logger="fastgrpo.trainer"):
        logs = run_async(tmp_path, server, tiny_qwen2)
    # The test server runs on this process's cores, which the trainer says (it slows async steps down).
    assert "which this trainer runs on too" in caplog.text
    assert len(logs) == 4
    # Round 0 waits for the first push; every later one was generated while the previous step trained, by
    # the weights one step behind.
    assert [h["async/staleness_max"] for h in logs] == [0, 1, 1, 1]
    assert all(h["async/regenerated_rounds"] == 0 for h in logs)
    # The sampler correction weighs stale tokens by how far the trainer moved since (not a ratio of 1): the
    # on-policy round differs from the trainer by kernel rounding only (PROBE_TOL), the stale ones by a
    # step of training at learning rate 5e-3 (measured: 0.27 to 0.84 nats at most).
    difference = [h["sampling/sampling_logp_difference/max"] for h in logs]
    assert difference[0] < PROBE_TOL and min(difference[1:]) > 10 * PROBE_TOL, difference


@pytest.mark.slow
def test_without_the_sampler_correction_stale_rounds_are_clipped_against_the_generators_logprobs(
        server, tiny_qwen2, tmp_path):
    # vllm_importance_sampling_correction=False: the ratio's denominator (old_logps) must be the server's
    # logprobs, not the trainer's current ones (a ratio of 1 for data one step stale).
    gaps = []

    def on_loss(trainer, model, inputs):
        assert "sampling_logps" not in inputs
        with torch.no_grad():
            current = trainer._per_token_logps(model, inputs)
        mask = inputs["completion_mask"].bool()
        gaps.append((current - inputs["old_logps"]).abs()[mask].max().item())

    logs = run_async(tmp_path, server, tiny_qwen2, on_loss, vllm_importance_sampling_correction=False)
    assert len(gaps) == 4
    # Round 0 is on-policy: the server's and the trainer's logprobs of the same weights agree to kernel
    # rounding; the later rounds are a step of training stale (0.27 to 0.84 nats measured with the correction on).
    assert gaps[0] < PROBE_TOL and min(gaps[1:]) > 10 * PROBE_TOL, gaps
    assert [h["async/staleness_max"] for h in logs] == [0, 1, 1, 1]


@pytest.mark.slow
def test_a_generation_slower_than_vllm_generation_timeout_fails_naming_it(server, tiny_qwen2, tmp_path):
    config = server_config(tmp_path, server, vllm_generation_timeout=0.2, max_completion_length=200,
                           generation_kwargs={"ignore_eos": True})
    trainer = GRPOTrainer(tiny_qwen2, reward_digits, args=config, train_dataset=tiny_dataset())
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="vllm_generation_timeout"):
        trainer.train()
    trainer.close()
    assert time.monotonic() - began < 30  # one request's timeout, not retried


@pytest.mark.slow
def test_a_server_restarted_mid_run_is_waited_for_and_gets_the_weights_again_before_generating(
        transient_server_factory, tiny_qwen2, tmp_path, caplog):
    from fastgrpo.client import VLLMClient
    from fastgrpo.serve.launcher import ServerProcess

    args = ["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "256"]
    first = transient_server_factory(args)
    config = base_config(tmp_path, use_vllm=True, vllm_server_port=first.port, vllm_server_host="127.0.0.1")
    trainer = GRPOTrainer(tiny_qwen2, reward_digits, args=config, train_dataset=tiny_dataset())
    pushes, real_sync, second = [], trainer.backend.sync_weights, {}

    def restarts_after_push_2(weights, version):
        pushes.append(version)
        result = real_sync(weights, version)
        if pushes == [0, 1, 2]:  # the server dies between the push and the round's generation, and comes back
            first.stop()
            second["server"] = ServerProcess(args, tmp_path / "second.log", port=first.port)
        return result

    trainer.backend.sync_weights = restarts_after_push_2
    probe = AutoTokenizer.from_pretrained(tiny_qwen2)("What is 12 + 35? The answer is 47.")["input_ids"]
    try:
        with caplog.at_level(logging.WARNING):
            trainer.train()
        assert trainer.state.global_step == 3 and pushes == [0, 1, 2, 2, 3]  # step 2's weights pushed again
        assert "waiting for the server" in caplog.text and "restarted" in caplog.text
        # The new server holds exactly the trainer's weights at the end.
        with VLLMClient(base_url=first.base_url) as observer:
            served = observer.generate(prompt_token_ids=[probe], max_tokens=1,
                                       prompt_logprobs=True).results[0].prompt_logprobs[1:]
            assert observer.health()["weight_version"] == 3
        model = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([probe])).logits[0].float(), dim=-1)
        own = [logp[i, probe[i + 1]].item() for i in range(len(probe) - 1)]
        assert max(abs(a - b) for a, b in zip(served, own)) < PROBE_TOL
    finally:
        trainer.close()
        if "server" in second:
            second["server"].stop()


@pytest.mark.slow
def test_an_async_run_goes_on_after_a_push_that_broke_while_a_round_was_generating(server, tiny_qwen2, tmp_path,
                                                                                  monkeypatch, caplog):
    from fastgrpo.trainer import generation
    from fastgrpo.trainer.weight_sync import generation_may_pass

    # Round 2 (the producer's third round) is generated while step 2's push is broken half-way: the server
    # refuses it (503, weights mixed); the trainer pushes step 2 again, and the run must go on, training round 2
    # generated again on the whole weights.
    broke, refused, calls, pushes = threading.Event(), threading.Event(), [], []
    real_generate = generation.ServerBackend.generate

    def generate(self, *args, **kwargs):
        if threading.current_thread().name == "fastgrpo-rounds":
            calls.append(len(calls))
            if len(calls) == 3:
                assert broke.wait(120), "step 2's push never broke"
                try:
                    return real_generate(self, *args, **kwargs)
                except Exception as exc:
                    refused.set()
                    assert generation_may_pass(exc), exc  # the server's 503: the weights are mixed
                    raise
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(generation.ServerBackend, "generate", generate)
    config = server_config(tmp_path, server, async_generation=True, max_steps=4, vllm_max_weight_staleness=1)
    trainer = GRPOTrainer(tiny_qwen2, reward_digits, args=config, train_dataset=tiny_dataset(3))
    real_sync = trainer.backend.sync_weights

    def breaks_once(weights, version):
        pushes.append(version)
        if pushes == [0, 1, 2]:
            try:
                return real_sync(HalfWay(weights, fail_after=5), version)
            finally:
                # The trainer's side broke, but the server's side of the push runs on: its /weights/update may
                # not even have arrived yet (CI once served the round on the old weights in that gap). Wait
                # until the server has given up on the push and holds mixed weights, then let the round ask,
                # before the trainer pushes again.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    health = trainer.backend.client.health()
                    if not health["weights_consistent"] and health["weight_push"] == "none":
                        break
                    time.sleep(0.1)
                broke.set()
                assert refused.wait(60), "the round was not refused"
        return real_sync(weights, version)

    trainer.backend.sync_weights = breaks_once
    # The server gives up on the broken push's missing data after this (120 s by default), refusing the round.
    trainer.backend.client.weight_transfer_timeout = 10
    with caplog.at_level(logging.WARNING):
        trainer.train()
    trainer.close()
    assert trainer.state.global_step == 4 and pushes[:5] == [0, 1, 2, 2, 3]
    assert "generating round 2 ahead failed" in caplog.text and "and the push since landed" in caplog.text
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["async/regenerated_rounds"] for h in logs] == [0, 0, 1, 1]
    assert logs[2]["async/staleness_max"] == 0  # generated again now, on step 2's weights


@pytest.mark.slow
def test_rounds_generated_beyond_the_bound_are_generated_again_not_trained_on(server, tiny_qwen2, tmp_path,
                                                                                 monkeypatch):
    from fastgrpo.trainer import async_rounds

    # A producer that runs one round further ahead than the bound allows, and a trainer that takes round r
    # only once round r + 2 is generated too: round r + 2 may start once version r is pushed, so rounds 2 and
    # 3 are generated by weights two steps behind the step that trains them, whatever the timing.
    monkeypatch.setattr(async_rounds, "may_start",
                        lambda trained_at, pushed, bound: pushed is not None and pushed >= trained_at - bound - 1)
    take = async_rounds.RoundProducer.take

    def take_when_two_ahead(producer, index):
        deadline = time.monotonic() + 120
        with producer.cond:
            while index + 2 not in producer.rounds:
                assert producer.thread.is_alive() and time.monotonic() < deadline, "round not generated"
                producer.cond.wait(async_rounds.POLL_S)
        return take(producer, index)

    monkeypatch.setattr(async_rounds.RoundProducer, "take", take_when_two_ahead)
    logs = run_async(tmp_path, server, tiny_qwen2)
    assert all(h["async/staleness_max"] <= 1 for h in logs)  # what was trained on
    assert [h["async/regenerated_rounds"] for h in logs] == [0, 0, 1, 2]  # rounds 2 and 3


def test_the_cpu_trainer_keeps_freed_memory_in_its_heap_unless_told_not_to(tmp_path):
    """glibc's mallopt takes the thresholds (bench: 6% faster micro-steps, a third of the page faults); the
    environment switch leaves the allocator as it is. Each case in a fresh process: the setting is per process."""
    import subprocess
    import sys

    code = "from fastgrpo.hardware import keep_freed_memory; print(keep_freed_memory())"
    for value, expected in (("1", "True"), ("0", "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "FASTGRPO_KEEP_FREED_MEMORY": value})
        assert out.stdout.strip() == expected
