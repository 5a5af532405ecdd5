"""TRL 1.16 behaviours a ported script relies on, on a tiny model with transformers generation (use_vllm=False):
each test asserts the numbers TRL's behaviour implies, computed here independently of the trainer."""

import logging
import math
import socket
import time

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.config import ConfigError
from fastgrpo.trainer import grpo_trainer as trainer_module
from fastgrpo.trainer.backends import UNSET_MODE_WAIT_S
from fastgrpo.trainer.batching import pad_to_multiple
from fastgrpo.trainer.forward import PromptSharingUnsupported, completion_logits


def reward_len(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def prompts(n: int, words: int = 3) -> Dataset:
    return Dataset.from_dict({"prompt": [" ".join(["count"] * words) + f" to {i}:" for i in range(n)],
                              "solution": [str(i) for i in range(n)]})


def config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=8, learning_rate=1e-2, max_steps=1, logging_steps=1, save_strategy="no",
                    report_to=[], seed=0, use_cpu=True, bf16=False, disable_tqdm=True)
    settings.update(overrides)
    return GRPOConfig(**settings)


# --- silent differences ------------------------------------------------------------------------------------


def test_a_prompt_longer_than_max_prompt_length_stops_the_run_naming_it(tiny_qwen2, tmp_path):
    data = Dataset.from_dict({"prompt": ["word " * 40] * 4})
    trainer = GRPOTrainer(tiny_qwen2, reward_len, args=config(tmp_path, max_prompt_length=16), train_dataset=data)
    with pytest.raises(ValueError, match=r"a prompt has \d+ tokens, more than max_prompt_length=16.*filter"):
        trainer.train()


def test_prompts_are_not_cut_by_default(tiny_qwen2, tmp_path):
    """Default max_prompt_length is None: the model sees the whole prompt (TRL has no such cut since 0.28)."""
    trainer = GRPOTrainer(tiny_qwen2, reward_len, args=config(tmp_path), train_dataset=prompts(4))
    long_prompt = "word " * 600  # past the 512 tokens of the old default
    ids = trainer.rounds.prompt_ids([long_prompt])[0]
    assert ids == trainer.tokenizer(long_prompt)["input_ids"] and len(ids) > 512


def test_unset_vllm_mode_with_no_server_fails_in_seconds_saying_why(tiny_qwen2, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(Exception, match=r"vllm_mode was not set.*TRL's is 'colocate'"):
        GRPOTrainer(tiny_qwen2, reward_len, args=config(tmp_path, use_vllm=True, vllm_server_port=port),
                    train_dataset=prompts(4))
    assert time.monotonic() - began < UNSET_MODE_WAIT_S + 10


def test_hybrid_models_fall_back_to_the_plain_forward_with_a_reason(tmp_path, caplog):
    """NemotronH's linear-attention cache cannot be indexed by row: prompt sharing says why and the trainer's
    logprobs are the plain forward's."""
    from transformers import NemotronHConfig

    model = AutoModelForCausalLM.from_config(NemotronHConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, hybrid_override_pattern="M*", num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1,
        intermediate_size=64, mamba_chunk_size=8)).eval()
    prompt_ids = torch.randint(1, 64, (2, 5)).repeat_interleave(2, 0)
    prompt_mask = torch.ones_like(prompt_ids)
    completion_ids, attention = torch.randint(1, 64, (4, 3)), torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(PromptSharingUnsupported, match="LinearAttentionLayer"):
        completion_logits(model, prompt_ids, prompt_mask, completion_ids, attention, share_prompts=True)
    plain = completion_logits(model, prompt_ids, prompt_mask, completion_ids, attention, share_prompts=False)
    # The trainer's path: one warning, then the plain forward for the rest of the run.
    stub = type("Stub", (), {})()
    stub.accelerator = type("Acc", (), {"device": torch.device("cpu")})()
    stub.args = type("Args", (), {"temperature": 1.0})()
    stub._share_prompts, stub._pack = True, False
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_attention": attention}
    with caplog.at_level(logging.WARNING, logger=trainer_module.__name__):
        for _ in range(2):
            logps = GRPOTrainer._per_token_logps(stub, model, batch)
    ours = [r.message for r in caplog.records if r.name == trainer_module.__name__]
    assert len(ours) == 1 and "prompt sharing is off" in ours[0] and "LinearAttentionLayer" in ours[0]
    assert not stub._share_prompts
    expected = torch.log_softmax(plain, -1).gather(-1, completion_ids[..., None])[..., 0]
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-6)  # the same forward, float32 rounding only


