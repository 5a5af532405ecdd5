"""Completion logits with shared prompts against a row-by-row reference: same logprobs, same gradients.

The reference runs each row alone, unpadded (prompt + completion, batch of one),
and takes the log-softmax at the positions that predict completion tokens: no
padding, masks, caches or logits_to_keep involved.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastgrpo.trainer.forward import PromptSharingUnsupported, completion_logits

PAD = 0


def batch(seed: int = 0):
    """Rows of (prompt, completion): two prompts repeated, one alone, ragged lengths on both sides."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 3, 5)]
    rows = [(prompts[i], torch.randint(5, 300, (n,), generator=g).tolist())
            for i, n in [(0, 4), (1, 9), (0, 1), (1, 6), (0, 7), (2, 5), (1, 2)]]
    prompt_width = max(len(p) for p, _ in rows)
    completion_width = max(len(c) for _, c in rows)
    prompt_ids = torch.tensor([[PAD] * (prompt_width - len(p)) + p for p, _ in rows])
    prompt_mask = torch.tensor([[0] * (prompt_width - len(p)) + [1] * len(p) for p, _ in rows])
    completion_ids = torch.tensor([c + [PAD] * (completion_width - len(c)) for _, c in rows])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (completion_width - len(c)) for _, c in rows])
    return rows, (prompt_ids, prompt_mask, completion_ids, completion_mask)


def reference(model, rows, width):
    """(rows, width) logprobs, each row computed alone; padding positions stay 0."""
    out = torch.zeros(len(rows), width)
    for i, (prompt, completion) in enumerate(rows):
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
        out[i, : len(completion)] = logp[positions, torch.tensor(completion)]
    return out


def logps_and_grads(model, compute):
    model.zero_grad()
    logps = compute()
    logps.sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_llama"])
