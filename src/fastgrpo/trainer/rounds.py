"""One generation round's data: what generating gives, the batch tensors, and its metrics (no processes here).

The trainer's words, used the same way everywhere:

- A **group** is the `num_generations` completions of one prompt; advantages are computed within groups.
- A **round** is one generation: every prompt of a generation batch (`generation_batch_size` rows, all
  processes together), generated, scored and cut into micro-batches. Each prompt gets its own sampling
  seed. A round serves `steps_per_generation` micro-steps (times `num_iterations`).
- A **step** is one optimizer step, `gradient_accumulation_steps` micro-steps. A round that serves several
  steps deals its rows to them at random. The weights' **version** is the number of steps taken; a push
  follows every step, and every completion reports the versions it ran under.
- A **micro-batch** is one process's rows of one micro-step (`per_device_train_batch_size` rows); inside a
  step, rows are ordered so that micro-batches pad little.
- A **part** is a piece of a padded micro-batch run as its own forward and backward, so that each pads only
  to its own longest row (batching.cut_for_padding). Every process runs the same number of parts (it sets
  how many forwards each runs, so it is agreed across processes); a padding-free micro-batch is never cut.
"""

from dataclasses import dataclass

import torch

from fastgrpo.trainer.batching import pad_rows
from fastgrpo.trainer.multi_turn import RoundRollout


@dataclass
class Generated:
    """This process's rows of a round, generated (single-turn, or multi-turn episodes)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampling_logps: list[list[float]] | None  # the generator's logprob of each completion token
    terminated: list[bool]  # ended on a stop condition, not the length cap
    weight_version: int | None  # the weights the generator ran (None: it does not say)
    staleness: list[int] | None = None  # async: steps behind the trainer, per completion; None: generated now
    episodes: RoundRollout | None = None  # multi-turn: the episodes, their masks and reward columns
    ahead_seconds: float | None = None  # async: how long the producer took to generate it


def round_tensors(generated: Generated, advantages: torch.Tensor, pad_id: int,
                  mask_truncated: bool) -> dict[str, torch.Tensor]:
    """The round's batch: prompts left-padded, completions right-padded, the loss mask, advantages."""
    prompt_ids, completion_ids = generated.prompt_ids, generated.completion_ids
    completion_attention = pad_rows([[1] * len(c) for c in completion_ids], 0)
    # The loss covers the model's own tokens: all of a single turn, never a tool's or an environment's.
    episodes = generated.episodes
    completion_mask = completion_attention.clone() if episodes is None else pad_rows(episodes.completion_mask, 0)
    if mask_truncated:
        completion_mask[~torch.tensor(generated.terminated, dtype=torch.bool)] = 0
    return {"prompt_ids": pad_rows(prompt_ids, pad_id, left=True),
            "prompt_mask": pad_rows([[1] * len(p) for p in prompt_ids], 0, left=True),
            "completion_ids": pad_rows(completion_ids, pad_id), "completion_attention": completion_attention,
            "completion_mask": completion_mask, "advantages": advantages}


def length_metrics(lengths: torch.Tensor, terminated: torch.Tensor) -> dict[str, float]:
    """TRL's completions/* metrics over every process's completions (terminated: ended on a stop condition)."""
    done = lengths[terminated]
    return {"completions/mean_length": lengths.float().mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": 1.0 - terminated.float().mean().item(),
            "completions/mean_terminated_length": done.float().mean().item() if len(done) else 0.0,
            "completions/min_terminated_length": done.min().item() if len(done) else 0.0,
            "completions/max_terminated_length": done.max().item() if len(done) else 0.0}


def episode_metrics(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-episode means over every process's rows (TRL's tools/call_frequency and tools/failure_frequency);
    `totals` holds each RoundRollout.per_row series, gathered."""
    out = {}
    if "multi_turn/turns" in totals:
        out["multi_turn/turns_mean"] = totals["multi_turn/turns"].mean().item()
        out["multi_turn/turns_max"] = totals["multi_turn/turns"].max().item()
        out["multi_turn/step_timeouts"] = totals["multi_turn/step_timeouts"].sum().item()
    generated, env = totals["completions/generated_tokens"], totals["completions/env_tokens"]
    out["completions/generated_tokens_mean"] = generated.mean().item()
    out["completions/env_tokens_mean"] = env.mean().item()
    out["completions/generated_fraction"] = (generated.sum() / (generated.sum() + env.sum()).clamp(min=1)).item()
    if "tools/calls" in totals:
        calls, failures = totals["tools/calls"].sum().item(), totals["tools/failures"].sum().item()
        out["tools/call_frequency"] = totals["tools/calls"].mean().item()
        out["tools/failure_frequency"] = failures / calls if calls else 0.0
        out["tools/failures_per_episode"] = totals["tools/failures"].mean().item()
        for key, values in totals.items():
            if key.startswith("tools/failures/"):
                out[key] = values.mean().item()
    return out
