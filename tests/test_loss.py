"""The GRPO math of fastgrpo.trainer.loss against independent references.

Each reference below is written as explicit Python loops over plain floats
(math / statistics), in a different form than the vectorized code: the clipped
surrogate in its piecewise PPO form, stds with the statistics module,
gradients by central finite differences. Tensors are float64 with fixed seeds;
forward values must agree within 1e-10 (relative or absolute), gradients within
1e-6 (finite-difference error with step 1e-6 is about 1e-9).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from fastgrpo.trainer.loss import (
    LossSpec,
    aggregate,
    clip_metrics,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    policy_term,
    selective_log_softmax,
    vllm_importance_weights,
    weighted_rewards,
)
from loss_call import loss_with

FORWARD_TOL = 1e-10
GRAD_TOL = 1e-6
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def close(a: float, b: float, tol: float = FORWARD_TOL) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ---------------------------------------------------------------------------
# References (plain Python)
# ---------------------------------------------------------------------------


def reference_advantages(rewards: list[float], group_size: int, scale: str) -> tuple[list[float], float]:
    """Advantages and the fraction of groups with all-equal rewards, group by group."""
    batch_std = statistics.stdev(rewards)  # sample std (n - 1), like torch.std
    advantages, zero_std_groups = [], 0
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        zero_std_groups += std == 0.0
        for reward in group:
            centred = reward - mean
            if scale == "group":
                advantages.append(centred / (std + 1e-4))
            elif scale == "batch":
                advantages.append(centred / (batch_std + 1e-4))
            else:
                advantages.append(centred)
    return advantages, zero_std_groups / (len(rewards) // group_size)


def reference_token_objective(ratio: float, advantage: float, eps_low: float, eps_high: float) -> float:
    """PPO's clipped objective in piecewise form: the clip caps the gain in the advantage's direction."""
    if advantage >= 0:
        return min(ratio, 1 + eps_high) * advantage
    return max(ratio, 1 - eps_low) * advantage


def reference_loss(
    logps, old_logps, advantages, mask, *, loss_type, eps_low=0.2, eps_high=0.2, beta=0.0,
    ref_logps=None, max_len=None, is_weights=None, global_tokens=None, num_processes=1,
) -> float:
    """The GRPO loss, token by token, from nested lists. old_logps and is_weights are constants."""
    batch, length = len(logps), len(logps[0])
    sequence_sums, sequence_counts = [], []
    for b in range(batch):
        total, count = 0.0, 0
        for t in range(length):
            if not mask[b][t]:
                continue
            ratio = math.exp(logps[b][t] - old_logps[b][t])
            token_loss = -reference_token_objective(ratio, advantages[b], eps_low, eps_high)
            if is_weights is not None:
                token_loss *= is_weights[b][t]
            if beta != 0.0:
                d = ref_logps[b][t] - logps[b][t]
                token_loss += beta * (math.exp(d) - d - 1)
            total += token_loss
            count += 1
        sequence_sums.append(total)
        sequence_counts.append(count)

    all_tokens = sum(sequence_counts)
    if loss_type == "grpo":
        return sum(s / max(c, 1) for s, c in zip(sequence_sums, sequence_counts)) / batch
    if loss_type == "bnpo":
        return sum(sequence_sums) / max(all_tokens, 1)
    if loss_type == "dr_grpo":
        return sum(sequence_sums) / (batch * max_len)
    if loss_type == "dapo":
        tokens = all_tokens if global_tokens is None else global_tokens
        return sum(sequence_sums) / (tokens / num_processes)
    raise AssertionError(loss_type)


def finite_difference_grad(f, values: list[list[float]], step: float = 1e-6) -> list[list[float]]:
    """Central differences of f(nested list) -> float, entry by entry."""
    grad = [[0.0] * len(row) for row in values]
    for b in range(len(values)):
        for t in range(len(values[b])):
            plus = [row[:] for row in values]
            minus = [row[:] for row in values]
            plus[b][t] += step
            minus[b][t] -= step
            grad[b][t] = (f(plus) - f(minus)) / (2 * step)
    return grad


def reference_log_softmax_pick(row: list[float], index: int) -> float:
    top = max(row)
    return row[index] - (top + math.log(sum(math.exp(x - top) for x in row)))


def reference_entropy(row: list[float]) -> float:
    top = max(row)
    weights = [math.exp(x - top) for x in row]
    total = sum(weights)
    return -sum((w / total) * math.log(w / total) for w in weights)


# ---------------------------------------------------------------------------
# Fixtures: a random batch with ragged completion lengths
# ---------------------------------------------------------------------------


def make_batch(seed: int, batch: int = 6, length: int = 7, spread: float = 0.5):
    """logps, old logps that differ enough to cross the clip range, ragged mask, signed advantages."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    old_logps = logps + (torch.rand(batch, length, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = [length, 1, 4, 0, length - 1, 3][:batch]  # includes an empty completion
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return logps, old_logps, advantages, mask


