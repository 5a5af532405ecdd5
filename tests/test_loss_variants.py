"""TRL's newer GRPO options in fastgrpo.trainer.loss against a plain-Python reference.

The reference below walks completions and tokens one at a time with `math`, from the
definitions in TRL's documentation: GSPO's sequence-level ratio (exp of the mean token
log-ratio), CISPO (a clipped, detached weight on -A * logp), SAPO (a sigmoid gate with
temperatures by advantage sign), delta (a cap on the unclipped ratio), the four vLLM
importance-sampling modes (token or sequence ratio, truncated or masked), the off-policy
mask and the entropy mask. Float64 inputs; values within 1e-10, gradients within 1e-6 of
central finite differences (step 1e-6: error about 1e-9).
"""

import math

import pytest
import torch

from fastgrpo.trainer.loss import entropy_threshold, vllm_importance_weights
from loss_call import loss_with
from test_loss import finite_difference_grad as finite_difference

TOL = 1e-10
GRAD_TOL = 1e-6


def close(a, b, tol=TOL):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def make_batch(seed: int, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(6, 7, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(6, 7, generator=g, dtype=torch.float64) - 0.5) * 2 * spread
    sampling = old + torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.4
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9, -0.2], dtype=torch.float64)
    mask = torch.zeros(6, 7, dtype=torch.long)
    for b, n in enumerate([7, 1, 4, 0, 6, 3]):  # ragged, with an empty completion
        mask[b, :n] = 1
    return logps, old, sampling, advantages, mask


def ref_is_weights(old, sampling, mask, mode, clip_min, clip_max):
    """Per token weight lists: a sequence mode repeats its completion's one weight on every token."""
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    out, counted = [], []
    for b in range(len(old)):
        tokens = [t for t in range(len(old[b])) if mask[b][t]]
        if mode.startswith("sequence"):
            ratios = [math.exp(sum(old[b][t] - sampling[b][t] for t in tokens))] * len(old[b])
        else:
            ratios = [math.exp(old[b][t] - sampling[b][t]) if mask[b][t] else 1.0 for t in range(len(old[b]))]
        if mode.endswith("truncate"):
            weights = [min(max(r, low), high) for r in ratios]
        else:
            weights = [r if low <= r <= high else 0.0 for r in ratios]
        out.append(weights)
        counted += [weights[0]] if mode.startswith("sequence") else [weights[t] for t in tokens]
    return out, counted


def reference(logps, old, advantages, mask, *, loss_type, level="token", eps_low=0.2, eps_high=0.2, delta=None,
              tau_pos=1.0, tau_neg=1.05, is_weights=None, off_policy=None, sampling=None, entropy_keep=None,
              beta=0.0, ref=None, max_len=7, global_tokens=None, num_processes=1):
    sums, counts = [], []
    for b in range(len(logps)):
        tokens = [t for t in range(len(logps[b])) if mask[b][t]]
        a = advantages[b]
        seq_log_ratio = sum(logps[b][t] - old[b][t] for t in tokens) / max(len(tokens), 1)
        keep_sequence = 1.0
        if off_policy is not None:
            behaviour = old if sampling is None else sampling
            divergence = sum(behaviour[b][t] - logps[b][t] for t in tokens) / max(len(tokens), 1)
            keep_sequence = 0.0 if (a < 0 and divergence > off_policy) else 1.0
        total = 0.0
        for t in tokens:
            r = math.exp(seq_log_ratio if level == "sequence" else logps[b][t] - old[b][t])
            if loss_type == "cispo":
                loss = -min(r, eps_high) * a * logps[b][t]
            elif loss_type == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                loss = -(1 / (1 + math.exp(-tau * (r - 1)))) * 4 / tau * a
            else:
                capped = r if delta is None else min(r, delta)
                clipped = min(max(r, 1 - eps_low), 1 + eps_high)
                loss = -min(capped * a, clipped * a)
            loss *= keep_sequence
            if entropy_keep is not None:
                loss *= entropy_keep[b][t]
            if is_weights is not None:
                loss *= is_weights[b][t]
            if beta:
                d = ref[b][t] - logps[b][t]
                loss += beta * (math.exp(d) - d - 1)
            total += loss
        sums.append(total)
        counts.append(len(tokens))
    if loss_type in ("grpo", "sapo"):
        return sum(s / max(c, 1) for s, c in zip(sums, counts)) / len(sums)
    if loss_type == "bnpo":
        return sum(sums) / max(sum(counts), 1)
    if loss_type == "dr_grpo":
        return sum(sums) / (len(sums) * max_len)
    tokens = sum(counts) if global_tokens is None else global_tokens
    return sum(sums) / (tokens / num_processes)


