"""Pushing the trainer's weights to the generator, tried again on every rank alike when a push may pass.

A push is collective: parameters are gathered from ZeRO-3 / FSDP shards as the sender packs them, so
every rank runs every attempt to its end, also when its own send failed, and the ranks agree (one
gather) on whether it succeeded everywhere before any of them moves on. Meanwhile the generator
refuses to generate (its weights may be mixed), so no completion of an inconsistent generator is
ever trained on.
"""

import logging
from collections.abc import Callable

from fastgrpo.trainer.collectives import ExplainedError

logger = logging.getLogger(__name__)

WEIGHT_SYNC_ATTEMPTS = 3  # a push that fails for a reason that may pass is tried again


class WeightSyncError(ExplainedError):
    """A push failed on some rank (every rank raises it): its own transport errors are not collectives'."""


def _server_error(exc: BaseException | None):
    from fastgrpo.client import ServerError

    while exc is not None:
        if isinstance(exc, ServerError):
            return exc
        exc = exc.__cause__
    return None


def push_may_pass(exc: Exception) -> bool:
    """Whether trying a failed push again can help: not when the generator refused it (a 4xx answer)."""
    refused = _server_error(exc)
    return refused is None or refused.status >= 500


def generation_may_pass(exc: Exception) -> bool:
    """Whether a generation that failed may succeed once the next push lands: the server refused it because a push
    that failed half-way left its weights mixed (the trainer pushes again, and retries a failed push)."""
    refused = _server_error(exc)
    return refused is not None and refused.status == 503 and refused.type == "weights_inconsistent"


def push_with_retries(push_once: Callable[[], None], version: int, process_index: int,
                      attempts: int = WEIGHT_SYNC_ATTEMPTS) -> None:
    """Run `push_once()` (every rank) until it succeeds on every rank; a failure that may not pass (a refusal)
    on any rank, or the last attempt's failure, raises WeightSyncError on every rank."""
    from accelerate.utils import gather_object

    for attempt in range(1, attempts + 1):
        failure = None
        try:
            push_once()
        except Exception as exc:
            failure = (f"{type(exc).__name__}: {exc}", push_may_pass(exc))
            logger.error("weight sync of step %d failed on process %d (attempt %d of %d): %s", version,
                         process_index, attempt, attempts, failure[0])
        failures = [f for f in gather_object([failure]) if f is not None]
        if not failures:
            return
        if attempt == attempts or not all(may_pass for _, may_pass in failures):
            tried = f" after {attempt} attempts" if attempt > 1 else ""
            raise WeightSyncError(f"pushing the weights of step {version} to the generator failed{tried}: "
                                  f"{failures[0][0]}")
