"""Collectives between the training processes that end, and say why when they fail.

Every process must issue the same collectives in the same order. The trainer's decisions that
change how many forwards, backwards or gathers a process runs are either taken from the config
(the same everywhere) or agreed first:

- how many parts a micro-batch is cut into (batching.split_round): from a cost table gathered
  from every process, the maximum over processes per entry;
- prompt sharing (forward.completion_logits): two forwards whenever it is on, whatever the rows;
- whether a weight push is tried again (GRPOTrainer.sync_weights): from every process's outcome;
- loss metrics, the entropy quantile, round metrics: one gather per part, round or key, where the
  parts, rounds and keys are agreed or fixed by the config.

What is left to catch is a process that dies, a bug, or a step slower than the timeout: the
process group gets `GRPOConfig.ddp_timeout` (every collective then fails after that long instead
of waiting forever) and a failed collective is re-raised as `CollectiveError`, naming the rank,
the step and what the rank was doing.
"""

import datetime

import torch

DEBUG_HINT = ("TORCH_DISTRIBUTED_DEBUG=DETAIL (and TORCH_CPP_LOG_LEVEL=INFO) makes torch check that every rank "
              "issues the same collective with the same shapes, and name the first one that differs")

# Where torch's gloo and NCCL errors come from (a timeout, a peer gone): their messages name the source file.
_BACKEND_SIGNS = ("gloo/", "nccl", "c10d", "processgroup")


class ExplainedError(RuntimeError):
    """An error whose message already says what happened and what to do: never re-explained."""


class CollectiveError(ExplainedError):
    """A collective between the training processes failed: a peer died, ran other collectives, or was too slow."""


def set_timeout(seconds: float) -> None:
    """Every collective of the default process group fails after `seconds` instead of waiting forever.

    transformers passes ddp_timeout to the process group on GPUs but not with use_cpu=True, and a group
    created before the trainer (by a script) has whatever its creator chose: set it here, once, for both."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if dist.is_available() and dist.is_initialized():
        _set_pg_timeout(datetime.timedelta(seconds=seconds))


def is_collective_failure(exc: BaseException) -> bool:
    """Whether an exception came out of a collective between the processes (or a chained one did)."""
    import torch.distributed as dist

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ExplainedError):
            return False  # says what happened already (a failed collective, a failed weight push, ...)
        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
        if isinstance(exc, RuntimeError) and any(sign in str(exc).lower() for sign in _BACKEND_SIGNS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def explain(exc: BaseException, rank: int, world_size: int, where: str, step: int, timeout_s: float) -> CollectiveError:
    """The error a user reads when a collective failed on this rank: who, where, and what to check."""
    return CollectiveError(
        f"rank {rank} of {world_size}: a collective between the training processes failed during {where} "
        f"(optimizer step {step}): {type(exc).__name__}: {str(exc)[:500]}\n"
        "What to check, in this order:\n"
        "  1. another process failed or exited first: its own error is in its log (with accelerate launch, the "
        "lines prefixed by its rank); this rank then only lost its peer;\n"
        f"  2. one process was slower than ddp_timeout={timeout_s:g} s at this point (the main process generates a "
        "whole round while the others wait): raise GRPOConfig(ddp_timeout=...);\n"
        "  3. the processes issued different collectives: a fastgrpo bug, please report it with your GRPOConfig. "
        f"{DEBUG_HINT}.")


def gathered_max(accelerator, values: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `values` over every process (one gather), back on the CPU."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.gather(values.to(accelerator.device, torch.float32)[None]).amax(0).cpu()
