"""Admission: how every generation enters the engines, whichever route asked for it (/generate, vLLM's API).

A generation is admitted under the read side of the server's lock, so a weight push (the write side) waits
only for requests being handed to the engines, and requests that arrive during a push wait for it; running
ones are paused in the engines (serve/weights.py). Once admitted, a generation
- is refused while the engines hold a mix of old and new weights (a push failed half-way);
- has its prefix-cache keys salted with its weight version, so no request reuses keys and values computed
  under other weights (with --kv_after_push keep, the cache is not reset at a push);
- holds its LoRA adapter's version to the end (a push loads a new version beside it);
- is listed in flight: each push that lands while it runs appends its version, and one that fails half-way
  marks it (its tokens may mix weights, so it answers 503).
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastgrpo.serve.adapters import Adapter
from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.state import InFlight, ServerState

MIXED_WEIGHTS = ("the last weight push failed half-way, so the engines hold a mix of old and new weights; push "
                 "the whole model again (VLLMClient.update_weights)")
PUSH_FAILED_MEANWHILE = ("a weight push failed half-way while this request was generating, so it was stopped (its "
                         "tokens could mix old and new weights); push the whole model again "
                         "(VLLMClient.update_weights) and retry.")


@dataclass
class Ticket:
    flight: InFlight
    salt: str  # the prefix-cache salt of its weight version (and adapter)
    adapter: Adapter | None = None  # the adapter version it holds, or None for the base model

    @property
    def versions(self) -> list[int]:
        """[first, last] weight version it ran under (first is a lower bound: a request still queued in the
        engine when a push pauses it runs wholly on the new weights)."""
        if self.adapter is not None:
            return [self.adapter.version, self.adapter.version]
        return [self.flight.versions[0], self.flight.versions[-1]]


async def admit(state: ServerState, adapter: str | None,
                start: Callable[[Ticket], Awaitable]) -> tuple[Ticket, asyncio.Future]:
    """Admit a generation and start it (`start(ticket)`, as a task); the caller awaits the task, then calls
    `release`. Raises ApiError 503 while the weights are mixed, 400/404 for an adapter this server lacks."""
    async with state.lock.read():
        # Read under the lock: a request that queued behind a push sees how that push ended.
        if not state.weights_consistent:
            raise ApiError(503, "weights_inconsistent", MIXED_WEIGHTS)
        version = state.weight_version
        salt = f"fastgrpo-weights-{version}"
        held = None
        if adapter is not None:
            if not state.settings.enable_lora:
                raise ApiError(400, "invalid_request", f"adapter {adapter!r} asked for, but this server serves no "
                               "LoRA adapters: start it with --enable_lora", "adapter")
            held = state.adapters.acquire(adapter)
            salt = f"{salt}-lora-{held.request.lora_int_id}"
        ticket = Ticket(InFlight([version]), salt, held)
        state.inflight.append(ticket.flight)
        running = asyncio.ensure_future(start(ticket))
        try:
            # Let it hand its requests to the engines before a push may pause them. One still on its way then
            # waits in the engine's queue and runs on the new weights: versions[0] is a lower bound.
            await asyncio.sleep(0)
        except BaseException:  # the client went away: nothing waits for this generation
            running.cancel()
            await release(state, ticket)
            raise
    return ticket, running


async def release(state: ServerState, ticket: Ticket) -> None:
    state.inflight.remove(ticket.flight)
    if ticket.adapter is not None:
        await state.adapters.release(ticket.adapter, state.engine)


def check_not_mixed(ticket: Ticket) -> None:
    if ticket.flight.push_failed:
        raise ApiError(503, "weights_inconsistent", PUSH_FAILED_MEANWHILE)