def L(t):
    return t.tolist()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_sequence_level_ratio_gspo(loss_type):
    logps, old, _, advantages, mask = make_batch(1, spread=0.3)
    old += torch.tensor([-0.3, 0.3, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)[:, None]  # completions 0, 1: clipped
    x = logps.clone().requires_grad_()
    loss, metrics = loss_with(x, old, advantages, mask, loss_type=loss_type, importance_sampling_level="sequence",
                              epsilon_low=0.05, epsilon_high=0.08, max_completion_length=7)
    f = lambda v: reference(v, L(old), L(advantages), L(mask), loss_type=loss_type, level="sequence",  # noqa: E731
                            eps_low=0.05, eps_high=0.08)
    assert close(loss.item(), f(L(logps)))
    loss.backward()
    grad = finite_difference(f, L(logps))
    assert max(abs(x.grad[b, t].item() - grad[b][t]) for b in range(6) for t in range(7)) < GRAD_TOL
    # The clip binds by completion: a completion's tokens are all clipped or none.
    assert 0 < metrics["clip_ratio/region_mean"].item() < 1


def test_cispo_weights_minus_advantage_logp_with_a_held_clipped_weight():
    logps, old, _, advantages, mask = make_batch(2, spread=1.5)
    x = logps.clone().requires_grad_()
    loss, metrics = loss_with(x, old, advantages, mask, loss_type="cispo", epsilon_high=1.2,
                              num_items_in_batch=40, num_processes=2)
    assert close(loss.item(), reference(L(logps), L(old), L(advantages), L(mask), loss_type="cispo", eps_high=1.2,
                                        global_tokens=40, num_processes=2))
    loss.backward()
    # The weight min(r, eps_high) is a constant: d loss / d logp_t = -w_t * A / (tokens / processes).
    clipped = tokens = 0
    for b in range(6):
        for t in range(7):
            w = min(math.exp(logps[b, t].item() - old[b, t].item()), 1.2)
            want = -w * advantages[b].item() / 20 if mask[b, t] else 0.0
            assert abs(x.grad[b, t].item() - want) < 1e-12
            if mask[b, t]:
                tokens += 1
                clipped += math.exp(logps[b, t].item() - old[b, t].item()) > 1.2 and advantages[b].item() > 0
    assert clipped > 0 and close(metrics["cispo_clip_ratio"].item(), clipped / tokens)


def test_sapo_gate_with_temperatures_by_advantage_sign():
    logps, old, _, advantages, mask = make_batch(3)
    x = logps.clone().requires_grad_()
    loss, _ = loss_with(x, old, advantages, mask, loss_type="sapo", sapo_temperature_pos=0.7,
                        sapo_temperature_neg=1.6)
    f = lambda v: reference(v, L(old), L(advantages), L(mask), loss_type="sapo", tau_pos=0.7, tau_neg=1.6)  # noqa: E731
    assert close(loss.item(), f(L(logps)))
    loss.backward()
    grad = finite_difference(f, L(logps))
    assert max(abs(x.grad[b, t].item() - grad[b][t]) for b in range(6) for t in range(7)) < GRAD_TOL
    # On-policy (r = 1) the gate's slope is 1 whatever tau: the gradient is GRPO's.
    y = logps.clone().requires_grad_()
    z = logps.clone().requires_grad_()
    loss_with(y, None, advantages, mask, loss_type="sapo", sapo_temperature_neg=3.0)[0].backward()
    loss_with(z, None, advantages, mask, loss_type="grpo")[0].backward()
    assert torch.allclose(y.grad, z.grad, atol=1e-12)


def test_delta_caps_the_unclipped_ratio_of_negative_advantages():
    logps, old, _, advantages, mask = make_batch(4, spread=2.0)
    loss, _ = loss_with(logps, old, advantages, mask, loss_type="dapo", delta=1.5)
    want = reference(L(logps), L(old), L(advantages), L(mask), loss_type="dapo", delta=1.5)
    without = reference(L(logps), L(old), L(advantages), L(mask), loss_type="dapo")
    assert close(loss.item(), want)
    assert not close(want, without)  # the fixture has ratios above delta where A < 0


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 1.5)])
def test_vllm_importance_sampling_modes(mode, clip):
    logps, old, sampling, advantages, mask = make_batch(5)
    sampling[mask == 0] = -math.inf  # what a generator may leave in padding
    loss, metrics = loss_with(logps, old, advantages, mask, loss_type="grpo", sampling_per_token_logps=sampling,
                              vllm_is_mode=mode, vllm_is_clip_min=clip[0], vllm_is_clip_max=clip[1])
    weights, counted = ref_is_weights(L(old), L(sampling), L(mask), mode, *clip)
    assert close(loss.item(), reference(L(logps), L(old), L(advantages), L(mask), loss_type="grpo", is_weights=weights))
    assert close(metrics["sampling/importance_sampling_ratio/mean"].item(), sum(counted) / len(counted))
    assert close(metrics["sampling/importance_sampling_ratio/max"].item(), max(counted))
    if clip == (0.5, 1.5):  # the fixture puts ratios on both sides: truncating and masking differ
        assert (min(counted) == 0.0) == mode.endswith("mask")


