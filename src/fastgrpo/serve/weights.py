"""The weight-sync routes: open a group, announce a push, receive it, close.

A push is two requests so that a bad one is refused before any collective starts:
`/weights/start` validates the names, shapes and dtypes and announces the push;
`/weights/update` pauses the engines between two decode steps, keeping their
requests in flight (vLLM's `pause_generation(mode="keep")`), runs vLLM's
`start_weight_update` / `update_weights` / `finish_weight_update` on the workers
of the group while the trainer sends, and resumes them. Running generations go
on across a push (each reports the versions it ran under, see --kv_after_push
for their keys and values); new ones wait until the load has finished. An
announcement alone holds nothing, and one whose data never starts expires after
ANNOUNCE_TTL_S.

The guarantee: generation runs only on weights that one whole push left behind.
From the moment a push touches the engines until it has finished on every
DP rank, `weights_consistent` is False; a push that fails half-way leaves it False
(and each engine's layerwise reload cleaned up, so the next push starts clean),
and only a push that names every weight sets it True again. Recovery needs no
human: the trainer pushes again (GRPOTrainer retries a failed sync), and
meanwhile /generate answers 503, so no completion comes from mixed weights;
requests that were in flight when the push failed are aborted and answer 503.

A group belongs to the trainer that opened it: the `group_id` that /weights/init
returns must come with every push and with /weights/close. A second trainer gets
409 while the owner's rendezvous still listens (its process is alive), and takes
the group over once it does not.

This module is the machinery (groups, a load's phases on the engines) that both routers use:
serve/routes/weights.py (ours) and serve/routes/vllm_weights.py (vLLM's weight routes).
"""

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable

from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.specs import covers_all
from fastgrpo.serve.state import ServerState, WeightGroup
from fastgrpo.transfer.gloo import TRAINER_DID_NOT_SEND
from fastgrpo.transfer.push import RELOAD_CLEANUP_STEPS
from fastgrpo.vllm_compat import has_engine_method

log = logging.getLogger("fastgrpo.serve")
FINISH_TIMEOUT_S = 60.0
ANNOUNCE_TTL_S = 10.0  # from /weights/start to /weights/update; the client sends them back to back
PROBE_TIMEOUT_S = 3.0


def is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def check_group_address(address: str, peer: str | None, any_address: bool) -> None:
    """The engines connect only to the trainer that asks them to: master_address must be the requester's IP.

    Anything else would let an HTTP client point the server's workers at any host (and stall them there).
    """
    if any_address:
        return
    try:
        ip = ipaddress.ip_address(address)
        peer_ip = ipaddress.ip_address(peer) if peer else None
    except ValueError:
        ip = peer_ip = None
    unmapped = [getattr(a, "ipv4_mapped", None) or a for a in (ip, peer_ip)]
    if ip is None or peer_ip is None or not (unmapped[0] == unmapped[1] or (ip.is_loopback and peer_ip.is_loopback)):
        raise ApiError(400, "invalid_request", f"master_address {address!r} is not the IP address this request "
                       f"came from ({peer}): the trainer that opens the group hosts it, and the engines connect "
                       "back to it only. Behind NAT or a proxy, start the server with --weight_transfer_any_address.",
                       "master_address")


