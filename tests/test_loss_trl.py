"""TRL 1.16 parity of fastgrpo.trainer.loss: luspo, vespo, the bias-corrected KL, the entropy bonus and
its controller, unscorable rows, normalize_then_sum, and TRL's static helpers.

Two kinds of reference. Where TRL has a static helper (GRPOTrainer.get_gamma_weights,
get_off_policy_mask, and get_high_entropy_mask called on a one-process stand-in for the
accelerator), TRL's own code, imported from the installed trl==1.16.0, is the reference. Everything
else is checked against plain-Python loops over floats (math, statistics) written from TRL's
definitions, and gradients against central finite differences or torch.autograd on the textbook
formula. Tensors are float64; each tolerance is justified where it is used.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_loss import finite_difference_grad

from test_loss_variants import make_batch  # the same ragged batch (one empty completion)
from fastgrpo.trainer.loss import (
    GLOBALLY_NORMALISED,
    LOSS_TYPES,
    AdaptiveEntropy,
    entropy_bonus,
    entropy_from_logits,
    get_gamma_weights,
    get_high_entropy_mask,
    get_off_policy_mask,
    group_advantages,
    normalize_then_sum_advantages,
    weighted_rewards,
)
from loss_call import loss_with

# Forward values: float64 throughout, loops and vectorised code sum a few dozen terms in different orders,
# so they agree to ~1e-14; 1e-10 leaves room without hiding a wrong term (those are >= 1e-3 here).
TOL = 1e-10
# Central differences with step 1e-6 on smooth functions of values ~1: truncation ~1e-12, rounding
# ~1e-16 / 1e-6 = 1e-10 per evaluation times the function's size; 1e-6 is far above both, far below
# any real gradient entry here (~1e-2 and up).
GRAD_TOL = 1e-6


def close(a: float, b: float, tol: float = TOL) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def L(t: torch.Tensor) -> list:
    return t.tolist()


@pytest.fixture(scope="module")
def trl_grpo():
    """TRL's GRPOTrainer class, whose static helpers are the references (nothing is instantiated)."""
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vLLM-version notices on import
        from trl.trainer.grpo_trainer import GRPOTrainer
    return GRPOTrainer


def ref_token_is_weights(old, sampling, mask, mode, clip_min, clip_max):
    """TRL's token_* vLLM weights, token by token; 1.0 on padding (never used there)."""
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    out = []
    for b in range(len(old)):
        row = []
        for t in range(len(old[b])):
            r = math.exp(old[b][t] - sampling[b][t]) if mask[b][t] else 1.0
            row.append(min(max(r, low), high) if mode == "token_truncate" else (r if low <= r <= high else 0.0))
        out.append(row)
    return out


