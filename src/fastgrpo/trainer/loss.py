"""The math of GRPO as pure functions: rewards -> advantages -> per-token loss.

Nothing here knows about models, processes or optimizers: each function takes
tensors and returns tensors (plus a dict of detached scalar metrics named as TRL
logs them). The trainer does the gathering across processes and the division
by gradient-accumulation steps.

Shapes: B completions (prompt-major: the num_generations completions of one
prompt are consecutive rows, as TRL's sampler lays them out), T completion
tokens (padded), V vocabulary, F reward functions.

Semantics follow TRL's GRPOTrainer; where TRL left a choice open it is said
in the docstring.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCALE_REWARDS_MODES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# Normalised over the optimizer step's tokens (num_items_in_batch); the others over their micro-batch,
# so the trainer divides those by the gradient accumulation steps.
GLOBALLY_NORMALISED = ("dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

# Added to the std before dividing, so that a group whose completions all got the
# same reward gets advantage 0 instead of 0/0 (TRL's constant).
STD_EPS = 1e-4


# ---------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------


def weighted_rewards(per_func_rewards: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Combine the rewards of F reward functions into one reward per completion.

    per_func_rewards[B, F] holds NaN where a function said "not applicable"
    (returned None). As in TRL, each row is the weighted sum over the functions
    that did apply (nansum): NaN entries are skipped, and a row where no
    function applied gets reward 0 (the trainer should warn about such rows).

    Returns (rewards[B], stats) with stats["mean"][F] and stats["std"][F], each
    function's mean and sample std (Bessel-corrected, like TRL's nanstd) over
    the completions it applied to, for logging as rewards/<func>/mean and /std.
    NaN where a function applied to no completion (std: to fewer than two).
    """
    if per_func_rewards.dim() != 2:
        raise ValueError(
            f"per_func_rewards must have shape [num_completions, num_reward_funcs], got {tuple(per_func_rewards.shape)}"
        )
    num_funcs = per_func_rewards.shape[1]
    if weights.shape != (num_funcs,):
        raise ValueError(
            f"reward weights must have one entry per reward function ({num_funcs}), got shape {tuple(weights.shape)}"
        )
    weights = weights.to(per_func_rewards)
    rewards = (per_func_rewards * weights).nansum(dim=1)

    applied = ~torch.isnan(per_func_rewards)
    count = applied.sum(dim=0).to(per_func_rewards.dtype)
    mean = torch.nanmean(per_func_rewards, dim=0)
    squared_deviation = torch.where(applied, (per_func_rewards - mean) ** 2, 0.0)
    # count - 1 <= 0 gives inf or NaN variance; report NaN, not a number that looks real.
    variance = squared_deviation.sum(dim=0) / (count - 1)
    std = torch.where(count >= 2, variance.sqrt(), torch.nan)
    return rewards, {"mean": mean, "std": std}


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: str = "group"
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's advantage: each completion's reward relative to its group's mean.

    rewards[B] come in consecutive groups of num_generations (one group per
    prompt). advantage = reward - group mean, then divided by
    - "group": the group's std + 1e-4 (the GRPO paper; favours groups where
      rewards barely differ, which Dr. GRPO argues is a bias),
    - "batch": the std over the whole batch + 1e-4 (centring stays per group),
    - "none": nothing (Dr. GRPO).
    Stds are sample stds (Bessel-corrected, n - 1), as torch.std computes them
    in TRL. Call this on the whole generation batch (gathered over processes):
    groups must be whole, and "batch" needs every reward for TRL's numbers.

    Returns (advantages[B], stats) with
    - stats["group_std"][B]: the std of each completion's group,
    - stats["reward"]: the mean reward, stats["reward_std"]: the mean of the
      std that scaling used (group std in "group"/"none", batch std in
      "batch"), as TRL logs them,
    - stats["frac_reward_zero_std"]: the fraction of groups whose rewards are
      all equal; those groups carry no learning signal.
    """
    if scale_rewards not in SCALE_REWARDS_MODES:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS_MODES}, got {scale_rewards!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one reward per completion), got shape {tuple(rewards.shape)}")
    if num_generations < 2:
        raise ValueError(
            f"num_generations must be at least 2 (a group of one has no baseline to compare with), "
            f"got {num_generations}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    num_completions = rewards.shape[0]
    if num_completions % num_generations != 0:
        raise ValueError(
            f"the number of completions ({num_completions}) must be a multiple of num_generations "
            f"({num_generations}): completions come in whole groups of num_generations per prompt"
        )

    grouped = rewards.reshape(-1, num_generations)
    group_mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    group_std_per_group = grouped.std(dim=1)  # unbiased
    group_std = group_std_per_group.repeat_interleave(num_generations)
    advantages = rewards - group_mean

    if scale_rewards == "group":
        scale_std = group_std
    elif scale_rewards == "batch":
        scale_std = rewards.std().expand_as(rewards)
    else:
        scale_std = group_std  # only logged
    if scale_rewards != "none":
        advantages = advantages / (scale_std + STD_EPS)

    # Counted per group in every mode. TRL, in "batch" mode, tests the batch std
    # here instead, which says nothing about how many groups lack signal.
    is_zero_std = torch.isclose(group_std_per_group, torch.zeros_like(group_std_per_group))
    stats = {
        "group_std": group_std,
        "reward": rewards.mean().detach(),
        "reward_std": scale_std.mean().detach(),
        "frac_reward_zero_std": is_zero_std.to(rewards.dtype).mean(),
    }
    return advantages, stats


# ---------------------------------------------------------------------------
# Log-probabilities and entropy from logits, a chunk of tokens at a time
# ---------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision softmax sums lose too much; do the reductions in float32.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Positions per chunk over the vocabulary: 32 x 49k float32 logits (6 MB) stay in the CPU's cache between
# the passes over a chunk. On B1's 2,048 completion positions (a Zen 3 CPU, 2 threads) log-softmax forward,
# backward and entropy took 3.0 s at 1,024 positions a chunk, 1.1 s at 32 (16 to 64 alike).
CHUNK_TOKENS = 32


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[token_id] without a [N, V] float32 tensor, forward or backward.

    Forward keeps only the logsumexp per token. Backward rebuilds softmax one
    chunk at a time: d logp[i] / d logits[i, v] = onehot(id_i)[v] - softmax(logits[i])[v].
    """

    @staticmethod
    def forward(ctx, logits: Tensor, token_ids: Tensor, chunk_tokens: int) -> Tensor:
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_ids = token_ids.reshape(-1, 1)
        compute_dtype = _compute_dtype(logits.dtype)
        logsumexp = torch.empty(flat_logits.shape[0], dtype=compute_dtype, device=logits.device)
        for start in range(0, flat_logits.shape[0], chunk_tokens):
            chunk = flat_logits[start : start + chunk_tokens].to(compute_dtype)
            logsumexp[start : start + chunk_tokens] = torch.logsumexp(chunk, dim=-1)
        picked = flat_logits.gather(1, flat_ids).squeeze(1).to(compute_dtype)
        ctx.save_for_backward(logits, token_ids, logsumexp)
        ctx.chunk_tokens = chunk_tokens
        return (picked - logsumexp).view(token_ids.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: Tensor):
        logits, token_ids, logsumexp = ctx.saved_tensors
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_ids = token_ids.reshape(-1, 1)
        flat_grad = grad_logps.reshape(-1, 1).to(logsumexp.dtype)
        grad_logits = torch.empty_like(flat_logits)
        for start in range(0, flat_logits.shape[0], ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            softmax = torch.exp(flat_logits[start:end].to(logsumexp.dtype) - logsumexp[start:end, None])
            grad_chunk = -softmax * flat_grad[start:end]
            grad_chunk.scatter_add_(1, flat_ids[start:end], flat_grad[start:end])
            grad_logits[start:end] = grad_chunk.to(grad_logits.dtype)
        return grad_logits.view_as(logits), None, None


def selective_log_softmax(logits: Tensor, token_ids: Tensor, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """Log-probability of each chosen token: log_softmax(logits)[..., token_id].

    logits[B, T, V], token_ids[B, T] -> logprobs[B, T] (float32 for half-precision
    logits, else the logits' dtype). A full log_softmax would materialize a
    second [B, T, V] tensor (in float32, to be accurate) and keep it for
    backward; this keeps one logsumexp per token and works on chunk_tokens
    tokens at a time, so the extra memory is [chunk_tokens, V] floats. Gradients
    flow to logits.
    """
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"token_ids must have the shape of logits without the vocabulary dimension: "
            f"logits {tuple(logits.shape)}, token_ids {tuple(token_ids.shape)}"
        )
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return _SelectiveLogSoftmax.apply(logits, token_ids.long(), chunk_tokens)


def entropy_from_logits(logits: Tensor, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """Entropy of the next-token distribution at each position: logits[..., V] -> [...].

    H = logsumexp(x) - sum(softmax(x) * x), in float32 for half-precision
    logits, chunk_tokens positions at a time. Meant for logging under
    torch.no_grad() (with grad enabled each chunk's intermediates are kept).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    entropy = flat_logits.new_empty(flat_logits.shape[0], dtype=_compute_dtype(logits.dtype))
    for start in range(0, flat_logits.shape[0], chunk_tokens):
        chunk = flat_logits[start : start + chunk_tokens].to(entropy.dtype)
        logsumexp = torch.logsumexp(chunk, dim=-1)
        softmax = torch.exp(chunk - logsumexp[:, None])
        entropy[start : start + chunk_tokens] = logsumexp - (softmax * chunk).sum(dim=-1)
    return entropy.view(logits.shape[:-1])


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values over the positions where mask is true (0 when there are none)."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per row, the mean over its masked positions: [B, T] -> [B, 1]."""
    return (torch.where(mask, values, 0.0).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)


def vllm_importance_weights(
    trainer_logps: Tensor, sampling_logps: Tensor, completion_mask: Tensor, mode: str = "sequence_mask",
    clip_min: float | None = None, clip_max: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights for the generator/trainer mismatch, TRL's `vllm_importance_sampling_mode`.

    vLLM samples from a slightly different distribution than the trainer computes (other kernels,
    other precision, or older weights), so completions are off-policy. The ratio is
    p_trainer / p_generator, with trainer_logps the policy that the loss's ratio starts from (the
    old policy's logps, or the current ones when the round is on-policy); no gradient flows through it.
    - token_*: one ratio per token, exp(trainer - generator) -> [B, T];
    - sequence_*: one per completion, the product of its tokens' ratios -> [B, 1];
    - *_truncate: clamped to [clip_min, clip_max] (None: that side open);
    - *_mask: set to 0 outside [clip_min, clip_max], kept as it is inside.

    Returns (weights, metrics) with TRL's names: sampling/importance_sampling_ratio/{min,mean,max}
    (of the weights, over completion tokens or completions) and
    sampling/sampling_logp_difference/{mean,max} (of |trainer - generator| over completion tokens).
    """
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {VLLM_IS_MODES}, got {mode!r}")
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:
        raise ValueError(f"the importance sampling clip needs clip_min < clip_max, got {clip_min} and {clip_max}")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"{mode} clamps the ratio: give clip_max (or clip_min)")
    if (clip_max is not None and clip_max <= 0) or (clip_min is not None and clip_min < 0):
        raise ValueError(f"the importance sampling clip must be positive, got [{clip_min}, {clip_max}]")
    if sampling_logps.shape != trainer_logps.shape:
        raise ValueError(
            f"sampling_per_token_logps must have the shape of per_token_logps {tuple(trainer_logps.shape)}, "
            f"got {tuple(sampling_logps.shape)}"
        )
    mask = completion_mask.bool()
    # Padding may hold anything (-inf from a generator, say): zero it before exp.
    log_ratio = torch.where(mask, trainer_logps.detach() - sampling_logps.detach(), 0.0)
    sequence = mode.startswith("sequence")
    ratio = torch.exp(log_ratio.sum(1, keepdim=True) if sequence else log_ratio)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=None if clip_min is None else clip_min, max=None if clip_max is None else clip_max)
    else:
        weights = torch.where((ratio >= low) & (ratio <= high), ratio, 0.0)

    counted = weights.squeeze(1) if sequence else weights[mask]
    difference = log_ratio.abs()[mask]
    zero = weights.new_zeros(())
    metrics = {
        "sampling/importance_sampling_ratio/min": counted.min() if counted.numel() else zero,
        "sampling/importance_sampling_ratio/mean": counted.mean() if counted.numel() else zero,
        "sampling/importance_sampling_ratio/max": counted.max() if counted.numel() else zero,
        "sampling/sampling_logp_difference/mean": difference.mean() if difference.numel() else zero,
        "sampling/sampling_logp_difference/max": difference.max() if difference.numel() else zero,
    }
    return weights, metrics


def entropy_threshold(entropies: Tensor, top_quantile: float) -> Tensor:
    """The entropy above which the top `top_quantile` of tokens lie (TRL's top_entropy_quantile).

    `entropies`: every completion token's entropy, gathered over the whole batch (all processes).
    Tokens with entropy >= the threshold are trained on; 1.0 keeps every token, 0.0 only the
    highest. No token at all: +inf (nothing is trained on)."""
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_quantile}")
    if entropies.numel() == 0:
        return torch.tensor(math.inf)
    return torch.quantile(entropies if entropies.dtype == torch.float64 else entropies.float(), 1.0 - top_quantile)


def grpo_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    beta: float = 0.0,
    ref_per_token_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    num_processes: int = 1,
    sampling_per_token_logps: Tensor | None = None,
    vllm_is_mode: str = "sequence_mask",
    vllm_is_clip_min: float | None = None,
    vllm_is_clip_max: float | None = 3.0,
    off_policy_mask_threshold: float | None = None,
    entropy_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's policy loss and its variants, with optional KL penalty, masks and IS correction.

    The ratio r = exp(logp - old_logp): per token, or (importance_sampling_level="sequence", GSPO)
    one per completion, exp of the mean of its tokens' log-ratios. old_per_token_logps None means
    the round is on-policy: old = logp.detach(), so r == 1 in value but carries logp's gradient.
    With A the completion's advantage, the per-token loss is
    - grpo, bnpo, dr_grpo, dapo: -min(min(r, delta) * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)
      (delta, when given, caps the unclipped branch: two-sided clipping);
    - cispo: -min(r, epsilon_high).detach() * A * logp (the clipped weight, not the ratio, is held);
    - sapo: -sigmoid(tau * (r - 1)) * 4 / tau * A, tau = sapo_temperature_pos where A > 0 else _neg
      (a smooth gate instead of a hard clip).
    Then, in TRL's order, the policy term is multiplied by
    - the off-policy mask (off_policy_mask_threshold): 0 for completions with A < 0 whose mean
      log(p_generator / p_current) over their tokens exceeds the threshold (logp_generator:
      sampling_per_token_logps, else the old logps);
    - entropy_mask[B, T] (top_entropy_quantile, computed by the caller over the whole batch);
    - the vLLM importance weights of vllm_importance_weights (mode vllm_is_mode) when
      sampling_per_token_logps is given;
    and the KL term beta * (exp(ref - logp) - (ref - logp) - 1), the k3 estimator, is added.

    Aggregation over the completion tokens (completion_mask[B, T]):
    - "grpo", "sapo": mean over each sequence's tokens, then mean over sequences;
    - "bnpo": sum / number of tokens in this (local) batch;
    - "dr_grpo": sum / (B * max_completion_length), a constant normalizer;
    - "dapo", "cispo": sum / (num_items_in_batch / num_processes), where num_items_in_batch counts
      the completion tokens of the optimizer step (all processes, all its micro-batches). The
      division by num_processes undoes DDP's gradient averaging, so the gradient is that of
      (step's sum) / (step's tokens). Without num_items_in_batch, this batch's token count is used.
    The trainer divides the others (not GLOBALLY_NORMALISED) by the gradient accumulation steps.

    Returns (loss, metrics): detached scalars named as TRL logs them, over this batch's completion
    tokens: clip_ratio/low_mean (r below 1 - epsilon_low with A < 0), clip_ratio/high_mean (above
    1 + epsilon_high with A > 0), clip_ratio/region_mean (either), cispo_clip_ratio for cispo, kl when
    beta != 0, and the sampling/* metrics of vllm_importance_weights.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low} and {epsilon_high}")
    if delta is not None and delta <= 1 + epsilon_high:
        raise ValueError(f"delta={delta} caps the ratio above the clip range, so it must exceed 1 + epsilon_high "
                         f"= {1 + epsilon_high}")
    if sapo_temperature_pos <= 0 or sapo_temperature_neg <= 0:
        raise ValueError("sapo temperatures must be > 0")
    if per_token_logps.dim() != 2:
        raise ValueError(
            f"per_token_logps must have shape [batch, completion_tokens], got {tuple(per_token_logps.shape)}"
        )
    batch_size = per_token_logps.shape[0]
    for name, other in (("completion_mask", completion_mask), ("old_per_token_logps", old_per_token_logps),
                        ("entropy_mask", entropy_mask)):
        if other is not None and other.shape != per_token_logps.shape:
            raise ValueError(f"{name} must have the shape of per_token_logps {tuple(per_token_logps.shape)}, "
                             f"got {tuple(other.shape)}")
    if advantages.shape != (batch_size,):
        raise ValueError(f"advantages must have shape [batch] = ({batch_size},), got {tuple(advantages.shape)}")
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 adds a KL penalty to the reference model: pass ref_per_token_logps")
        if ref_per_token_logps.shape != per_token_logps.shape:
            raise ValueError(
                f"ref_per_token_logps must have the shape of per_token_logps {tuple(per_token_logps.shape)}, "
                f"got {tuple(ref_per_token_logps.shape)}"
            )
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError(
            f"loss_type='dr_grpo' divides by batch * max_completion_length: pass max_completion_length "
            f"(a positive int), got {max_completion_length}"
        )
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")

    mask = completion_mask.bool()
    mask_float = mask.to(per_token_logps.dtype)
    # Padded positions may hold anything (even inf); replace them before exp so
    # that neither the loss nor its gradient can turn into NaN through 0 * inf.
    logps = torch.where(mask, per_token_logps, 0.0)
    old_logps = logps.detach() if old_per_token_logps is None else torch.where(mask, old_per_token_logps, 0.0)
    advantage = advantages.to(logps.dtype)[:, None]

    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = _sequence_mean(log_ratio, mask)  # [B, 1]: every token of a completion shares it
    ratio = torch.exp(log_ratio)
    metrics: dict[str, Tensor] = {}
    if loss_type == "cispo":
        weight = ratio.clamp(max=epsilon_high).detach()
        per_token_loss = -weight * advantage * logps
        cispo_clipped = ((ratio.detach() > epsilon_high) & (advantage > 0)).expand_as(logps)
        metrics["cispo_clip_ratio"] = masked_mean(cispo_clipped.to(logps.dtype), mask)
    elif loss_type == "sapo":
        temperature = torch.where(advantage > 0, advantage.new_tensor(sapo_temperature_pos),
                                  advantage.new_tensor(sapo_temperature_neg))
        per_token_loss = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantage
    else:
        clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        capped = ratio if delta is None else ratio.clamp(max=delta)
        per_token_loss = -torch.min(capped * advantage, clipped_ratio * advantage)
    per_token_loss = per_token_loss.expand_as(logps)

    if off_policy_mask_threshold is not None:
        behaviour = old_logps if sampling_per_token_logps is None else torch.where(mask, sampling_per_token_logps, 0.0)
        divergence = _sequence_mean(behaviour.detach() - logps.detach(), mask)
        keep = (advantage >= 0) | (divergence <= off_policy_mask_threshold)
        per_token_loss = per_token_loss * keep.to(logps.dtype)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(logps.dtype)
    if sampling_per_token_logps is not None:
        is_weights, is_metrics = vllm_importance_weights(
            old_logps, sampling_per_token_logps, mask, vllm_is_mode, vllm_is_clip_min, vllm_is_clip_max
        )
        per_token_loss = per_token_loss * is_weights
        metrics.update(is_metrics)

    if beta != 0.0:
        ref_minus_logp = torch.where(mask, ref_per_token_logps, 0.0) - logps
        per_token_kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl.detach(), mask)

    masked_loss = per_token_loss * mask_float
    if loss_type in ("grpo", "sapo"):
        tokens_per_sequence = mask_float.sum(dim=1).clamp(min=1)
        loss = (masked_loss.sum(dim=1) / tokens_per_sequence).mean()
    elif loss_type == "bnpo":
        loss = masked_loss.sum() / mask_float.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = masked_loss.sum() / (batch_size * max_completion_length)
    else:  # dapo, cispo
        global_tokens = mask_float.sum() if num_items_in_batch is None else num_items_in_batch
        global_tokens = torch.as_tensor(global_tokens, dtype=logps.dtype, device=logps.device).clamp(min=1)
        loss = masked_loss.sum() / (global_tokens / num_processes)

    # Which tokens the clip actually bound (it binds only in the direction the
    # advantage pushes): measured on the unclipped ratio, as TRL does.
    ratio = ratio.detach().expand_as(logps)
    is_low_clipped = (ratio < 1 - epsilon_low) & (advantage < 0)
    is_high_clipped = (ratio > 1 + epsilon_high) & (advantage > 0)
    metrics["clip_ratio/low_mean"] = masked_mean(is_low_clipped.to(logps.dtype), mask)
    metrics["clip_ratio/high_mean"] = masked_mean(is_high_clipped.to(logps.dtype), mask)
    metrics["clip_ratio/region_mean"] = masked_mean((is_low_clipped | is_high_clipped).to(logps.dtype), mask)
    return loss, metrics