# --- rewards ---------------------------------------------------------------------------------------------------


def test_reward_functions_log_metrics_and_completion_columns(tiny_qwen2, tmp_path, monkeypatch):
    seen, tables = [], []

    def reward(completion_ids, log_metric, log_extra, **kwargs):
        lengths = [len(ids) for ids in completion_ids]
        seen.append(lengths)
        log_metric("lengths/sum", float(sum(lengths)))
        log_extra("length_text", [f"n={n}" for n in lengths])
        return [float(n) for n in lengths]

    from fastgrpo.trainer import completion_log

    monkeypatch.setattr(completion_log, "report_completions", lambda rows, *a, **k: tables.append(rows))
    trainer = GRPOTrainer(tiny_qwen2, reward, args=config(tmp_path, max_steps=2, log_completions=True),
                          train_dataset=prompts(8))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "lengths/sum" in h]
    assert [h["lengths/sum"] for h in logged] == [float(sum(lengths)) for lengths in seen]
    assert [row["length_text"] for row in tables[-1]] == [f"n={n}" for n in seen[-1]]


def test_reward_models_load_with_one_label_on_the_trainers_device_and_score_logits(tiny_qwen2, tmp_path):
    """A reward model by name: a causal LM checkpoint loads as sequence classification with one label (TRL's
    num_labels=1), with model_init_kwargs; its reward is logits[:, 0] of the last real token, recomputed here row by
    row (no padding) against the trainer's batched, right-padded scoring."""
    trainer = GRPOTrainer(tiny_qwen2, tiny_qwen2, args=config(tmp_path, model_init_kwargs={"dtype": torch.float64}),
                          train_dataset=prompts(4))
    rm = trainer.reward_funcs[0]
    assert rm.model.config.num_labels == 1 and rm.model.dtype == torch.float64
    assert next(rm.model.parameters()).device == trainer.accelerator.device
    texts = ["count to 1: 2 3 4 5 6", "hello"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    expected = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            expected.append(rm.model(**ids).logits[0, 0].item())
    # Scores come back as float32: 1e-6 relative covers that rounding; a wrong token or padding moves them by far more.
    assert rm(prompts=["", ""], completions=texts) == pytest.approx(expected, rel=1e-6)


def test_every_reward_none_warns_in_trls_words_and_the_row_gets_no_advantage(tiny_qwen2, tmp_path, caplog):
    from fastgrpo.trainer.rewards import compute_rewards

    def only_even(completions, **kwargs):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    with caplog.at_level(logging.WARNING):
        rewards = compute_rewards([only_even], ["p"] * 4, ["a", "b", "c", "d"], None)
    assert "All reward functions returned None for the following kwargs" in caplog.text
    assert torch.isnan(rewards[1, 0]) and rewards[0, 0] == 1.0


# --- data and evaluation ---------------------------------------------------------------------------------------


class RecordingTrainer(GRPOTrainer):
    """Keeps what compute_loss saw and returned, for an independent recomputation."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.seen = getattr(self, "seen", []) + [({k: v for k, v in inputs.items()}, loss.item(), model.training)]
        return loss


def plain_logps(model, inputs) -> torch.Tensor:
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_attention"]], 1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]


def test_evaluate_returns_trls_eval_loss_for_each_named_eval_set(tiny_qwen2, tmp_path):
    """eval_loss is the mean over eval batches of the on-policy dr_grpo loss (ratio 1): recomputed here from each
    batch's tensors with a plain forward. A dict of eval sets prefixes each set's metrics with its name."""
    args = config(tmp_path, loss_type="dr_grpo", per_device_eval_batch_size=4, eval_strategy="no")
    trainer = RecordingTrainer(tiny_qwen2, reward_len, args=args, train_dataset=prompts(4),
                               eval_dataset={"short": prompts(4, words=1), "long": prompts(8, words=6)})
    metrics = trainer.evaluate()
    assert {"eval_short_loss", "eval_long_loss", "eval_short_reward", "eval_long_reward",
            "eval_long_samples_per_second", "eval_short_completions/mean_length"} <= set(metrics)
    model = trainer.accelerator.unwrap_model(trainer.model)
    losses = []
    for inputs, loss, training in trainer.seen:
        assert not training
        mask = inputs["completion_mask"].double()
        logps = plain_logps(model, inputs)  # ratio exp(logp - logp.detach()) = 1 in value
        expected = (-inputs["advantages"].double()[:, None] * torch.exp(logps - logps) * mask).sum() / (
            mask.shape[0] * args.max_completion_length)
        assert loss == pytest.approx(expected.item(), abs=1e-6)
        losses.append(loss)
    short, long = losses[:1], losses[1:]
    assert metrics["eval_short_loss"] == pytest.approx(sum(short) / len(short))
    assert metrics["eval_long_loss"] == pytest.approx(sum(long) / len(long))


def test_one_generation_per_eval_prompt_gives_zero_advantages(tiny_qwen2, tmp_path):
    args = config(tmp_path, num_generations_eval=1, per_device_eval_batch_size=3)
    trainer = RecordingTrainer(tiny_qwen2, reward_len, args=args, train_dataset=prompts(4), eval_dataset=prompts(3))
    metrics = trainer.evaluate()
    inputs = trainer.seen[0][0]
    assert inputs["advantages"].tolist() == [0.0, 0.0, 0.0] and metrics["eval_loss"] == 0.0
    assert metrics["eval_reward"] == pytest.approx(inputs["completion_attention"].sum(1).float().mean().item())


def test_an_iterable_dataset_trains_in_the_samplers_groups(tiny_qwen2, tmp_path):
    """A streaming dataset: each round is num_generations copies of consecutive stream rows, as a map-style
    dataset without shuffling gives them."""
    rows = prompts(8)
    stream = IterableDataset.from_generator(lambda: iter(rows))
    seen = []

    def reward(prompts, **kwargs):
        seen.append(list(prompts))
        return [0.0] * len(prompts)

    args = config(tmp_path, max_steps=2, shuffle_dataset=False, dataloader_num_workers=2)
    GRPOTrainer(tiny_qwen2, reward, args=args, train_dataset=stream).train()
    assert args.dataloader_num_workers == 0  # TRL's rule: one worker keeps the groups whole
    assert seen == [[rows[0]["prompt"]] * 4, [rows[1]["prompt"]] * 4]


def test_pad_to_multiple_of_changes_shapes_not_numbers(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    inputs = {"prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
              "completion_ids": torch.tensor([[3, 4], [5, 0]]), "completion_attention": torch.tensor([[1, 1], [1, 0]]),
              "completion_mask": torch.tensor([[1, 1], [1, 0]])}
    padded = pad_to_multiple(inputs, 8, pad_id=0)
    assert padded["prompt_ids"].shape == (2, 8) and padded["completion_ids"].shape == (2, 8)
    assert padded["completion_mask"].sum() == inputs["completion_mask"].sum()
    before, after = plain_logps(model, inputs), plain_logps(model, padded)[:, :2]
    torch.testing.assert_close(after[inputs["completion_mask"].bool()], before[inputs["completion_mask"].bool()],
                               rtol=0, atol=1e-5)  # float32 kernels on other widths: rounding (1e-7 seen)


def test_generation_kwargs_reach_transformers_generate(tiny_qwen2, tmp_path):
    """use_vllm=False: GenerationConfig's keys pass through, over the run's sampling fields (TRL's order).
    Greedy decoding makes every completion of a group the same, so every group has zero reward std."""
    args = config(tmp_path, generation_kwargs={"do_sample": False})
    trainer = GRPOTrainer(tiny_qwen2, reward_len, args=args, train_dataset=prompts(4))
    trainer.train()
    assert trainer.state.log_history[0]["frac_reward_zero_std"] == 1.0
    with pytest.raises(ValueError, match="GenerationConfig, which has no such fields"):
        GRPOTrainer(tiny_qwen2, reward_len, args=config(tmp_path, generation_kwargs={"not_a_key": 1}),
                    train_dataset=prompts(4))


# --- regularisers and precision ---------------------------------------------------------------------------------


def test_sync_ref_model_mixes_the_policy_into_the_reference(tiny_qwen2, tmp_path):
    args = config(tmp_path, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.25)
    trainer = GRPOTrainer(tiny_qwen2, reward_len, args=args, train_dataset=prompts(4))
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    for name, ref in trainer.ref_model.named_parameters():
        torch.testing.assert_close(ref, 0.25 * policy[name].detach() + 0.75 * before[name], rtol=0, atol=1e-7)
    with pytest.raises(ConfigError, match="beta=0.0"):
        config(tmp_path, sync_ref_model=True)


def test_cast_lm_head_to_fp32_computes_the_logits_in_float32_under_bf16(tiny_qwen2, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    trainer_module.cast_lm_head_to_fp32(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    expected = hidden.float() @ model.lm_head.weight.float().T  # the bf16 hidden states, a float32 matmul
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_moe_model_with_a_router_loss_fails_at_start_and_trains_with_it_off(tmp_path):
    from transformers import Qwen3MoeConfig

    moe = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="Mixture-of-Experts.*router_aux_loss_coef=0.0"):
        trainer_module.check_router_loss(moe, None)
    trainer_module.check_router_loss(moe, 0.0)  # off: nothing to add


def test_trls_static_helpers_are_on_the_trainer_and_agree_with_trl():
    trl = pytest.importorskip("trl")
    generator = torch.Generator().manual_seed(0)
    logps, sampling = -torch.rand(6, 5, generator=generator), -torch.rand(6, 5, generator=generator)
    mask = (torch.rand(6, 5, generator=generator) > 0.2).float()
    advantages = torch.randn(6, 1, generator=generator)
    ours = GRPOTrainer.get_off_policy_mask(advantages, logps, sampling, mask, 0.1)
    theirs = trl.GRPOTrainer.get_off_policy_mask(advantages, logps, sampling, mask, 0.1)
    assert torch.equal(ours, theirs)
    assert math.isfinite(float(ours.sum()))


class ReferenceTrainer(GRPOTrainer):
    """Records, at each compute_loss, the loss and an independent float64 recomputation of its policy term and
    of the mean entropy of the trained tokens, from a plain forward of the same weights."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_attention"]], 1)
        width = inputs["completion_ids"].shape[1]
        with torch.no_grad():
            logits = unwrapped(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].double()
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        mask = inputs["completion_mask"].double()
        policy = (-inputs["advantages"].double()[:, None] * mask).sum() / inputs["num_items_in_batch"].double()
        self.records = getattr(self, "records", []) + [(loss.item(), policy.item(),
                                                        ((entropy * mask).sum() / mask.sum()).item())]
        return loss