# ---------------------------------------------------------------------------
# TRL's static helpers against TRL's own
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("params", [(2.0, 3.0, 3.0, 2.0), (1.5, 0.75, 2.5, 4.0)])
def test_gamma_weights_match_trl(trl_grpo, with_is, params):
    g = torch.Generator().manual_seed(40)
    advantages = torch.tensor([[1.3], [-0.7], [0.0], [-1.1], [0.9], [-0.2], [2.0], [-3.0]], dtype=torch.float64)
    log_ratio = torch.randn(8, 5, generator=g, dtype=torch.float64) * 0.3
    log_ratio[0, 0] = 35.0   # token clamp at 20 and the sequence's at 20: w = e^20, phi underflows to 0
    log_ratio[1, 1] = -50.0  # token clamp at -20, sequence clamp at log 1e-8
    log_ratio[6, :] = 0.0    # w = 1: phi = 1 exactly
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[3, 2:] = 0
    mask[5, :] = 0           # an empty completion: w = 1
    ratio = None
    if with_is:
        ratio = torch.exp(torch.randn(8, 5, generator=g, dtype=torch.float64) * 0.2)
        ratio[2, 1] = 0.0    # a token masked out by token_mask: log 0 -> log 1e-8
        ratio[4, 3] = 1e-12  # clamped up to 1e-8
        ratio[mask == 0] = 1.0  # TRL's ratio on padding: exp(0)
        ratio[6] = 1.0          # keeps w = 1 on row 6
    k_pos, lambda_pos, k_neg, lambda_neg = params
    ours = get_gamma_weights(advantages, log_ratio, mask, ratio, k_pos, lambda_pos, k_neg, lambda_neg)
    theirs = trl_grpo.get_gamma_weights(advantages, log_ratio, mask, ratio, k_pos=k_pos, lambda_pos=lambda_pos,
                                        k_neg=k_neg, lambda_neg=lambda_neg)
    assert ours.shape == theirs.shape == (8, 1)
    # The same float64 operations in the same order; the parameters are exact in float32 (TRL builds k and
    # lambda as float32 tensors), so agreement is to the last bits: 1e-12 relative.
    assert torch.allclose(ours, theirs.to(ours.dtype), rtol=1e-12, atol=1e-300)
    assert ours[0].item() == 0.0 and ours[6].item() == pytest.approx(1.0, abs=1e-15) == ours[5].item()
    # And one row by hand: phi = e^lambda w^k e^(-lambda w).
    log_w = sum(L(log_ratio[3, :2]))
    if with_is:
        log_w += sum(math.log(x) for x in L(ratio[3]))
    w = math.exp(log_w)
    assert close(ours[3].item(), math.exp(lambda_neg) * w ** k_neg * math.exp(-lambda_neg * w))
    # Flat advantages [B] give the same weights.
    assert torch.equal(get_gamma_weights(advantages[:, 0], log_ratio, mask, ratio, *params), ours)


def test_off_policy_mask_matches_trl(trl_grpo):
    logps, _, sampling, advantages, mask = make_batch(41)
    sampling[1] += 3.0                 # A < 0 and far from the sampler: dropped
    sampling[5, 0] = math.nan          # an unscorable token: no evidence, not a drop
    sampling[5, 1:3] += 2.0
    sampling[mask == 0] = -math.inf    # what a generator may leave in padding
    threshold = 0.5
    for m in (mask, mask.double()):
        ours = get_off_policy_mask(advantages[:, None], logps, sampling, m, threshold)
        theirs = trl_grpo.get_off_policy_mask(advantages[:, None], logps, sampling, m, threshold)
        assert ours.dtype == theirs.dtype == m.dtype and ours.shape == (6, 1)
        assert torch.equal(ours, theirs)  # the same operations: bit for bit
        assert torch.equal(get_off_policy_mask(advantages, logps, sampling, m, threshold), ours)
    # By hand: mean over the completion's scored tokens of sampler - current (NaN counted as 0).
    want = []
    for b in range(6):
        tokens = [t for t in range(7) if mask[b, t]]
        diffs = [0.0 if math.isnan(sampling[b, t].item()) else sampling[b, t].item() - logps[b, t].item()
                 for t in tokens]
        divergence = sum(diffs) / max(len(tokens), 1)
        want.append(0 if advantages[b] < 0 and divergence > threshold else 1)
    assert L(ours[:, 0].long()) == want
    assert want[1] == 0 and 0 in want and want.count(1) >= 4