def rows(t: torch.Tensor) -> list:
    return t.tolist()


# ---------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(scale):
    g = torch.Generator().manual_seed(0)
    group_size = 4
    rewards = torch.randn(5 * group_size, generator=g, dtype=torch.float64)
    rewards[4:8] = 0.5  # one group with all-equal rewards: no signal
    rewards[12:16] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)

    advantages, stats = group_advantages(rewards, group_size, scale)
    expected, expected_frac_zero = reference_advantages(rows(rewards), group_size, scale)

    for got, want in zip(rows(advantages), expected):
        assert close(got, want)
    assert all(a == 0.0 for a in rows(advantages)[4:8])
    assert close(stats["frac_reward_zero_std"].item(), expected_frac_zero)
    assert expected_frac_zero == pytest.approx(1 / 5)
    for i, group_std in enumerate(rows(stats["group_std"])):
        start = i // group_size * group_size
        assert close(group_std, statistics.stdev(rows(rewards)[start : start + group_size]))
    assert close(stats["reward"].item(), statistics.fmean(rows(rewards)))
    # TRL 1.16 logs the std of the batch's rewards in every mode.
    assert close(stats["reward_std"].item(), statistics.stdev(rows(rewards)))


def test_group_advantages_sum_to_zero_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0])
    advantages, _ = group_advantages(rewards, num_generations=2, scale_rewards="none")
    assert advantages.view(3, 2).sum(dim=1).abs().max() < 1e-7
    # "group" scaling with n=2: |a| = (d/2) / (d/sqrt(2) + 1e-4), about 1/sqrt(2)
    advantages, _ = group_advantages(rewards, num_generations=2, scale_rewards="group")
    assert advantages[0].item() == pytest.approx(1 / math.sqrt(2), rel=1e-3)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"number of completions \(10\) must be a multiple of num_generations \(4\)"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="num_generations must be at least 1"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(torch.zeros(4), 2, "mean")
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(torch.zeros(4, 1), 2)


def test_weighted_rewards_match_reference():
    nan = math.nan
    per_func = [
        [1.0, 0.5, nan],
        [0.0, nan, nan],
        [nan, nan, nan],  # no function applies: unscorable, reward NaN
        [2.0, -1.0, 3.0],
        [nan, 0.25, 1.0],
    ]
    weights = [1.0, 0.5, 2.0]
    rewards, stats = weighted_rewards(torch.tensor(per_func, dtype=torch.float64), torch.tensor(weights))

    for got, row in zip(rows(rewards), per_func):
        if all(math.isnan(r) for r in row):
            assert math.isnan(got)
            continue
        want = sum(w * r for w, r in zip(weights, row) if not math.isnan(r))
        assert close(got, want)
    for f in range(3):
        applied = [row[f] for row in per_func if not math.isnan(row[f])]
        assert close(stats["mean"][f].item(), statistics.fmean(applied))
        assert close(stats["std"][f].item(), statistics.stdev(applied))

    # A function that applied once has a mean but no sample std; one that never applied has neither.
    _, stats = weighted_rewards(torch.tensor([[1.0, nan], [nan, nan]]), torch.ones(2))
    assert stats["mean"][0].item() == 1.0 and math.isnan(stats["std"][0].item())
    assert math.isnan(stats["mean"][1].item())


