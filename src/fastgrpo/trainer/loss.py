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
from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_REWARDS_MODES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Normalised over the optimizer step's tokens (num_items_in_batch); the others over their micro-batch,
# so the trainer divides those by the gradient accumulation steps.
GLOBALLY_NORMALISED = ("dapo", "cispo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

# Added to the std before dividing, so that a group whose completions all got the
# same reward gets advantage 0 instead of 0/0 (TRL's constant).
STD_EPS = 1e-4


# ---------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------


def _nanstd(values: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Sample std (Bessel-corrected) over the non-NaN entries, TRL's nanstd: NaN where fewer than two."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True).to(values.dtype)
    squared_deviation = torch.where(torch.isnan(values), 0.0, (values - mean) ** 2).sum(dim=dim, keepdim=True)
    # count - 1 <= 0 gives inf or NaN variance; report NaN, not a number that looks real.
    std = torch.where(count >= 2, (squared_deviation / (count - 1).clamp(min=1)).sqrt(), torch.nan)
    return std if keepdim else std.squeeze(dim)


def weighted_rewards(per_func_rewards: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Combine the rewards of F reward functions into one reward per completion.

    per_func_rewards[B, F] holds NaN where a function said "not applicable"
    (returned None). As in TRL, each row is the weighted sum over the functions
    that did apply (nansum): NaN entries are skipped. A row where no function
    applied is unscorable and gets reward NaN (TRL 1.16): group_advantages and
    normalize_then_sum_advantages leave it out of the baselines and give it
    advantage 0, and the logged reward / reward_std skip it.

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
    rewards = torch.where(torch.isnan(per_func_rewards).all(dim=1), torch.nan, rewards)
    mean = torch.nanmean(per_func_rewards, dim=0)
    return rewards, {"mean": mean, "std": _nanstd(per_func_rewards, dim=0)}


def _check_groups(num_completions: int, num_generations: int) -> None:
    if num_generations < 1:
        raise ValueError(f"num_generations must be at least 1, got {num_generations}")
    if num_completions % num_generations != 0:
        raise ValueError(
            f"the number of completions ({num_completions}) must be a multiple of num_generations "
            f"({num_generations}): completions come in whole groups of num_generations per prompt"
        )


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
    Stds are sample stds (Bessel-corrected, n - 1), as TRL's nanstd computes them.
    Call this on the whole generation batch (gathered over processes): groups
    must be whole, and "batch" needs every reward for TRL's numbers.

    NaN rewards mark unscorable completions (see weighted_rewards). As in TRL
    1.16, means and stds are taken over the non-NaN rewards only (nanmean,
    nanstd), and every advantage that comes out NaN is set to 0: that of an
    unscorable completion, and, when scaling divides by a std over fewer than
    two rewards (NaN), those of its group ("group") or of the batch ("batch").

    num_generations == 1 (TRL's num_generations_eval=1: eval only, the config
    refuses it for training) is allowed: each group's std is 0, as in TRL, so
    every advantage is reward - reward = 0; "batch" uses the batch std when
    there are at least two completions.

    Returns (advantages[B], stats) with
    - stats["group_std"][B]: the std of each completion's group (0 when
      num_generations == 1, NaN for a group with fewer than two scorable rows),
    - stats["unscorable"][B]: True where the reward is NaN,
    - stats["reward"], stats["reward_std"]: nanmean and nanstd of the rewards
      over the batch (unscorable rows left out), as TRL 1.16 logs them,
    - stats["frac_reward_zero_std"]: the fraction of groups whose rewards are
      all equal; those groups carry no learning signal.
    """
    if scale_rewards not in SCALE_REWARDS_MODES:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS_MODES}, got {scale_rewards!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one reward per completion), got shape {tuple(rewards.shape)}")
    _check_groups(rewards.shape[0], num_generations)
    if not rewards.is_floating_point():
        rewards = rewards.float()

    grouped = rewards.reshape(-1, num_generations)
    group_mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if num_generations > 1:
        group_std_per_group = _nanstd(grouped, dim=1)
    else:  # a group of one: TRL takes its std as 0 (advantage 0 whatever the scaling)
        group_std_per_group = torch.zeros_like(grouped[:, 0])
    group_std = group_std_per_group.repeat_interleave(num_generations)
    advantages = rewards - group_mean

    if scale_rewards == "group":
        scale_std = group_std
    elif scale_rewards == "batch":
        scale_std = (_nanstd(rewards) if rewards.numel() > 1 else rewards.new_zeros(())).expand_as(rewards)
    else:
        scale_std = group_std  # only logged
    if scale_rewards != "none":
        advantages = advantages / (scale_std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)

    # Counted per group in every mode. TRL, in "batch" mode, tests the batch std
    # here instead, which says nothing about how many groups lack signal.
    is_zero_std = torch.isclose(group_std_per_group, torch.zeros_like(group_std_per_group))
    stats = {
        "group_std": group_std,
        "unscorable": torch.isnan(rewards),
        "reward": torch.nanmean(rewards).detach(),
        "reward_std": _nanstd(rewards).detach(),
        "frac_reward_zero_std": is_zero_std.to(rewards.dtype).mean(),
    }
    return advantages, stats


def normalize_then_sum_advantages(
    per_func_rewards: Tensor, weights: Tensor, num_generations: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantages of TRL's multi_objective_aggregation="normalize_then_sum" (GDPO).

    Each function's rewards are normalised within their group first,
    (r_f - nanmean_group(r_f)) / (nanstd_group(r_f) + 1e-4) (nanstd Bessel-corrected, 0 when
    num_generations == 1), so a function's scale does not decide its influence; the weighted
    nansum over functions is then normalised over the whole batch,
    (s - nanmean(s)) / (nanstd(s) + 1e-4). scale_rewards plays no part (TRL ignores it here).
    A function that applied to fewer than two completions of a group contributes nothing to
    them (its normalised reward is NaN, skipped by the nansum). Unscorable rows (every function
    NaN) are left out of the batch statistics and get advantage 0, as are all rows when the batch
    std is NaN (fewer than two scorable rows).

    Returns (advantages[B], stats) with TRL's logged values: stats["reward"], stats["reward_std"]:
    nanmean and nanstd of the raw weighted sums (weighted_rewards) over the scorable rows;
    stats["frac_reward_zero_std"]: 1.0 if the batch std of the normalised sums is 0, else 0.0
    (TRL's flag for this mode); stats["unscorable"][B].
    """
    raw, _ = weighted_rewards(per_func_rewards, weights)  # checks the shapes
    num_completions, num_funcs = per_func_rewards.shape
    _check_groups(num_completions, num_generations)
    if not per_func_rewards.is_floating_point():
        per_func_rewards = per_func_rewards.float()
    weights = weights.to(per_func_rewards)
    unscorable = torch.isnan(per_func_rewards).all(dim=1)

    grouped = per_func_rewards.reshape(-1, num_generations, num_funcs)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = _nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    normalised = ((grouped - mean) / (std + STD_EPS)).reshape(num_completions, num_funcs)
    summed = (normalised * weights).nansum(dim=1)
    summed = torch.where(unscorable, torch.nan, summed)
    batch_std = _nanstd(summed) if summed.numel() > 1 else summed.new_zeros(())
    advantages = torch.nan_to_num((summed - torch.nanmean(summed)) / (batch_std + STD_EPS), nan=0.0)
    stats = {
        "unscorable": unscorable,
        "reward": torch.nanmean(raw).detach(),
        "reward_std": _nanstd(raw).detach(),
        "frac_reward_zero_std": torch.isclose(batch_std, torch.zeros_like(batch_std)).to(summed.dtype),
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


def _entropy_chunks(flat_logits: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """Per row of flat_logits[N, V]: (entropy, logsumexp) in the compute dtype, chunk_tokens rows at a time."""
    compute_dtype = _compute_dtype(flat_logits.dtype)
    entropy = flat_logits.new_empty(flat_logits.shape[0], dtype=compute_dtype)
    logsumexp = torch.empty_like(entropy)
    for start in range(0, flat_logits.shape[0], chunk_tokens):
        end = start + chunk_tokens
        chunk = flat_logits[start:end].to(compute_dtype)
        chunk_logsumexp = torch.logsumexp(chunk, dim=-1)
        softmax = torch.exp(chunk - chunk_logsumexp[:, None])
        entropy[start:end] = chunk_logsumexp - (softmax * chunk).sum(dim=-1)
        logsumexp[start:end] = chunk_logsumexp
    return entropy, logsumexp


class _ChunkedEntropy(torch.autograd.Function):
    """H(softmax(logits)) per row with a backward that never holds a [N, V] float32 tensor.

    Forward keeps the entropy and the logsumexp of each row (logits are saved by reference, not
    copied). Backward rebuilds softmax a chunk at a time: with p = softmax(x) and
    sum_i p_i x_i = logsumexp(x) - H, dH/dx_j = -p_j (x_j - sum_i p_i x_i) = -p_j (log p_j + H).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_tokens: int) -> Tensor:
        flat_logits = logits.reshape(-1, logits.shape[-1])
        entropy, logsumexp = _entropy_chunks(flat_logits, chunk_tokens)
        ctx.save_for_backward(logits, entropy, logsumexp)
        ctx.chunk_tokens = chunk_tokens
        return entropy.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entropy: Tensor):
        logits, entropy, logsumexp = ctx.saved_tensors
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_grad = grad_entropy.reshape(-1, 1).to(entropy.dtype)
        grad_logits = torch.empty_like(flat_logits)
        for start in range(0, flat_logits.shape[0], ctx.chunk_tokens):
            end = start + ctx.chunk_tokens
            log_softmax = flat_logits[start:end].to(entropy.dtype) - logsumexp[start:end, None]
            grad_chunk = torch.exp(log_softmax) * (log_softmax + entropy[start:end, None]) * -flat_grad[start:end]
            grad_logits[start:end] = grad_chunk.to(grad_logits.dtype)
        return grad_logits.view_as(logits), None


def entropy_from_logits(logits: Tensor, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """Entropy of the next-token distribution at each position: logits[..., V] -> [...].

    H = logsumexp(x) - sum(softmax(x) * x), in float32 for half-precision
    logits, chunk_tokens positions at a time, so the extra memory is
    [chunk_tokens, V] floats. Differentiable: when grad is enabled and logits
    require it, the result carries a gradient whose backward rebuilds softmax
    a chunk at a time (dH/dx_j = -p_j (x_j - sum_i p_i x_i)), keeping only two
    floats per position between forward and backward; otherwise (logging,
    under torch.no_grad() or on detached logits) no graph is built.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedEntropy.apply(logits, chunk_tokens)
    entropy, _ = _entropy_chunks(logits.reshape(-1, logits.shape[-1]), chunk_tokens)
    return entropy.view(logits.shape[:-1])


# ---------------------------------------------------------------------------
# Entropy bonus (TRL's entropy_coef, use_adaptive_entropy)
# ---------------------------------------------------------------------------


def entropy_bonus(
    entropies: Tensor,
    completion_mask: Tensor,
    *,
    coef: float,
    accumulation: float = 1.0,
    entropy_mask: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's entropy bonus: the term to subtract from the loss, coef * H / accumulation.

    H is the mean entropy over the effective mask, completion_mask * entropy_mask (the tokens the
    policy term trains on when top_entropy_quantile < 1): sum(H_t * m_t) / max(sum(m_t), 1). It is
    a plain mean whatever the loss type (TRL does not rescale it to a loss type's normaliser).
    The trainer does `loss = loss - bonus`, with `loss` already divided for gradient accumulation;
    this function does the bonus's division: pass accumulation = the gradient accumulation steps
    in training and 1 in evaluation, as TRL. coef is the coefficient to apply this step
    (AdaptiveEntropy.coef_to_apply()). entropies[B, T] must carry the gradient (entropy_from_logits
    on logits that require grad).

    num_tokens replaces the denominator sum(m_t): when a micro-batch is cut into parts, pass the
    micro-batch's effective token count to every part so the parts' bonuses add up to TRL's
    micro-batch mean.

    Returns (bonus, stats): bonus a scalar with gradient; stats["entropy_sum"], stats["token_count"]
    (detached sums over the effective mask) for AdaptiveEntropy.accumulate.
    """
    if entropies.shape != completion_mask.shape:
        raise ValueError(f"completion_mask must have the shape of entropies {tuple(entropies.shape)}, "
                         f"got {tuple(completion_mask.shape)}")
    if entropy_mask is not None and entropy_mask.shape != entropies.shape:
        raise ValueError(f"entropy_mask must have the shape of entropies {tuple(entropies.shape)}, "
                         f"got {tuple(entropy_mask.shape)}")
    if accumulation <= 0:
        raise ValueError(f"accumulation must be > 0, got {accumulation}")
    effective = completion_mask.bool() if entropy_mask is None else completion_mask.bool() & entropy_mask.bool()
    entropy_sum = torch.where(effective, entropies, 0.0).sum()
    token_count = effective.sum().to(entropy_sum.dtype)
    denominator = token_count if num_tokens is None else torch.as_tensor(num_tokens, dtype=entropy_sum.dtype,
                                                                         device=entropy_sum.device)
    bonus = coef * (entropy_sum / denominator.clamp(min=1)) / accumulation
    return bonus, {"entropy_sum": entropy_sum.detach(), "token_count": token_count}


class AdaptiveEntropy:
    """TRL's entropy-coefficient controller (Skywork-OR1's adaptive entropy control), without collectives.

    Static (adaptive=False): the bonus coefficient is `coef`, always. Adaptive: the coefficient moves
    once per optimizer step, +delta when the step's entropy (over every process and micro-batch) was
    at or below `target`, -delta otherwise, kept in [coef_min, coef_max]; and it is applied only
    while the last measured entropy is at or below `target`. last_world_entropy starts at +inf, so
    the first accumulation window applies no bonus until a measurement arrives (TRL's default).

    Use, per micro-batch in training: bonus coef_to_apply() (the same for the whole window), then
    accumulate(entropy_sum, token_count) with entropy_bonus's stats; at the optimizer-step boundary
    the trainer sums window() over processes and calls step(sum / max(count, 1)). Evaluation must
    neither accumulate nor step (TRL gates the update on training). state_dict() holds what TRL
    saves in entropy_ctrl_state.json (the window is empty at a checkpoint).
    """

    def __init__(self, coef: float = 0.0, *, adaptive: bool = False, target: float = 0.2, delta: float = 0.005,
                 coef_min: float = 0.0, coef_max: float = 1.0):
        if adaptive and not coef_min <= coef_max:
            raise ValueError(f"entropy_coef_min ({coef_min}) must not exceed entropy_coef_max ({coef_max})")
        if adaptive and delta < 0:
            raise ValueError(f"entropy_coef_delta must be >= 0, got {delta}")
        self.coef = float(coef)
        self.adaptive = adaptive
        self.target, self.delta, self.coef_min, self.coef_max = target, delta, coef_min, coef_max
        self.last_world_entropy = math.inf
        self._window: Tensor | None = None  # [entropy_sum, token_count] of this accumulation window

    @property
    def enabled(self) -> bool:
        """Whether the bonus term is added at all: a non-zero static coef, or adaptive mode (whose coef may
        come back from 0)."""
        return self.adaptive or self.coef != 0.0

    def coef_to_apply(self) -> float:
        """The coefficient of this window's bonus: coef, gated off in adaptive mode while the last measured
        entropy is above target."""
        if self.adaptive:
            return self.coef if self.last_world_entropy <= self.target else 0.0
        return self.coef

    def accumulate(self, entropy_sum: float | Tensor, token_count: float | Tensor) -> None:
        """Add one micro-batch's entropy sum and token count to the window (no host sync)."""
        entropy_sum = torch.as_tensor(entropy_sum).detach().double()
        token_count = torch.as_tensor(token_count, device=entropy_sum.device).detach().double()
        stats = torch.stack([entropy_sum, token_count])
        self._window = stats if self._window is None else self._window + stats

    def window(self) -> Tensor:
        """This window's [entropy_sum, token_count] (float64), for the trainer to sum over processes."""
        return torch.zeros(2, dtype=torch.float64) if self._window is None else self._window

    def step(self, world_entropy: float | Tensor) -> float:
        """End of an optimizer step: move coef by +-delta within [coef_min, coef_max] (adaptive mode only),
        remember world_entropy for the next window's gate, empty the window. Returns the new coef."""
        self._window = None
        if not self.adaptive:
            return self.coef
        world_entropy = float(world_entropy)
        if world_entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_world_entropy = world_entropy
        return self.coef

    def state_dict(self) -> dict[str, float]:
        """TRL's checkpoint keys (entropy_ctrl_state.json)."""
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_world_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["entropy_coef"])
        self.last_world_entropy = float(state["last_world_entropy"])
        self._window = None


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

    A NaN generator logprob on a completion token (one it could not score) counts as a log-ratio of
    0 (weight 1), as in TRL.

    Returns (weights, metrics) with TRL's names: sampling/importance_sampling_ratio/{min,mean,max}
    (of the weights, over completion tokens or completions) and
    sampling/sampling_logp_difference/{mean,max} (of |trainer - generator| over the scored
    completion tokens).
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
    # A token the generator could not score (NaN logprob) gets ratio 1, no correction, and stays out
    # of the logp-difference metrics, as in TRL 1.16.
    unscored = torch.isnan(log_ratio)
    log_ratio = torch.where(unscored, 0.0, log_ratio)
    sequence = mode.startswith("sequence")
    ratio = torch.exp(log_ratio.sum(1, keepdim=True) if sequence else log_ratio)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=None if clip_min is None else clip_min, max=None if clip_max is None else clip_max)
    else:
        weights = torch.where((ratio >= low) & (ratio <= high), ratio, 0.0)

    counted = weights.squeeze(1) if sequence else weights[mask]
    difference = log_ratio.abs()[mask & ~unscored]
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


def get_high_entropy_mask(
    entropies: Tensor, mask: Tensor, threshold: float, gathered_entropies: Tensor | None = None
) -> Tensor:
    """TRL's GRPOTrainer.get_high_entropy_mask as a pure function: the tokens whose entropy is in the top.

    entropies[B, T], mask[B, T] (1: a completion token); threshold: the quantile in [0, 1] (TRL passes
    1 - top_entropy_quantile). The cut is torch.quantile, in float32 as TRL, of the completion tokens'
    entropies; returns a bool [B, T], True where entropy >= the cut on a completion token, all False
    when there is no token. TRL's method gathers the entropies of every process itself; this one does
    no collective: without gathered_entropies the cut is over this batch's tokens (the single-process
    result), and a multi-process caller passes gathered_entropies, every process's completion-token
    entropies (1-D, padding removed), for TRL's numbers.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the entropy quantile threshold must be in [0, 1], got {threshold}")
    if mask.shape != entropies.shape:
        raise ValueError(f"mask must have the shape of entropies {tuple(entropies.shape)}, got {tuple(mask.shape)}")
    pool = entropies[mask.bool()] if gathered_entropies is None else gathered_entropies.reshape(-1)
    if pool.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    cut = torch.quantile(pool.float(), threshold)
    return ((entropies * mask.float()) >= cut) & mask.bool()


def get_off_policy_mask(
    advantages: Tensor,
    per_token_logps: Tensor,
    sampling_per_token_logps: Tensor,
    mask: Tensor,
    off_policy_threshold: float,
) -> Tensor:
    """TRL's GRPOTrainer.get_off_policy_mask (DeepSeek-V3.2's off-policy sequence mask): [B, 1], 1 keep, 0 drop.

    A completion is dropped when its advantage is negative and the mean over its tokens (mask) of
    log p_sampler - log p_current (per_token_logps, detached) exceeds off_policy_threshold. NaN
    differences (tokens the sampler could not score) count as 0, as in TRL (which also maps +-inf
    to the largest finite floats, so inf in padding is harmless). advantages: [B, 1] as TRL, or [B].
    The result has mask's dtype, as TRL's.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    divergence = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    mean_divergence = (divergence * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_divergence <= off_policy_threshold)).to(dtype=mask.dtype)


@torch.no_grad()
def get_gamma_weights(
    advantages: Tensor,
    log_ratio_per_token: Tensor,
    mask: Tensor,
    importance_sampling_ratio: Tensor | None,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> Tensor:
    """TRL's GRPOTrainer.get_gamma_weights: VESPO's weight phi(w) per completion, [B, 1], without gradient.

    w is the completion's importance weight, log w = sum over its tokens of log(p / p_old), each
    token's log-ratio clamped to [-20, 20]; with the sampler correction, plus the sum over the
    last dimension of log(importance_sampling_ratio[B, T]), each clamped to [log 1e-8, 20] (a
    masked-out ratio of 0 counts as 1e-8). log w is clamped to [log 1e-8, 20], and
    phi(w) = e^lambda * w^k * e^(-lambda * w), computed in log space (phi(1) = 1), with k, lambda =
    k_pos, lambda_pos where A >= 0, else k_neg, lambda_neg (lambda at least 1e-4); NaN or inf -> 0.
    advantages: [B, 1] as TRL, or [B]. Padding (mask 0) never counts, whatever it holds (TRL
    multiplies by the mask, so NaN there would turn phi to 0).
    """
    lower = math.log(1e-8)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = torch.where(mask.bool(), log_ratio_per_token.clamp(-20.0, 20.0), 0.0)
    log_w = log_ratio.sum(dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_w = log_w + torch.log(importance_sampling_ratio).clamp(lower, 20.0).sum(dim=-1, keepdim=True)
    log_w = log_w.clamp(lower, 20.0)
    nonnegative = advantages >= 0
    k = torch.where(nonnegative, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))
    lam = torch.where(nonnegative, log_w.new_tensor(lambda_pos), log_w.new_tensor(lambda_neg)).clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass(frozen=True)
class LossSpec:
    """The policy loss's settings: which loss, its clip range, its penalties and its corrections.

    GRPOConfig's fields of the same meaning (`LossSpec.from_config`); checked once, when built.
    epsilon_high None means epsilon_low (a symmetric clip)."""

    loss_type: str
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None  # caps the unclipped branch (two-sided clipping)
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    beta: float = 0.0  # the KL penalty's weight
    use_bias_correction_kl: bool = False
    max_completion_length: int | None = None  # dr_grpo's constant normaliser
    vllm_is_mode: str = "sequence_mask"
    vllm_is_clip_min: float | None = None
    vllm_is_clip_max: float | None = 3.0
    off_policy_mask_threshold: float | None = None

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon_low)
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {self.epsilon_low} and "
                             f"{self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.epsilon_high:
            raise ValueError(f"delta={self.delta} caps the ratio above the clip range, so it must exceed "
                             f"1 + epsilon_high = {1 + self.epsilon_high}")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ValueError("sapo temperatures must be > 0")
        if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length < 1):
            raise ValueError(f"loss_type='dr_grpo' divides by batch * max_completion_length: pass "
                             f"max_completion_length (a positive int), got {self.max_completion_length}")

    @classmethod
    def from_config(cls, args) -> "LossSpec":
        """From a GRPOConfig (TRL's field names)."""
        return cls(
            loss_type=args.loss_type, epsilon_low=args.epsilon, epsilon_high=args.effective_epsilon_high,
            delta=args.delta, importance_sampling_level=args.importance_sampling_level,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg, beta=args.beta, use_bias_correction_kl=args.use_bias_correction_kl,
            max_completion_length=args.max_completion_length, vllm_is_mode=args.vllm_importance_sampling_mode,
            vllm_is_clip_min=args.vllm_importance_sampling_clip_min,
            vllm_is_clip_max=args.vllm_importance_sampling_clip_max,
            off_policy_mask_threshold=args.off_policy_mask_threshold)


def policy_term(spec: LossSpec, logps: Tensor, old_logps: Tensor, advantage: Tensor, mask: Tensor,
                is_weights: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The per-token policy loss of spec.loss_type (see grpo_loss), before masks: (loss [B, T], ratio [B, T]
    or [B, 1], metrics). logps and old_logps are 0 on padding; advantage is [B, 1]."""
    metrics: dict[str, Tensor] = {}
    token_log_ratio = logps - old_logps
    log_ratio = token_log_ratio
    if spec.importance_sampling_level == "sequence":
        log_ratio = _sequence_mean(log_ratio, mask)  # [B, 1]: every token of a completion shares it
    ratio = torch.exp(log_ratio)
    if spec.loss_type == "cispo":
        weight = ratio.clamp(max=spec.epsilon_high).detach()
        per_token_loss = -weight * advantage * logps
        cispo_clipped = ((ratio.detach() > spec.epsilon_high) & (advantage > 0)).expand_as(logps)
        metrics["cispo_clip_ratio"] = masked_mean(cispo_clipped.to(logps.dtype), mask)
    elif spec.loss_type == "sapo":
        temperature = torch.where(advantage > 0, advantage.new_tensor(spec.sapo_temperature_pos),
                                  advantage.new_tensor(spec.sapo_temperature_neg))
        per_token_loss = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantage
    elif spec.loss_type == "vespo":
        # Padding's weight is 1 (log 0), whatever the clip range makes of the ratio 1 there.
        folded = None if is_weights is None else torch.where(mask, is_weights, 1.0)
        phi = get_gamma_weights(advantage, token_log_ratio, mask, folded, spec.vespo_k_pos, spec.vespo_lambda_pos,
                                spec.vespo_k_neg, spec.vespo_lambda_neg)
        per_token_loss = -phi * advantage * logps
        metrics["vespo/phi_seq_mean"] = phi.mean()
    else:  # grpo, bnpo, dr_grpo, dapo, luspo
        clipped_ratio = ratio.clamp(1 - spec.epsilon_low, 1 + spec.epsilon_high)
        capped = ratio if spec.delta is None else ratio.clamp(max=spec.delta)
        per_token_loss = -torch.min(capped * advantage, clipped_ratio * advantage)
    return per_token_loss.expand_as(logps), ratio, metrics


def kl_penalty(ref_logps: Tensor, logps: Tensor, ratio: Tensor, bias_correction: bool) -> Tensor:
    """The k3 estimator of KL(policy || reference) per token, exp(ref - logp) - (ref - logp) - 1; times the
    ratio with bias_correction (DeepSeek-V3.2's unbiased estimator). ref_logps is 0 on padding."""
    ref_minus_logp = ref_logps - logps
    kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
    return kl * ratio if bias_correction else kl


def aggregate(loss_type: str, masked_loss: Tensor, mask_float: Tensor, max_completion_length: int | None,
              num_items_in_batch: int | Tensor | None, num_processes: int) -> Tensor:
    """The scalar loss from the masked per-token loss [B, T], by loss_type's normaliser (see grpo_loss)."""
    if loss_type in ("grpo", "sapo"):
        return (masked_loss.sum(dim=1) / mask_float.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "luspo":
        return masked_loss.sum(dim=1).mean()
    if loss_type == "bnpo":
        return masked_loss.sum() / mask_float.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked_loss.sum() / (masked_loss.shape[0] * max_completion_length)
    # dapo, cispo, vespo
    global_tokens = mask_float.sum() if num_items_in_batch is None else num_items_in_batch
    global_tokens = torch.as_tensor(global_tokens, dtype=masked_loss.dtype, device=masked_loss.device).clamp(min=1)
    return masked_loss.sum() / (global_tokens / num_processes)


def clip_metrics(ratio: Tensor, advantage: Tensor, mask: Tensor, epsilon_low: float,
                 epsilon_high: float) -> dict[str, Tensor]:
    """Which tokens the clip bound (only in the direction the advantage pushes), on the unclipped ratio, as
    TRL measures it."""
    ratio = ratio.detach().expand_as(mask)
    low = (ratio < 1 - epsilon_low) & (advantage < 0)
    high = (ratio > 1 + epsilon_high) & (advantage > 0)
    dtype = ratio.dtype
    return {"clip_ratio/low_mean": masked_mean(low.to(dtype), mask),
            "clip_ratio/high_mean": masked_mean(high.to(dtype), mask),
            "clip_ratio/region_mean": masked_mean((low | high).to(dtype), mask)}


def _check_shapes(spec: LossSpec, per_token_logps: Tensor, advantages: Tensor, **others: Tensor | None) -> None:
    if per_token_logps.dim() != 2:
        raise ValueError(
            f"per_token_logps must have shape [batch, completion_tokens], got {tuple(per_token_logps.shape)}")
    for name, other in others.items():
        if other is not None and other.shape != per_token_logps.shape:
            raise ValueError(f"{name} must have the shape of per_token_logps {tuple(per_token_logps.shape)}, "
                             f"got {tuple(other.shape)}")
    batch_size = per_token_logps.shape[0]
    if advantages.shape != (batch_size,):
        raise ValueError(f"advantages must have shape [batch] = ({batch_size},), got {tuple(advantages.shape)}")
    if spec.beta != 0.0 and others.get("ref_per_token_logps") is None:
        raise ValueError("beta != 0 adds a KL penalty to the reference model: pass ref_per_token_logps")
    if spec.loss_type == "vespo" and others.get("sampling_per_token_logps") is not None \
            and not spec.vllm_is_mode.startswith("token"):
        raise ValueError(f"loss_type='vespo' folds per-token importance weights into its sequence weight: "
                         f"vllm_is_mode must be 'token_truncate' or 'token_mask', got {spec.vllm_is_mode!r}")


def grpo_loss(
    spec: LossSpec,
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    ref_per_token_logps: Tensor | None = None,
    sampling_per_token_logps: Tensor | None = None,
    entropy_mask: Tensor | None = None,
    num_items_in_batch: int | Tensor | None = None,
    num_processes: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's policy loss and its variants, with optional KL penalty, masks and IS correction.

    The ratio r = exp(logp - old_logp): per token, or (importance_sampling_level="sequence", GSPO)
    one per completion, exp of the mean of its tokens' log-ratios. old_per_token_logps None means
    the round is on-policy: old = logp.detach(), so r == 1 in value but carries logp's gradient.
    With A the completion's advantage, the per-token loss (policy_term) is
    - grpo, bnpo, dr_grpo, dapo, luspo: -min(min(r, delta) * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)
      (delta, when given, caps the unclipped branch: two-sided clipping);
    - cispo: -min(r, epsilon_high).detach() * A * logp (the clipped weight, not the ratio, is held);
    - sapo: -sigmoid(tau * (r - 1)) * 4 / tau * A, tau = sapo_temperature_pos where A > 0 else _neg
      (a smooth gate instead of a hard clip);
    - vespo: -phi(w) * A * logp, phi = get_gamma_weights (held, no gradient) of the completion's
      token-summed log-ratio, with the vespo_* parameters. TRL advises importance_sampling_level
      "token" for vespo and "sequence" for luspo; neither is enforced.
    Then, in TRL's order, the policy term is multiplied by
    - the off-policy mask (off_policy_mask_threshold, get_off_policy_mask): 0 for completions with
      A < 0 whose mean log(p_generator / p_current) over their tokens exceeds the threshold
      (logp_generator: sampling_per_token_logps, else the old logps);
    - entropy_mask[B, T] (top_entropy_quantile, computed by the caller over the whole batch);
    - the vLLM importance weights of vllm_importance_weights (mode vllm_is_mode) when
      sampling_per_token_logps is given, except for vespo, which folds them into w instead (log
      space, summed over the completion's tokens; vespo needs a token_* mode, as in TRL);
    and the KL term beta * kl_penalty is added; use_bias_correction_kl multiplies that KL by r first
    (differentiable, token or sequence level as r is; it changes the gradient even on-policy, where r == 1).

    Aggregation over the completion tokens (completion_mask[B, T], see aggregate):
    - "grpo", "sapo": mean over each sequence's tokens, then mean over sequences;
    - "luspo": sum over each sequence's tokens, then mean over sequences (longer completions weigh more);
    - "bnpo": sum / number of tokens in this (local) batch;
    - "dr_grpo": sum / (B * max_completion_length), a constant normalizer;
    - "dapo", "cispo", "vespo": sum / (num_items_in_batch / num_processes), where num_items_in_batch
      counts the completion tokens of the optimizer step (all processes, all its micro-batches). The
      division by num_processes undoes DDP's gradient averaging, so the gradient is that of
      (step's sum) / (step's tokens). Without num_items_in_batch, this batch's token count is used.
    The trainer divides the others (not GLOBALLY_NORMALISED) by the gradient accumulation steps.

    Returns (loss, metrics): detached scalars named as TRL logs them, over this batch's completion
    tokens: clip_ratio/low_mean (r below 1 - epsilon_low with A < 0), clip_ratio/high_mean (above
    1 + epsilon_high with A > 0), clip_ratio/region_mean (either), for every loss type but vespo;
    cispo_clip_ratio for cispo; vespo/phi_seq_mean (mean of phi over the completions) for vespo;
    kl (after the bias correction, as TRL) when beta != 0; and the sampling/* metrics of
    vllm_importance_weights.
    """
    _check_shapes(spec, per_token_logps, advantages, completion_mask=completion_mask,
                  old_per_token_logps=old_per_token_logps, entropy_mask=entropy_mask,
                  ref_per_token_logps=ref_per_token_logps, sampling_per_token_logps=sampling_per_token_logps)
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    mask = completion_mask.bool()
    mask_float = mask.to(per_token_logps.dtype)
    # Padded positions may hold anything (even inf); replace them before exp so
    # that neither the loss nor its gradient can turn into NaN through 0 * inf.
    logps = torch.where(mask, per_token_logps, 0.0)
    old_logps = logps.detach() if old_per_token_logps is None else torch.where(mask, old_per_token_logps, 0.0)
    advantage = advantages.to(logps.dtype)[:, None]

    metrics: dict[str, Tensor] = {}
    is_weights = None
    if sampling_per_token_logps is not None:
        is_weights, is_metrics = vllm_importance_weights(old_logps, sampling_per_token_logps, mask, spec.vllm_is_mode,
                                                         spec.vllm_is_clip_min, spec.vllm_is_clip_max)
        metrics.update(is_metrics)
    per_token_loss, ratio, policy_metrics = policy_term(spec, logps, old_logps, advantage, mask, is_weights)
    metrics.update(policy_metrics)

    if spec.off_policy_mask_threshold is not None:
        behaviour = old_logps if sampling_per_token_logps is None else torch.where(mask, sampling_per_token_logps, 0.0)
        per_token_loss = per_token_loss * get_off_policy_mask(advantage, logps, behaviour.detach(), mask_float,
                                                              spec.off_policy_mask_threshold)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(logps.dtype)
    if is_weights is not None and spec.loss_type != "vespo":
        per_token_loss = per_token_loss * is_weights
    if spec.beta != 0.0:
        per_token_kl = kl_penalty(torch.where(mask, ref_per_token_logps, 0.0), logps, ratio,
                                  spec.use_bias_correction_kl)
        per_token_loss = per_token_loss + spec.beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl.detach().expand_as(logps), mask)

    loss = aggregate(spec.loss_type, per_token_loss * mask_float, mask_float, spec.max_completion_length,
                     num_items_in_batch, num_processes)
    if spec.loss_type != "vespo":
        metrics.update(clip_metrics(ratio, advantage, mask, spec.epsilon_low, spec.epsilon_high))
    return loss, metrics