def test_importance_weights_refuse_a_truncation_without_bounds_and_a_reversed_clip():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="give clip_max"):
        vllm_importance_weights(x, x, x, "token_truncate", None, None)
    with pytest.raises(ValueError, match="clip_min < clip_max"):
        vllm_importance_weights(x, x, x, "token_mask", 2.0, 1.0)
    with pytest.raises(ValueError, match="must be one of"):
        vllm_importance_weights(x, x, x, "token", None, 3.0)


def test_off_policy_mask_drops_negative_advantage_completions_far_from_the_sampler():
    logps, old, sampling, advantages, mask = make_batch(6)
    sampling[1] += 3.0  # completion 1 (A < 0): the sampler found it far likelier than the policy does
    loss, _ = loss_with(logps, old, advantages, mask, loss_type="bnpo", sampling_per_token_logps=sampling,
                        vllm_is_mode="token_truncate", vllm_is_clip_max=3.0, off_policy_mask_threshold=0.5)
    weights, _ = ref_is_weights(L(old), L(sampling), L(mask), "token_truncate", None, 3.0)
    want = reference(L(logps), L(old), L(advantages), L(mask), loss_type="bnpo", is_weights=weights, off_policy=0.5,
                     sampling=L(sampling))
    assert close(loss.item(), want)
    unmasked = reference(L(logps), L(old), L(advantages), L(mask), loss_type="bnpo", is_weights=weights)
    assert not close(want, unmasked)


def test_entropy_mask_keeps_the_top_quantile():
    entropies = torch.tensor([0.1, 0.5, 0.9, 1.3, 2.0, 0.7, 0.3, 1.1], dtype=torch.float64)
    # torch.quantile interpolates linearly between order statistics (numpy's default): the reference.
    ordered = sorted(entropies.tolist())
    position = (len(ordered) - 1) * (1 - 0.25)
    below, frac = int(position), position - int(position)
    want = ordered[below] + (ordered[below + 1] - ordered[below]) * frac
    assert close(entropy_threshold(entropies, 0.25).item(), want)
    assert (entropies >= entropy_threshold(entropies, 0.25)).sum() == 2
    assert entropy_threshold(entropies, 1.0).item() == min(ordered)  # every token
    assert entropy_threshold(entropies, 0.0).item() == max(ordered)  # only the highest
    assert entropy_threshold(torch.tensor([]), 0.5).item() == math.inf

    logps, old, _, advantages, mask = make_batch(7)
    keep = (torch.rand(6, 7, generator=torch.Generator().manual_seed(8)) > 0.5)
    loss, _ = loss_with(logps, old, advantages, mask, loss_type="dr_grpo", max_completion_length=7, entropy_mask=keep)
    assert close(loss.item(), reference(L(logps), L(old), L(advantages), L(mask), loss_type="dr_grpo",
                                        entropy_keep=L(keep.double())))