def test_weighted_rewards_errors():
    with pytest.raises(ValueError, match="one entry per reward function \\(2\\)"):
        weighted_rewards(torch.zeros(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="per_func_rewards must have shape"):
        weighted_rewards(torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------


def test_selective_log_softmax_matches_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 4
    token_ids = torch.randint(0, 11, (3, 5), generator=g)
    for chunk_tokens in (1, 4, 1024):  # chunks that split rows unevenly, and one chunk for all
        logps = selective_log_softmax(logits, token_ids, chunk_tokens=chunk_tokens)
        assert logps.dtype == torch.float64
        for b in range(3):
            for t in range(5):
                want = reference_log_softmax_pick(rows(logits[b, t]), int(token_ids[b, t]))
                assert close(logps[b, t].item(), want)


def test_selective_log_softmax_gradient():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    token_ids = torch.randint(0, 7, (2, 3), generator=g)
    # gradcheck compares the hand-written backward with finite differences.
    assert torch.autograd.gradcheck(lambda x: selective_log_softmax(x, token_ids, chunk_tokens=4), (logits,))
    # And with autograd through the plain formula, for a random upstream gradient.
    upstream = torch.randn(2, 3, generator=g, dtype=torch.float64)
    (selective_log_softmax(logits, token_ids, chunk_tokens=2) * upstream).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (torch.log_softmax(logits, -1).gather(-1, token_ids[..., None]).squeeze(-1) * upstream).sum().backward()
    assert torch.allclose(ours, logits.grad, atol=1e-12)


def test_selective_log_softmax_bfloat16_is_computed_in_float32():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 4, 300, generator=g) * 5).to(torch.bfloat16).requires_grad_()
    token_ids = torch.randint(0, 300, (2, 4), generator=g)
    logps = selective_log_softmax(logits, token_ids, chunk_tokens=3)
    assert logps.dtype == torch.float32
    # Reference on the same (bf16-rounded) numbers in float64: float32 accuracy, not bf16's.
    for b in range(2):
        for t in range(4):
            want = reference_log_softmax_pick(rows(logits[b, t].double()), int(token_ids[b, t]))
            assert abs(logps[b, t].item() - want) < 1e-5
    logps.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    expected_grad = -torch.softmax(logits.double(), -1).detach()
    expected_grad.scatter_add_(-1, token_ids[..., None], torch.ones(2, 4, 1, dtype=torch.float64))
    assert (logits.grad.double() - expected_grad).abs().max() < 1e-2  # bf16 has 8 bits of mantissa


def test_entropy_from_logits_matches_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 3
    logits[0, 0] = 0.0  # uniform: entropy log(9)
    for chunk_tokens in (1, 4, 1024):
        entropy = entropy_from_logits(logits, chunk_tokens=chunk_tokens)
        assert entropy.shape == (2, 3)
        for b in range(2):
            for t in range(3):
                assert close(entropy[b, t].item(), reference_entropy(rows(logits[b, t])))
    assert close(entropy[0, 0].item(), math.log(9))
    assert entropy_from_logits(logits.to(torch.bfloat16)).dtype == torch.float32


def test_logit_helpers_errors():
    with pytest.raises(ValueError, match="token_ids must have the shape of logits without the vocabulary"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), chunk_tokens=0)


# ---------------------------------------------------------------------------
# The loss: values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_on_policy_matches_reference(loss_type):
    """num_iterations == 1: old = current, ratio == 1, no clipping."""
    logps, _, advantages, mask = make_batch(seed=10)
    loss, metrics = loss_with(logps, None, advantages, mask, loss_type=loss_type, max_completion_length=7)
    want = reference_loss(rows(logps), rows(logps), rows(advantages), rows(mask), loss_type=loss_type, max_len=7)
    assert close(loss.item(), want)
    assert metrics["clip_ratio/region_mean"].item() == 0.0
    assert "kl" not in metrics and not any(k.startswith("sampling/") for k in metrics)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.1, 0.28)])