@pytest.mark.parametrize("share", [True, False])
def test_completion_logprobs_and_gradients_match_a_row_by_row_forward(arch, share, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(arch), dtype=torch.float32)
    rows, (prompt_ids, prompt_mask, completion_ids, completion_mask) = batch()

    def ours():
        logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(2, completion_ids[..., None])[..., 0]
        return logp * completion_mask

    got, got_grads = logps_and_grads(model, ours)
    want, want_grads = logps_and_grads(model, lambda: reference(model, rows, completion_ids.shape[1]))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_without_an_indexable_cache_it_says_to_turn_sharing_off(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    model.gradient_checkpointing_enable()  # in training mode this drops the cache
    model.train()
    _, tensors = batch()
    with pytest.raises(PromptSharingUnsupported, match="cannot be indexed by row"):
        completion_logits(model, *tensors, share_prompts=True)


def split(share: bool, prompt_lengths: list[int], completion_lengths: list[int], parts: int, steps: int = 1,
          seed: int = 0):
    """The rows cut as a round of `steps` optimizer steps of `parts` micro-batches each, flattened."""
    from fastgrpo.trainer.batching import pad_rows, split_round
    from fastgrpo.trainer.forward import prompt_groups

    prompts = [[100 + len(prompt_lengths) * i + j for j in range(n)] for i, n in enumerate(prompt_lengths)]
    rows = [prompts[i % len(prompts)] for i in range(len(completion_lengths))]  # prompts interleaved
    completions = [[1000 + i] * n for i, n in enumerate(completion_lengths)]  # first token names the row
    batch = {"prompt_ids": pad_rows(rows, PAD, left=True),
             "prompt_mask": pad_rows([[1] * len(p) for p in rows], 0, left=True),
             "completion_ids": pad_rows(completions, PAD),
             "completion_attention": pad_rows([[1] * len(c) for c in completions], 0)}
    batch["completion_mask"] = batch["completion_attention"].clone()
    batch["advantages"] = torch.arange(len(rows), dtype=torch.float32)
    index = prompt_groups(batch["prompt_ids"], batch["prompt_mask"])[1] if share else None
    by_step = split_round(batch, steps, parts, index, 1.27, torch.Generator().manual_seed(seed))
    return [m for step in by_step for m in step]


def unique_prompts(micro: dict) -> int:
    return len(torch.unique(torch.cat([micro["prompt_ids"], micro["prompt_mask"]], 1), dim=0))


def test_split_keeps_every_row_once_with_its_own_columns():
    lengths = [5, 30, 2, 17, 9, 9, 40, 1]
    for share in (True, False):
        micro = split(share, [6, 11], lengths, parts=4)
        seen = sorted(int(a) for m in micro for a in m["advantages"])
        assert seen == list(range(8))
        for m in micro:
            for ids, attention, advantage in zip(m["completion_ids"], m["completion_attention"], m["advantages"]):
                row = int(advantage)
                assert int(ids[0]) == 1000 + row  # the completion and its advantage still belong together
                assert int(attention.sum()) == lengths[row]


def test_split_keeps_a_prompts_completions_together_when_that_computes_less():
    # Equal completion lengths: keeping prompts together costs no extra padding, so each micro-batch
    # holds one prompt; without sharing, length order keeps the rows' interleaved prompts mixed.
    assert [unique_prompts(m) for m in split(True, [20, 20, 20, 20], [10] * 16, parts=4)] == [1, 1, 1, 1]
    assert [unique_prompts(m) for m in split(False, [20, 20, 20, 20], [10] * 16, parts=4)] == [4, 4, 4, 4]


def test_split_prefers_length_order_when_grouping_would_pad_completions():
    # Each prompt has one very long completion: grouping would pad every micro-batch to 60 tokens.
    lengths = [60, 60, 2, 2, 2, 2, 2, 2]  # prompts alternate: each has one 60
    micro = split(True, [3, 3], lengths, parts=2)
    assert sorted(m["completion_ids"].shape[1] for m in micro) == [2, 60]


def rows_of(micro: dict) -> list[int]:
    return [int(a) for a in micro["advantages"]]


@pytest.mark.parametrize("share", [True, False])
def test_a_round_of_several_steps_deals_rows_at_random_not_by_length(share):
    """Rows ordered by length (row i is the i-th shortest): sorting across the round would give step 0 the
    shortest quarter every time. Dealt at random, each step holds a sample of lengths."""
    lengths = list(range(1, 33))
    shortest_quarter, first_steps = set(range(8)), []
    for seed in range(20):
        micro = split(share, [6, 6], lengths, parts=2, steps=4, seed=seed)
        assert sorted(r for m in micro for r in rows_of(m)) == list(range(32))  # every row once
        steps = [set(rows_of(micro[2 * s]) + rows_of(micro[2 * s + 1])) for s in range(4)]
        first_steps.append(steps[0])
        # Inside a step the order still pads little: its two micro-batches split its rows by length.
        if not share:
            assert max(rows_of(micro[0])) < min(rows_of(micro[1]))
    # Under a uniform deal, P(step 0 = the shortest quarter) = 1 / C(32, 8) ~ 1e-7 per round.
    assert all(step != shortest_quarter for step in first_steps)
    assert len({frozenset(s) for s in first_steps}) == 20  # a different deal each round
    # The same seed deals the same way (a resumed run trains what the uninterrupted one did).
    again = split(share, [6, 11], lengths, parts=2, steps=4, seed=3)
    assert [rows_of(m) for m in again] == [rows_of(m) for m in split(share, [6, 11], lengths, 2, 4, seed=3)]


# --- a micro-batch cut into parts that pad less (batching.cut_for_padding) --------------------------------


def test_a_ragged_micro_batch_is_cut_into_parts_of_similar_length_and_a_uniform_one_is_not():
    from fastgrpo.trainer.batching import cut_for_padding

    ragged = torch.tensor([64, 10, 12, 60, 15, 40, 11, 13, 64, 14, 12, 10, 38, 12, 11, 64])
    prompts = torch.full((16,), 41)
    parts, order = cut_for_padding(prompts, ragged, torch.arange(16) // 4, 1.27, max_parts=8)
    assert sorted(order.tolist()) == list(range(16))
    # Counted by hand (prompt tokens + 1.27 per completion position + 64 per part): whole 1,528; in two
    # parts (the eight of 10 to 13 tokens, the rest) 1,238; in four 1,480, since every part then runs
    # three or four of the prompts.
    assert parts == 2
    assert sorted(int(ragged[order[p * 8 : (p + 1) * 8]].max()) for p in range(2)) == [13, 64]
    assert cut_for_padding(prompts, torch.full((16,), 30), None, 1.27, max_parts=8)[0] == 1  # nothing to gain
    assert cut_for_padding(prompts, ragged, None, 1.27, max_parts=1)[0] == 1


def ragged_micro_batch() -> tuple[dict, list[int]]:
    """(the trainer's batch of 16 rows over 4 prompts of 5 to 9 tokens, completions of 2 to 62 tokens, their
    lengths)."""
    from fastgrpo.trainer.batching import pad_rows

    g = torch.Generator().manual_seed(0)
    lengths = [60, 3, 5, 58, 4, 30, 6, 2, 61, 3, 5, 4, 28, 2, 6, 62]
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 5, 9, 6)]
    rows = [prompts[i // 4] for i in range(16)]
    completions = [torch.randint(5, 300, (n,), generator=g).tolist() for n in lengths]
    batch = {"prompt_ids": pad_rows(rows, PAD, left=True),
             "prompt_mask": pad_rows([[1] * len(p) for p in rows], 0, left=True),
             "completion_ids": pad_rows(completions, PAD),
             "completion_attention": pad_rows([[1] * n for n in lengths], 0),
             "advantages": torch.randn(16, generator=g)}
    batch["completion_mask"] = batch["completion_attention"].clone()
    return batch, lengths


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "sapo"])
def test_the_parts_of_a_micro_batch_give_the_gradient_of_the_whole(tiny_qwen2, tmp_path, loss_type):
    """The trainer's own forward and backward of 16 ragged rows, whole and cut into 4 parts."""
    from datasets import Dataset

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.trainer.batching import parts_of, split_round
    from fastgrpo.trainer.forward import prompt_groups

    # padding_free off: parts are how the padded forward pads less (the packed one has nothing to cut).
    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=4,
                        max_completion_length=64, use_vllm=False, use_cpu=True, report_to=[], loss_type=loss_type,
                        padding_free=False)
    trainer = GRPOTrainer(tiny_qwen2, lambda completions, **k: [0.0] * len(completions), args=config,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}))
    batch, lengths = ragged_micro_batch()
    index = prompt_groups(batch["prompt_ids"], batch["prompt_mask"])[1]
    grads = {}
    for max_parts in (1, 4):
        (micro,) = split_round(batch, 1, 1, index, 1.27, max_parts=max_parts)[0]
        assert len(parts_of(micro)) == max_parts
        micro["num_items_in_batch"] = torch.tensor(float(sum(lengths)))
        trainer.model.zero_grad(set_to_none=True)
        trainer._forward_backward(trainer.model, micro)
        grads[max_parts] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert (grads[4] - grads[1]).norm() / grads[1].norm() < 1e-5