def test_the_adaptive_entropy_bonus_with_gradient_accumulation(tiny_qwen2, tmp_path):
    """TRL's controller: no bonus until a step has measured the entropy (it starts at +inf), then coef x the mean
    entropy of each micro-batch's trained tokens / GA, the coefficient moving by delta per optimizer step (up, while
    the entropy is at or below the target). dapo on-policy: the policy term is -sum(A) over the step's tokens."""
    args = config(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                  loss_type="dapo", entropy_coef=0.1, use_adaptive_entropy=True, entropy_target=100.0,
                  entropy_coef_delta=0.05, learning_rate=1e-3)
    trainer = ReferenceTrainer(tiny_qwen2, reward_len, args=args, train_dataset=prompts(8))
    trainer.train()
    assert [h["entropy_coef"] for h in trainer.state.log_history if "entropy_coef" in h] == pytest.approx(
        [0.15, 0.2])
    applied = [0.0, 0.0, 0.15, 0.15]  # per micro-step: the coefficient as it stood when its step began
    for (loss, policy, entropy), coef in zip(trainer.records, applied, strict=True):
        # float64 reference against the float32 trainer: 1e-5 covers float32 logits over a 151k... tiny vocabulary
        assert loss == pytest.approx(policy - coef * entropy / 2, abs=1e-5)