def test_loss_with_clipping_matches_reference(loss_type, eps_low, eps_high):
    logps, old_logps, advantages, mask = make_batch(seed=11, spread=0.6)
    loss, metrics = loss_with(
        logps, old_logps, advantages, mask, loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, max_completion_length=9,
    )
    want = reference_loss(
        rows(logps), rows(old_logps), rows(advantages), rows(mask),
        loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, max_len=9,
    )
    assert close(loss.item(), want)

    # Clip fractions: count the tokens, one by one, where the clip binds.
    low = high = tokens = 0
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if mask[b, t]:
                ratio = math.exp(logps[b, t].item() - old_logps[b, t].item())
                low += ratio < 1 - eps_low and advantages[b].item() < 0
                high += ratio > 1 + eps_high and advantages[b].item() > 0
                tokens += 1
    assert low > 0 and high > 0, "the fixture must put ratios outside the clip range on both sides"
    assert close(metrics["clip_ratio/low_mean"].item(), low / tokens)
    assert close(metrics["clip_ratio/high_mean"].item(), high / tokens)
    assert close(metrics["clip_ratio/region_mean"].item(), (low + high) / tokens)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_with_kl_matches_reference(loss_type):
    logps, old_logps, advantages, mask = make_batch(seed=12)
    g = torch.Generator().manual_seed(13)
    ref_logps = logps + torch.randn(logps.shape, generator=g, dtype=torch.float64) * 0.3
    beta = 0.04
    loss, metrics = loss_with(
        logps, old_logps, advantages, mask, loss_type=loss_type, beta=beta,
        ref_per_token_logps=ref_logps, max_completion_length=7,
    )
    want = reference_loss(
        rows(logps), rows(old_logps), rows(advantages), rows(mask), loss_type=loss_type,
        beta=beta, ref_logps=rows(ref_logps), max_len=7,
    )
    assert close(loss.item(), want)

    kls = [
        math.exp(r - p) - (r - p) - 1
        for lp_row, ref_row, m_row in zip(rows(logps), rows(ref_logps), rows(mask))
        for p, r, m in zip(lp_row, ref_row, m_row) if m
    ]
    assert all(kl >= 0 for kl in kls)
    assert close(metrics["kl"].item(), statistics.fmean(kls))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True])
def test_loss_with_importance_sampling_matches_reference(loss_type, with_old):
    logps, old_logps, advantages, mask = make_batch(seed=14)
    g = torch.Generator().manual_seed(15)
    # The generator's logps: close to the trainer's, a few far below (ratio above the cap).
    sampling_logps = logps + torch.randn(logps.shape, generator=g, dtype=torch.float64) * 0.2
    sampling_logps[0, :3] -= 2.0
    sampling_logps[mask == 0] = -math.inf  # what a generator may put in padding
    cap = 2.0
    ref_logps = logps - 0.1
    loss, metrics = loss_with(
        logps, old_logps if with_old else None, advantages, mask, loss_type=loss_type,
        beta=0.1, ref_per_token_logps=ref_logps, max_completion_length=7,
        sampling_per_token_logps=sampling_logps, vllm_is_mode="token_truncate", vllm_is_clip_max=cap,
    )
    # The weights use the old policy's logps, or (num_iterations == 1) the current ones.
    base = old_logps if with_old else logps
    weights = [
        [min(math.exp(base[b, t].item() - sampling_logps[b, t].item()), cap) if mask[b, t] else 0.0 for t in range(7)]
        for b in range(6)
    ]
    want = reference_loss(
        rows(logps), rows(base), rows(advantages), rows(mask), loss_type=loss_type,
        beta=0.1, ref_logps=rows(ref_logps), max_len=7, is_weights=weights,
    )
    assert math.isfinite(loss.item())
    assert close(loss.item(), want)

    on_tokens = [w for w_row, m_row in zip(weights, rows(mask)) for w, m in zip(w_row, m_row) if m]
    assert max(on_tokens) == cap and min(on_tokens) < 1.0
    assert close(metrics["sampling/importance_sampling_ratio/mean"].item(), statistics.fmean(on_tokens))
    assert close(metrics["sampling/importance_sampling_ratio/min"].item(), min(on_tokens))
    assert close(metrics["sampling/importance_sampling_ratio/max"].item(), max(on_tokens))
    differences = [
        abs(base[b, t].item() - sampling_logps[b, t].item()) for b in range(6) for t in range(7) if mask[b, t]
    ]
    assert close(metrics["sampling/sampling_logp_difference/mean"].item(), statistics.fmean(differences))
    assert close(metrics["sampling/sampling_logp_difference/max"].item(), max(differences))


def test_importance_weights_without_tokens():
    weights, metrics = vllm_importance_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                                               mode="token_truncate")
    assert weights.shape == (2, 3)
    assert all(v.item() == 0.0 for v in metrics.values())