async def rendezvous_error(address: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if something accepts connections at address:port (the trainer's rendezvous), else why not.

    Asked before the workers join: a join blocks the engines, so a dead address must fail here, at once.
    """
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout_s)
    except TimeoutError:
        return f"no answer within {timeout_s:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def until_idle(busy: Callable[[], bool], last_call: Callable[[], float], idle_s: float) -> None:
    """Return once a push of several calls has gone idle_s without one: none running (`busy`), and none begun
    since `last_call()` (a time.monotonic()). Both multi-call pushes fail then: vLLM's routes', ours in parts."""
    while busy() or time.monotonic() - last_call() < idle_s:
        await asyncio.sleep(min(1.0, idle_s / 10))


def owned_group(state: ServerState, group_id: str) -> WeightGroup:
    group = state.group
    if group is None:
        raise ApiError(409, "group_closed", "no weight-transfer group is open (the server closed it after a failed "
                       "push, or restarted): POST /weights/init first. VLLMClient.update_weights does this by "
                       "itself.", "group_id")
    if group.group_id != group_id:
        raise ApiError(409, "group_closed", f"the open weight-transfer group belongs to another trainer (at "
                       f"{group.master_address}:{group.master_port}); yours was closed or taken over: open a "
                       "new one with POST /weights/init", "group_id")
    return group


def end_pending(state: ServerState) -> None:
    """Forget an announcement (its data never started); a loading push ends itself."""
    pending, state.pending = state.pending, None
    if pending is not None and pending.expiry is not None:
        pending.expiry.cancel()


async def close_group(state: ServerState) -> None:
    """Leave the group on every DP rank (best effort); the trainer opens a new one."""
    group, state.group = state.group, None
    engine = state.engine
    # vLLM 0.26's engines cannot leave a group (a new init replaces it).
    if group is not None and engine.alive and has_engine_method(engine.engine, "shutdown_weight_transfer_engine"):
        try:
            await engine.each("shutdown_weight_transfer_engine", timeout=FINISH_TIMEOUT_S)
        except Exception:
            log.exception("leaving the weight-transfer group failed")


async def _finalize_after_failure(state: ServerState) -> None:
    """Leave no layer half-loaded after a failed push (see RELOAD_CLEANUP_STEPS)."""
    for method in RELOAD_CLEANUP_STEPS:
        if not state.engine.alive:
            return
        try:
            await state.engine.each(method, timeout=FINISH_TIMEOUT_S)
        except Exception as exc:
            log.info("cleanup after a failed push: %s: %s", method, exc)


# --- a push's phases on the engines, shared by /weights/update and vLLM's weight routes ---


async def begin_load(state: ServerState, timeout_s: float) -> bool:
    """Take the engines for a load: wait for requests being admitted (new ones queue behind the push), pause the
    running ones between two decode steps keeping them in flight, and start vLLM's layerwise reload. Returns
    whether the weights were consistent before; the caller ends with `end_load` (after `fail_load` on an error).
    Raises ApiError with nothing held."""
    engine = state.engine
    try:
        await asyncio.wait_for(state.lock.acquire_write(), timeout_s)
    except TimeoutError:
        raise ApiError(503, "busy", f"requests being admitted did not reach the engines within {timeout_s:.0f} s; "
                       "retry the push") from None
    was_consistent, state.weights_consistent = state.weights_consistent, False
    try:
        # "recompute" also preempts them and resets the prefix cache, so that after the load every key and
        # value is computed again.
        await engine.each("pause_generation", timeout=FINISH_TIMEOUT_S, mode="keep",
                          clear_cache=state.settings.kv_after_push == "recompute")
        await engine.each("start_weight_update", timeout=FINISH_TIMEOUT_S)
    except Exception as exc:
        error = await fail_load(state, exc, FINISH_TIMEOUT_S)
        await end_load(state)
        raise error from None
    return was_consistent


async def finish_load(state: ServerState, names: list[str], was_consistent: bool, version: int | None) -> None:
    """vLLM's finish_weight_update, then the new version; decided before the engines resume and the lock is
    released, so a generation waiting for it sees the outcome."""
    new_version = version if version is not None else state.weight_version + 1
    # vLLM's own version too: its /inference/v1/generate reports spans of it per completion.
    await state.engine.each("finish_weight_update", str(new_version), timeout=FINISH_TIMEOUT_S)
    state.weights_consistent = was_consistent or covers_all(state.specs, names)
    state.weight_version = new_version
    state.last_push_error = None
    for flight in state.inflight:
        flight.versions.append(state.weight_version)
    if not state.weights_consistent:
        log.warning("a partial push (%d tensors) after a failed one: generation stays refused until a push names "
                    "every weight", len(names))


async def fail_load(state: ServerState, exc: BaseException, timeout_s: float) -> ApiError:
    """After a load failed half-way: stop the requests in flight (they would go on with mixed weights, and answer
    503), leave no layer half-loaded, close the group. Returns the error to answer."""
    engine = state.engine
    for flight in state.inflight:
        flight.push_failed = True
    with contextlib.suppress(Exception):
        await engine.abort_all()
    await _finalize_after_failure(state)
    await close_group(state)
    if isinstance(exc, ApiError):
        error = exc
    elif not engine.alive:
        error = ApiError(503, "engine_dead", f"the weight push failed: {engine.dead_error()}")
    elif isinstance(exc, TimeoutError) or TRAINER_DID_NOT_SEND in str(exc):
        error = ApiError(504, "weight_transfer", f"{TRAINER_DID_NOT_SEND} within {timeout_s:.0f} s (the trainer "
                         "side did not send): the group is closed and generation refused until a full push "
                         "lands; open the group again and push again")
    else:
        error = ApiError(502, "weight_transfer", f"the weight push failed on the server: {exc}. The group is "
                         "closed and generation refused until a full push lands: open it again and push again.")
    state.last_push_error = error.message
    return error


async def end_load(state: ServerState) -> None:
    with contextlib.suppress(Exception):  # resuming an engine that was not paused changes nothing
        await state.engine.each("resume_generation", timeout=FINISH_TIMEOUT_S)
    state.pending = None
    await state.lock.release_write()