def test_normalize_then_sum_advantages_in_the_trainer(tiny_qwen2, tmp_path):
    """GDPO: each reward normalised within its group, weighted sum, then normalised over the batch."""
    def length(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def has_token_7(completion_ids, **kwargs):
        return [float(7 in ids) for ids in completion_ids]

    args = config(tmp_path, multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 2.0])
    trainer = ReferenceTrainer(tiny_qwen2, [length, has_token_7], args=args, train_dataset=prompts(4))
    seen = []
    original = trainer._generate_and_score

    def spy(inputs, round_index, evaluating=False):
        micro = original(inputs, round_index, evaluating)
        seen.extend(micro)
        return micro

    trainer._generate_and_score = spy
    trainer.train()
    batch = seen[0]
    lengths = batch["completion_attention"].sum(1).double()
    sevens = (batch["completion_ids"] == 7).logical_and(batch["completion_attention"].bool()).any(1).double()
    expected = []
    for values, weight in ((lengths, 1.0), (sevens, 2.0)):  # one group of 4: this micro-batch's rows, any order
        expected.append(weight * (values - values.mean()) / (values.std() + 1e-4))
    summed = expected[0] + expected[1]
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    torch.testing.assert_close(batch["advantages"].double(), expected, rtol=0, atol=1e-5)  # float32 advantages