def test_dapo_normalizer_is_global_across_processes():
    """Two processes with half the batch each: DDP's mean of their gradients is that of sum / global tokens."""
    logps, old_logps, advantages, mask = make_batch(seed=16)
    global_tokens = int(mask.sum())
    whole = reference_loss(rows(logps), rows(old_logps), rows(advantages), rows(mask), loss_type="dapo")

    per_process = []
    for part in (slice(0, 3), slice(3, 6)):
        loss, _ = loss_with(
            logps[part], old_logps[part], advantages[part], mask[part], loss_type="dapo",
            num_items_in_batch=torch.tensor(global_tokens), num_processes=2,
        )
        per_process.append(loss.item())
    assert close(sum(per_process) / 2, whole)
    # Without the global count, each process normalizes by its own tokens: not the same.
    local, _ = loss_with(logps[:3], old_logps[:3], advantages[:3], mask[:3], loss_type="dapo")
    assert close(local.item(), reference_loss(
        rows(logps[:3]), rows(old_logps[:3]), rows(advantages[:3]), rows(mask[:3]), loss_type="dapo"))


def test_padding_values_do_not_leak():
    """Whatever sits in padded positions (inf, NaN) changes neither the loss nor the gradient."""
    logps, old_logps, advantages, mask = make_batch(seed=17)
    clean = logps.clone().requires_grad_()
    loss_clean, _ = loss_with(
        clean, old_logps, advantages, mask, loss_type="grpo", beta=0.1, ref_per_token_logps=old_logps
    )
    loss_clean.backward()

    dirty_values = logps.clone()
    dirty_values[mask == 0] = math.nan
    dirty = dirty_values.requires_grad_()
    dirty_old = old_logps.clone()
    dirty_old[mask == 0] = math.inf
    loss_dirty, metrics = loss_with(
        dirty, dirty_old, advantages, mask, loss_type="grpo", beta=0.1, ref_per_token_logps=dirty_old
    )
    loss_dirty.backward()
    assert loss_dirty.item() == loss_clean.item()
    assert torch.equal(dirty.grad, clean.grad)
    assert all(math.isfinite(v.item()) for v in metrics.values())


# ---------------------------------------------------------------------------
# The loss: gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", ["on_policy", "clipped", "kl_and_is", "on_policy_kl_and_is"])
def test_loss_gradient_matches_finite_differences(loss_type, case):
    logps, old_logps, advantages, mask = make_batch(seed=20, spread=0.6)
    g = torch.Generator().manual_seed(21)
    ref_logps = logps + torch.randn(logps.shape, generator=g, dtype=torch.float64) * 0.3
    sampling_logps = logps + torch.randn(logps.shape, generator=g, dtype=torch.float64) * 0.5
    on_policy = case.startswith("on_policy")
    with_extras = case.endswith("kl_and_is")
    beta = 0.05 if with_extras else 0.0

    x = logps.clone().requires_grad_()
    loss, _ = loss_with(
        x, None if on_policy else old_logps, advantages, mask, loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.28, beta=beta,
        ref_per_token_logps=ref_logps if with_extras else None, max_completion_length=7,
        sampling_per_token_logps=sampling_logps if with_extras else None, vllm_is_mode="token_truncate",
        vllm_is_clip_max=2.0,
    )
    loss.backward()

    # The reference holds old logps and IS weights fixed (they are detached in the loss):
    # for num_iterations == 1 they are the current logps at the point of evaluation.
    base = logps if on_policy else old_logps
    weights = None
    if with_extras:
        weights = [
            [min(math.exp(o - s), 2.0) for o, s in zip(o_row, s_row)]
            for o_row, s_row in zip(rows(base), rows(sampling_logps))
        ]

    def f(values):
        return reference_loss(
            values, rows(base), rows(advantages), rows(mask), loss_type=loss_type, eps_low=0.2, eps_high=0.28,
            beta=beta, ref_logps=rows(ref_logps), max_len=7, is_weights=weights,
        )

    want = finite_difference_grad(f, rows(logps))
    for b in range(6):
        for t in range(7):
            assert abs(x.grad[b, t].item() - want[b][t]) < GRAD_TOL, (b, t)
            if not mask[b, t]:
                assert x.grad[b, t].item() == 0.0


# ---------------------------------------------------------------------------
# The loss's pieces alone, each against its reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.1, 0.28)])
def test_policy_term_is_the_clipped_objective_token_by_token(eps_low, eps_high):
    logps, old_logps, advantages, mask = make_batch(seed=40, spread=0.6)
    spec = LossSpec("grpo", epsilon_low=eps_low, epsilon_high=eps_high)
    term, ratio, _ = policy_term(spec, logps, old_logps, advantages[:, None], mask.bool(), None)
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            r = math.exp(logps[b, t].item() - old_logps[b, t].item())
            assert close(ratio[b, t].item(), r)
            assert close(term[b, t].item(), -reference_token_objective(r, advantages[b].item(), eps_low, eps_high))