def test_high_entropy_mask_matches_trl(trl_grpo):
    g = torch.Generator().manual_seed(42)
    entropies = torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    entropies[0, 1] = entropies[2, 3]  # a tie at the threshold
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, :] = 0
    other_rank = torch.rand(9, generator=g) * 3  # another process's completion-token entropies
    one_process = SimpleNamespace(accelerator=SimpleNamespace(pad_across_processes=lambda t, dim, pad_index: t,
                                                              gather=lambda t: t))
    two_processes = SimpleNamespace(accelerator=SimpleNamespace(
        pad_across_processes=lambda t, dim, pad_index: t, gather=lambda t: torch.cat([t, other_rank])))
    for threshold in (0.0, 0.2, 0.5, 0.8, 1.0):
        ours = get_high_entropy_mask(entropies, mask, threshold)
        theirs = trl_grpo.get_high_entropy_mask(one_process, entropies, mask, threshold)
        assert ours.dtype == torch.bool and torch.equal(ours, theirs)
        gathered = torch.cat([entropies[mask.bool()].float(), other_rank])
        ours = get_high_entropy_mask(entropies, mask, threshold, gathered_entropies=gathered)
        assert torch.equal(ours, trl_grpo.get_high_entropy_mask(two_processes, entropies, mask, threshold))
    # Threshold 0.5 by hand: the median of the 15 completion tokens (an order statistic: no interpolation),
    # rounded to float32 as TRL takes the quantile in float32; kept: completion tokens at or above it.
    kept = get_high_entropy_mask(entropies, mask, 0.5)
    cut = torch.tensor(statistics.median(entropies[mask.bool()].tolist()), dtype=torch.float32).item()
    want = [[bool(mask[b, t]) and entropies[b, t].item() >= cut for t in range(6)] for b in range(4)]
    assert L(kept) == want and sum(map(sum, want)) in (7, 8)  # 8 at or above the median, 7 if float32 rounded up
    assert not get_high_entropy_mask(entropies, torch.zeros_like(mask), 0.5).any()


# ---------------------------------------------------------------------------
# luspo and vespo against loops (and TRL's phi)
# ---------------------------------------------------------------------------


def ref_clipped_sums(logps, old, advantages, mask, *, level, eps_low, eps_high, beta=0.0, ref=None,
                     is_weights=None, bias_correction=False):
    """Per completion: the sum over its tokens of grpo's clipped per-token loss (+ KL), and its token count."""
    sums, counts = [], []
    for b in range(len(logps)):
        tokens = [t for t in range(len(logps[b])) if mask[b][t]]
        a = advantages[b]
        seq = sum(logps[b][t] - old[b][t] for t in tokens) / max(len(tokens), 1)
        total = 0.0
        for t in tokens:
            r = math.exp(seq if level == "sequence" else logps[b][t] - old[b][t])
            loss = -(min(r, 1 + eps_high) * a if a >= 0 else max(r, 1 - eps_low) * a)
            if is_weights is not None:
                loss *= is_weights[b][t]
            if beta:
                d = ref[b][t] - logps[b][t]
                kl = math.exp(d) - d - 1
                loss += beta * kl * (r if bias_correction else 1.0)
            total += loss
        sums.append(total)
        counts.append(len(tokens))
    return sums, counts


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("extras", [False, True])
def test_luspo_sums_each_completion_then_averages(level, extras):
    logps, old, sampling, advantages, mask = make_batch(43)
    g = torch.Generator().manual_seed(44)
    ref = logps + torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.3
    beta = 0.05 if extras else 0.0
    kwargs = {"importance_sampling_level": level, "epsilon_low": 0.1, "epsilon_high": 0.15, "beta": beta,
              "ref_per_token_logps": ref if extras else None,
              "sampling_per_token_logps": sampling if extras else None, "vllm_is_mode": "token_truncate",
              "vllm_is_clip_max": 1.2}
    x = logps.clone().requires_grad_()
    loss, metrics = loss_with(x, old, advantages, mask, loss_type="luspo", **kwargs)
    weights = ref_token_is_weights(L(old), L(sampling), L(mask), "token_truncate", None, 1.2) if extras else None

    def f(values):
        sums, _ = ref_clipped_sums(values, L(old), L(advantages), L(mask), level=level, eps_low=0.1, eps_high=0.15,
                                   beta=beta, ref=L(ref), is_weights=weights)
        return sum(sums) / len(sums)

    assert close(loss.item(), f(L(logps)))
    loss.backward()
    grad = finite_difference_grad(f, L(logps))
    assert max(abs(x.grad[b, t].item() - grad[b][t]) for b in range(6) for t in range(7)) < GRAD_TOL
    # Not grpo: that divides each completion by its length (the fixture's lengths differ).
    grpo, grpo_metrics = loss_with(logps, old, advantages, mask, loss_type="grpo", **kwargs)
    assert not close(grpo.item(), loss.item())
    # TRL logs the clip ratios for luspo as for grpo.
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key].item() == grpo_metrics[key].item()
    assert metrics["clip_ratio/region_mean"].item() > 0
    assert "luspo" in LOSS_TYPES and "luspo" not in GLOBALLY_NORMALISED