def test_the_last_log_of_a_run_carries_the_reward_metrics(tiny_qwen2, tmp_path):
    """TRL's logging_steps default (10): a 3-step run logs once, at its end, with the steps' reward metrics."""
    args = config(tmp_path, max_steps=3)
    args.logging_steps = 10
    trainer = GRPOTrainer(tiny_qwen2, reward_len, args=args, train_dataset=prompts(12))
    trainer.train()
    last = trainer.state.log_history[-1]
    assert {"train_loss", "reward", "reward_std", "rewards/reward_len/mean", "completions/mean_length"} <= set(last)


def test_an_environment_that_owns_its_data_and_reward_needs_no_dataset(tiny_qwen2, tmp_path):
    class Counting:
        def reset(self, **kwargs):
            self.said = None
            return "Say a number."

        def get_reward(self):
            return 1.0

    with pytest.raises(ValueError, match="`max_steps` must be set to a positive value"):
        GRPOTrainer(tiny_qwen2, args=config(tmp_path, max_steps=-1), environment_factory=Counting)
    trainer = GRPOTrainer(tiny_qwen2, args=config(tmp_path), environment_factory=Counting)
    trainer.train()
    assert trainer.reward_func_names == ["Counting"]
    assert trainer.state.log_history[0]["rewards/Counting/mean"] == 1.0


def test_a_streamed_eval_set_is_evaluated_in_whole_groups(tiny_qwen2, tmp_path):
    rows = prompts(3)
    seen = []

    def reward(prompts, **kwargs):
        seen.append(list(prompts))
        return [0.0] * len(prompts)

    args = config(tmp_path, per_device_eval_batch_size=4)
    trainer = GRPOTrainer(tiny_qwen2, reward, args=args, train_dataset=prompts(4),
                          eval_dataset=IterableDataset.from_generator(lambda: iter(rows)))
    metrics = trainer.evaluate()
    assert seen == [[row["prompt"]] * 4 for row in rows] and "eval_loss" in metrics