def test_kl_penalty_is_the_k3_estimator_and_its_bias_correction_multiplies_by_the_ratio():
    logps, ref_logps, _, _ = make_batch(seed=41)
    ratio = torch.rand(logps.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    plain, corrected = kl_penalty(ref_logps, logps, ratio, False), kl_penalty(ref_logps, logps, ratio, True)
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            d = ref_logps[b, t].item() - logps[b, t].item()
            assert close(plain[b, t].item(), math.exp(d) - d - 1)
            assert close(corrected[b, t].item(), (math.exp(d) - d - 1) * ratio[b, t].item())


@pytest.mark.parametrize("loss_type", ["grpo", "sapo", "luspo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo"])
def test_aggregate_divides_by_each_loss_types_normaliser(loss_type):
    _, _, _, mask = make_batch(seed=42)
    per_token = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    masked, m = (per_token * mask).tolist(), mask.tolist()
    sums, counts = [sum(row) for row in masked], [sum(row) for row in m]
    want = {"grpo": sum(s / max(c, 1) for s, c in zip(sums, counts)) / len(sums),
            "luspo": sum(sums) / len(sums), "bnpo": sum(sums) / sum(counts), "dr_grpo": sum(sums) / (len(sums) * 7),
            "dapo": sum(sums) / (50 / 2)}
    want["sapo"], want["cispo"], want["vespo"] = want["grpo"], want["dapo"], want["dapo"]
    got = aggregate(loss_type, per_token * mask, mask.to(per_token.dtype), 7, 50, num_processes=2)
    assert close(got.item(), want[loss_type])


def test_clip_metrics_count_only_the_tokens_the_clip_binds_in_the_advantages_direction():
    ratio = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]], dtype=torch.float64)
    advantage = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the last token is padding
    metrics = clip_metrics(ratio, advantage, mask, 0.2, 0.2)
    # Row 0 (A < 0): 0.5 is clipped low, 1.5 is not (the clip binds only downwards). Row 1 (A > 0): 0.5 is
    # not clipped; 1.5 would be, but it is padding. 1 of 5 real tokens is clipped.
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert metrics["clip_ratio/high_mean"].item() == 0.0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(1 / 5)


# ---------------------------------------------------------------------------
# The loss: invalid inputs
# ---------------------------------------------------------------------------


def test_loss_errors():
    logps, old_logps, advantages, mask = make_batch(seed=30)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        loss_with(logps, None, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="pass max_completion_length"):
        loss_with(logps, None, advantages, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="pass ref_per_token_logps"):
        loss_with(logps, None, advantages, mask, loss_type="grpo", beta=0.1)
    with pytest.raises(ValueError, match=r"advantages must have shape \[batch\] = \(6,\)"):
        loss_with(logps, None, advantages[:5], mask, loss_type="grpo")
    with pytest.raises(ValueError, match="completion_mask must have the shape of per_token_logps"):
        loss_with(logps, None, advantages, mask[:, :5], loss_type="grpo")
    with pytest.raises(ValueError, match="old_per_token_logps must have the shape"):
        loss_with(logps, old_logps[:, :5], advantages, mask, loss_type="grpo")
    with pytest.raises(ValueError, match="ref_per_token_logps must have the shape"):
        loss_with(logps, None, advantages, mask, loss_type="grpo", beta=0.1, ref_per_token_logps=logps[:3])
    with pytest.raises(ValueError, match="sampling_per_token_logps must have the shape"):
        loss_with(logps, None, advantages, mask, loss_type="grpo", sampling_per_token_logps=logps[:, :2])
    with pytest.raises(ValueError, match="importance sampling clip must be positive"):
        loss_with(logps, None, advantages, mask, loss_type="grpo", sampling_per_token_logps=logps,
                  vllm_is_clip_max=0)
    with pytest.raises(ValueError, match="epsilon_low and epsilon_high must be >= 0"):
        loss_with(logps, None, advantages, mask, loss_type="grpo", epsilon_low=-0.1)
    with pytest.raises(ValueError, match="num_processes must be >= 1"):
        loss_with(logps, None, advantages, mask, loss_type="dapo", num_processes=0)
    with pytest.raises(ValueError, match=r"per_token_logps must have shape \[batch, completion_tokens\]"):
        loss_with(logps[0], None, advantages, mask, loss_type="grpo")