def ref_phi(log_ratios, log_is, a, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """VESPO's phi from the definition: one completion's token log-ratios and log IS weights."""
    lower = math.log(1e-8)
    log_w = sum(min(max(x, -20.0), 20.0) for x in log_ratios)
    log_w += sum(min(max(x, lower), 20.0) for x in log_is)
    log_w = min(max(log_w, lower), 20.0)
    k, lam = (k_pos, lambda_pos) if a >= 0 else (k_neg, lambda_neg)
    return math.exp(lam + k * log_w - lam * math.exp(log_w))


@pytest.mark.parametrize("mode", [None, "token_truncate", "token_mask"])
def test_vespo_weights_minus_advantage_logp_by_gamma(trl_grpo, mode):
    logps, old, sampling, advantages, mask = make_batch(45, spread=0.2)
    sampling[mask == 0] = -math.inf
    params = {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0}
    clip = (0.8, 1.25)
    x = logps.clone().requires_grad_()
    loss, metrics = loss_with(x, old, advantages, mask, loss_type="vespo", num_items_in_batch=40, num_processes=2,
                              sampling_per_token_logps=None if mode is None else sampling,
                              vllm_is_mode=mode or "token_mask", vllm_is_clip_min=clip[0],
                              vllm_is_clip_max=clip[1], **params)
    weights = None if mode is None else ref_token_is_weights(L(old), L(sampling), L(mask), mode, *clip)
    phis, total = [], 0.0
    for b in range(6):
        tokens = [t for t in range(7) if mask[b, t]]
        log_is = [] if weights is None else [math.log(weights[b][t]) if weights[b][t] > 0 else -math.inf
                                             for t in tokens]
        phi = ref_phi([logps[b, t].item() - old[b, t].item() for t in tokens], log_is, advantages[b].item(),
                      1.5, 2.5, 3.0, 2.0)
        phis.append(phi)
        # The IS weights are folded into phi, never multiplied onto the token loss.
        total += sum(-phi * advantages[b].item() * logps[b, t].item() for t in tokens)
    assert close(loss.item(), total / (40 / 2))
    assert close(metrics["vespo/phi_seq_mean"].item(), sum(phis) / 6)
    if mode == "token_mask":
        assert any(w == 0.0 for row, m in zip(weights, L(mask)) for w, k in zip(row, m) if k)  # 1e-8 inside phi
    # phi is held (no gradient through it): d loss / d logp = -phi * A / (tokens / processes), exactly.
    loss.backward()
    for b in range(6):
        for t in range(7):
            want = -phis[b] * advantages[b].item() / 20 if mask[b, t] else 0.0
            assert abs(x.grad[b, t].item() - want) < 1e-12  # one product of float64s: rounding only
    # TRL's phi on TRL's inputs (its IS ratio is exp((old - sampling) * mask), then truncated or masked).
    is_ratio = None
    if mode is not None:
        is_ratio = torch.exp(torch.nan_to_num((old - sampling) * mask, nan=0.0))
        is_ratio = is_ratio.clamp(*clip) if mode == "token_truncate" else is_ratio.masked_fill(
            (is_ratio < clip[0]) | (is_ratio > clip[1]), 0.0)
    trl_phi = trl_grpo.get_gamma_weights(advantages[:, None], logps - old, mask, is_ratio, k_pos=1.5, lambda_pos=2.5,
                                         k_neg=3.0, lambda_neg=2.0)
    trl_loss = (-trl_phi * advantages[:, None] * logps * mask).sum() / (40 / 2)
    assert close(loss.item(), trl_loss.item())
    assert "vespo" in GLOBALLY_NORMALISED
    assert not any(k.startswith("clip_ratio") for k in metrics)


def test_vespo_needs_a_token_level_sampler_correction():
    logps, old, sampling, advantages, mask = make_batch(46)
    with pytest.raises(ValueError, match="vllm_is_mode must be 'token_truncate' or 'token_mask'"):
        loss_with(logps, old, advantages, mask, loss_type="vespo", sampling_per_token_logps=sampling,
                  vllm_is_mode="sequence_mask")


# ---------------------------------------------------------------------------
# The bias-corrected KL
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_bias_corrected_kl_weighs_the_kl_by_the_ratio(level, on_policy):
    logps, old, _, advantages, mask = make_batch(47, spread=0.3)
    g = torch.Generator().manual_seed(48)
    ref = logps + torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.4
    x = logps.clone().requires_grad_()
    loss, metrics = loss_with(x, None if on_policy else old, advantages, mask, loss_type="bnpo", beta=0.1,
                              ref_per_token_logps=ref, use_bias_correction_kl=True, importance_sampling_level=level)
    base = logps if on_policy else old  # on-policy: old is the current logps, held

    def f(values, correct=True):
        sums, counts = ref_clipped_sums(values, L(base), L(advantages), L(mask), level=level, eps_low=0.2,
                                        eps_high=0.2, beta=0.1, ref=L(ref), bias_correction=correct)
        return sum(sums) / sum(counts)

    assert close(loss.item(), f(L(logps)))
    loss.backward()
    grad = finite_difference_grad(f, L(logps))
    assert max(abs(x.grad[b, t].item() - grad[b][t]) for b in range(6) for t in range(7)) < GRAD_TOL
    # The logged KL is the corrected one, as TRL logs it.
    kls = []
    for b in range(6):
        tokens = [t for t in range(7) if mask[b, t]]
        seq = sum(logps[b, t].item() - base[b, t].item() for t in tokens) / max(len(tokens), 1)
        for t in tokens:
            d = ref[b, t].item() - logps[b, t].item()
            r = math.exp(seq if level == "sequence" else logps[b, t].item() - base[b, t].item())
            kls.append((math.exp(d) - d - 1) * r)
    assert close(metrics["kl"].item(), statistics.fmean(kls))
    if on_policy:
        # r == 1 in value, so the loss is the uncorrected one, but the gradient is not.
        plain = x.detach().clone().requires_grad_()
        plain_loss, _ = loss_with(plain, None, advantages, mask, loss_type="bnpo", beta=0.1, ref_per_token_logps=ref)
        plain_loss.backward()
        assert close(plain_loss.item(), loss.item())
        assert (plain.grad - x.grad).abs().max() > 1e-5  # beta * KL / tokens: ~1e-4 here


# ---------------------------------------------------------------------------
# Differentiable entropy and the entropy bonus
# ---------------------------------------------------------------------------


def plain_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)


def test_entropy_gradient_matches_autograd_and_finite_differences():
    g = torch.Generator().manual_seed(50)
    logits = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3).requires_grad_()
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    want_value = plain_entropy(logits)
    (want_value * upstream).sum().backward()
    want_grad, logits.grad = logits.grad.clone(), None
    for chunk_tokens in (1, 4, 1024):  # uneven chunks, and one chunk for all
        entropy = entropy_from_logits(logits, chunk_tokens=chunk_tokens)
        assert entropy.grad_fn is not None
        # Float64, softmax terms of size <= 1 over 11 entries: both forms agree to ~1e-15; 1e-12 is room.
        assert torch.allclose(entropy, want_value, rtol=0, atol=1e-12)
        (entropy * upstream).sum().backward()
        assert torch.allclose(logits.grad, want_grad, rtol=0, atol=1e-12)
        logits.grad = None
    # Finite differences (gradcheck: step 1e-6, its own tolerances) on the hand-written backward.
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_tokens=4), (logits,))
    # No graph when grad is off or the logits do not require it: the logging path stays as it was.
    with torch.no_grad():
        assert entropy_from_logits(logits).grad_fn is None
    assert entropy_from_logits(logits.detach()).grad_fn is None


def test_entropy_backward_keeps_no_vocabulary_sized_float32_tensor():
    g = torch.Generator().manual_seed(51)
    logits = (torch.randn(4, 6, 300, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        entropy = entropy_from_logits(logits, chunk_tokens=5)
    assert entropy.dtype == torch.float32
    for t in saved:  # the logits themselves (by reference), and [N] floats
        assert t.data_ptr() == logits.data_ptr() or t.numel() == 24
    entropy.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    reference = logits.detach().double().requires_grad_()
    plain_entropy(reference).sum().backward()
    # Computed in float32 from bf16 logits, stored as bf16 (8 mantissa bits, ~0.4% relative): 2e-2 absolute
    # on gradients of size up to ~1.
    assert (logits.grad.double() - reference.grad).abs().max() < 2e-2


def test_entropy_bonus_value_gradient_and_parts():
    g = torch.Generator().manual_seed(52)
    logits = (torch.randn(4, 6, 9, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 2:] = 0
    mask[3, 5:] = 0
    keep = torch.rand(4, 6, generator=g) > 0.3
    coef, accumulation = 0.03, 4
    entropies = entropy_from_logits(logits, chunk_tokens=5)
    bonus, stats = entropy_bonus(entropies, mask, coef=coef, accumulation=accumulation, entropy_mask=keep)
    effective = [(b, t) for b in range(4) for t in range(6) if mask[b, t] and keep[b, t]]
    mean_h = statistics.fmean(entropies[b, t].item() for b, t in effective)
    assert close(bonus.item(), coef * mean_h / accumulation)
    assert close(stats["entropy_sum"].item(), mean_h * len(effective)) and stats["token_count"].item() == len(effective)
    bonus.backward()
    ours, logits.grad = logits.grad.clone(), None
    effective_mask = (mask.bool() & keep).double()
    (coef * (plain_entropy(logits) * effective_mask).sum() / effective_mask.sum() / accumulation).backward()
    assert torch.allclose(ours, logits.grad, rtol=0, atol=1e-12)  # float64, as in the entropy gradient test
    # A micro-batch cut into parts: with num_tokens, the parts' bonuses add up to the whole one.
    parts = [entropy_bonus(entropies[rows].detach(), mask[rows], coef=coef, accumulation=accumulation,
                           entropy_mask=keep[rows], num_tokens=len(effective))[0].item()
             for rows in (slice(0, 2), slice(2, 4))]
    assert close(sum(parts), bonus.item())
    # No token: 0, not NaN.
    assert entropy_bonus(entropies.detach(), torch.zeros_like(mask), coef=1.0)[0].item() == 0.0


def test_adaptive_entropy_controller_over_steps():
    # Dyadic numbers, so the +-delta arithmetic is exact and the expected values can be compared with ==.
    ctrl = AdaptiveEntropy(0.25, adaptive=True, target=0.5, delta=0.125, coef_min=0.0, coef_max=0.5)
    assert ctrl.enabled and ctrl.last_world_entropy == math.inf
    assert ctrl.coef_to_apply() == 0.0  # no measurement yet: the first window applies no bonus
    # One window of two micro-batches, 3 and 5 tokens: the world entropy is the token-weighted mean.
    ctrl.accumulate(torch.tensor(0.9), torch.tensor(3.0))
    ctrl.accumulate(0.6, 5)
    window = ctrl.window()
    assert L(window) == [1.5, 8.0]
    assert ctrl.step(window[0] / window[1].clamp(min=1)) == 0.375  # 0.1875 <= target: up
    assert ctrl.last_world_entropy == 0.1875 and ctrl.coef_to_apply() == 0.375
    assert L(ctrl.window()) == [0.0, 0.0]  # emptied
    expected = [  # (world entropy, coef after, coef applied next window)
        (0.25, 0.5, 0.5),    # up, capped at coef_max
        (0.5, 0.5, 0.5),     # at the target counts as below: up (still capped)
        (0.75, 0.375, 0.0),  # above: down, and gated off
        (2.0, 0.25, 0.0),
        (3.0, 0.125, 0.0),
        (3.0, 0.0, 0.0),
        (3.0, 0.0, 0.0),     # floored at coef_min
        (0.0, 0.125, 0.125),
    ]
    for world, coef, applied in expected:
        assert ctrl.step(world) == coef and ctrl.coef_to_apply() == applied
    # Checkpoint: TRL's keys, through JSON (inf included), into a fresh controller.
    fresh = AdaptiveEntropy(0.25, adaptive=True, target=0.5, delta=0.125, coef_min=0.0, coef_max=0.5)
    assert json.loads(json.dumps(fresh.state_dict())) == {"entropy_coef": 0.25, "last_world_entropy": math.inf}
    fresh.load_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert fresh.coef == 0.125 and fresh.last_world_entropy == 0.0 and fresh.coef_to_apply() == 0.125
    # Static: the coefficient is applied as given and never moves.
    static = AdaptiveEntropy(0.01)
    assert static.enabled and static.coef_to_apply() == 0.01
    assert static.step(0.0) == 0.01 and static.step(9.0) == 0.01 and static.coef_to_apply() == 0.01
    assert not AdaptiveEntropy(0.0).enabled and AdaptiveEntropy(0.0, adaptive=True).enabled
    with pytest.raises(ValueError, match="must not exceed entropy_coef_max"):
        AdaptiveEntropy(0.1, adaptive=True, coef_min=0.5, coef_max=0.2)


# ---------------------------------------------------------------------------
# Unscorable rows, one generation per prompt, normalize_then_sum
# ---------------------------------------------------------------------------


def ref_group_advantages(rewards: list[float], group_size: int, scale: str) -> list[float]:
    """TRL 1.16's advantages from their definition: statistics over each group's non-NaN rewards."""
    scored_all = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(scored_all) if len(scored_all) >= 2 else math.nan
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        scored = [r for r in group if not math.isnan(r)]
        mean = statistics.fmean(scored) if scored else math.nan
        if group_size == 1:
            std = 0.0
        else:
            std = statistics.stdev(scored) if len(scored) >= 2 else math.nan
        for r in group:
            a = r - mean
            if scale == "group":
                a = a / (std + 1e-4)
            elif scale == "batch":
                a = a / (batch_std + 1e-4)
            out.append(0.0 if math.isnan(a) else a)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscorable_rows_leave_the_baseline_and_get_no_advantage(scale):
    nan = math.nan
    per_func = torch.tensor([
        [1.0, nan], [0.0, 0.5], [nan, nan], [2.0, 1.0],   # group 0: one unscorable row
        [nan, nan], [nan, 0.25], [nan, nan], [nan, nan],  # group 1: a single scorable row
        [0.5, 0.5], [1.0, 0.0], [nan, 1.0], [0.0, 0.0],   # group 2: all scorable
    ], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0])
    rewards, _ = weighted_rewards(per_func, weights)
    assert [math.isnan(r) for r in L(rewards)] == [False, False, True, False, True, False, True, True] + [False] * 4
    advantages, stats = group_advantages(rewards, 4, scale)
    want = ref_group_advantages(L(rewards), 4, scale)
    assert all(close(got, w) for got, w in zip(L(advantages), want))
    assert not torch.isnan(advantages).any()
    assert advantages[[2, 4, 6, 7]].abs().max().item() == 0.0
    if scale != "batch":
        assert advantages[5].item() == 0.0  # alone in its group: it is its own baseline
    assert advantages[0].item() != 0.0
    scored = [r for r in L(rewards) if not math.isnan(r)]
    assert close(stats["reward"].item(), statistics.fmean(scored))
    assert close(stats["reward_std"].item(), statistics.stdev(scored))
    assert L(stats["unscorable"]) == [math.isnan(r) for r in L(rewards)]
    assert math.isnan(stats["group_std"][4].item())  # one scorable row: no std
    # Without the NaN marking (unscorable rows as reward 0, the old behaviour) the baseline would differ.
    zeroed, _ = group_advantages(torch.nan_to_num(rewards, nan=0.0), 4, scale)
    assert not close(zeroed[0].item(), advantages[0].item())


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_one_generation_per_prompt_gives_zero_advantages(scale):
    rewards = torch.tensor([1.0, 0.25, math.nan, -2.0], dtype=torch.float64)
    advantages, stats = group_advantages(rewards, 1, scale)
    assert L(advantages) == [0.0] * 4  # reward - reward, as TRL computes it
    assert L(stats["group_std"]) == [0.0] * 4 and stats["frac_reward_zero_std"].item() == 1.0
    assert close(stats["reward"].item(), statistics.fmean([1.0, 0.25, -2.0]))
    assert close(stats["reward_std"].item(), statistics.stdev([1.0, 0.25, -2.0]))
    assert L(group_advantages(torch.tensor([3.0]), 1, scale)[0]) == [0.0]


def ref_normalize_then_sum(per_func: list[list[float]], weights: list[float], group_size: int) -> list[float]:
    """GDPO as TRL 1.16 computes it, from the definition, row by row."""
    num_funcs = len(weights)
    sums = []
    for start in range(0, len(per_func), group_size):
        group = per_func[start : start + group_size]
        normalised = [[0.0] * num_funcs for _ in group]
        for f in range(num_funcs):
            scored = [row[f] for row in group if not math.isnan(row[f])]
            mean = statistics.fmean(scored) if scored else math.nan
            std = 0.0 if group_size == 1 else (statistics.stdev(scored) if len(scored) >= 2 else math.nan)
            for i, row in enumerate(group):
                normalised[i][f] = (row[f] - mean) / (std + 1e-4)
        for row, norm in zip(group, normalised):
            if all(math.isnan(r) for r in row):
                sums.append(math.nan)
            else:
                sums.append(sum(w * n for w, n in zip(weights, norm) if not math.isnan(n)))
    scored = [s for s in sums if not math.isnan(s)]
    mean, std = statistics.fmean(scored), statistics.stdev(scored)
    return [0.0 if math.isnan(s) else (s - mean) / (std + 1e-4) for s in sums]


def test_normalize_then_sum_matches_reference():
    nan = math.nan
    per_func = [
        [1.0, 10.0], [0.0, 30.0], [nan, nan], [1.0, 20.0],      # an unscorable row
        [0.0, nan], [1.0, 5.0], [0.5, nan], [1.0, nan],         # function 1 applied once: contributes nothing
        [0.0, 0.0], [0.0, 100.0], [0.0, 50.0], [0.0, 25.0],     # function 0 constant: contributes 0
    ]
    weights = [1.0, 0.5]
    advantages, stats = normalize_then_sum_advantages(torch.tensor(per_func, dtype=torch.float64),
                                                      torch.tensor(weights), 4)
    want = ref_normalize_then_sum(per_func, weights, 4)
    assert all(close(got, w) for got, w in zip(L(advantages), want))
    assert advantages[2].item() == 0.0 and not torch.isnan(advantages).any()
    raw = [sum(w * r for w, r in zip(weights, row) if not math.isnan(r)) for row in per_func if not all(
        math.isnan(r) for r in row)]
    assert close(stats["reward"].item(), statistics.fmean(raw))
    assert close(stats["reward_std"].item(), statistics.stdev(raw))
    assert stats["frac_reward_zero_std"].item() == 0.0
    assert L(stats["unscorable"]) == [i == 2 for i in range(12)]
    # The reward functions' scales no longer matter: multiplying function 1 by 1000 changes nothing
    # beyond the 1e-4 added to its stds (relative effect ~1e-4 / std, std >= 7 here).
    scaled = torch.tensor(per_func, dtype=torch.float64) * torch.tensor([1.0, 1000.0], dtype=torch.float64)
    again, _ = normalize_then_sum_advantages(scaled, torch.tensor(weights), 4)
    assert (again - advantages).abs().max() < 1e-4
    # One generation per prompt: every normalised reward is 0, so every advantage is.
    ones, _ = normalize_then_sum_advantages(torch.tensor(per_func, dtype=torch.float64), torch.tensor(weights), 1)
    assert L(ones) == [0.0] * 12
    with pytest.raises(ValueError, match="must be a multiple of num_generations"):
        normalize_then_sum_advantages(torch.zeros(6, 2), torch.ones(2), 4)
