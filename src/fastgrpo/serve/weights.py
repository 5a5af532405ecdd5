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
"""

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fastgrpo.serve.protocol import (
    ErrorResponse,
    FinishUpdateRequest,
    GroupRequest,
    InitTransferRequest,
    InitTransferResponse,
    OkResponse,
    StartUpdateRequest,
    StartUpdateResponse,
    WeightVersionResponse,
)
from fastgrpo.serve.specs import check_push, covers_all
from fastgrpo.serve.state import ApiError, PendingPush, ServerState, WeightGroup, server_state
from fastgrpo.transfer import sender_class
from fastgrpo.transfer.gloo import TRAINER_DID_NOT_SEND
from fastgrpo.transfer.packing import metas_from_info
from fastgrpo.transfer.push import RELOAD_CLEANUP_STEPS
from fastgrpo.vllm_compat import has_engine_method

log = logging.getLogger("fastgrpo.serve")
router = APIRouter(prefix="/weights", tags=["weight sync"], responses={
    code: {"model": ErrorResponse} for code in (409, 502, 504)})
State = Annotated[ServerState, Depends(server_state)]
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


@router.post("/init", response_model=InitTransferResponse)
async def weights_init(req: InitTransferRequest, request: Request, state: State):
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    engine, s = state.engine, state.settings
    expected = state.weight_transfer_ranks + 1
    if req.world_size != expected:
        raise ApiError(400, "invalid_request", f"world_size={req.world_size}, but this server has "
                       f"{state.weight_transfer_ranks} inference ranks (TP {s.tensor_parallel_size} x DP "
                       f"{s.data_parallel_size}, every node's), so the group is {expected} (they + the trainer); "
                       "read weight_transfer_ranks from GET /health", "world_size")
    if not engine.alive:
        raise ApiError(503, "engine_dead", str(engine.dead_error()))
    if req.backend is not None and req.backend != engine.backend:
        raise ApiError(400, "invalid_request", f"backend {req.backend!r} requested, but the engines were "
                       f"built with {engine.backend!r} (gloo on the CPU build, nccl on GPUs); send "
                       "tensors from the matching device", "backend")
    peer = request.client.host if request.client else None
    check_group_address(req.master_address, peer, request.app.state.weight_transfer_any_address)
    if engine.backend == "ipc" and not is_loopback(peer):
        raise ApiError(403, "forbidden", f"this server takes CUDA IPC pushes (--weight_transfer_backend ipc) from "
                       f"this machine only, and {peer} is not loopback: CUDA IPC maps the trainer's GPU memory, "
                       "so the trainer must run here, on the server's GPU", "master_address")
    # A push that just failed on the trainer may still be failing here (its workers wait out their timeout).
    deadline = time.monotonic() + req.timeout_s
    while state.pending is not None and state.pending.phase == "loading":
        if time.monotonic() > deadline:
            raise ApiError(409, "weight_transfer", f"a weight push is still loading after {req.timeout_s:.0f} s: "
                           "open a new group once it has ended")
        await asyncio.sleep(0.05)
    if state.group is not None:
        owner = state.group
        if await rendezvous_error(owner.master_address, owner.master_port) is None:
            raise ApiError(409, "weight_transfer", f"another trainer (at {owner.master_address}:{owner.master_port})"
                           " owns this server's weight-transfer group, and it is still running: one trainer "
                           "pushes to a server at a time. Stop that run, or start another server.")
        log.warning("taking over the weight-transfer group of the trainer at %s:%d, which is gone",
                    owner.master_address, owner.master_port)
        end_pending(state)
        await close_group(state)
    unreachable = await rendezvous_error(req.master_address, req.master_port)
    if unreachable is not None:
        raise ApiError(400, "invalid_request", f"nothing hosts a weight-transfer group at {req.master_address}:"
                       f"{req.master_port} ({unreachable}): the trainer opens it before calling /weights/init "
                       "(VLLMClient does). Check the address and port, and any firewall between here and there.",
                       "master_port")
    # One init for every DP rank: each worker joins at 1 + dp_rank x TP + its TP rank (vLLM's rule).
    info = WeightTransferInitRequest(init_info=sender_class(engine.backend).worker_init_info(
        req.master_address, req.master_port, 1, req.world_size, req.bucket_bytes, req.timeout_s))
    try:
        await engine.each("init_weight_transfer_engine", info, timeout=req.timeout_s + 10)
    except TimeoutError:
        raise ApiError(504, "weight_transfer", f"the weight-transfer group at {req.master_address}:"
                       f"{req.master_port} did not form within {req.timeout_s:.0f} s: check that the trainer "
                       "opened it, and that every node of this server (headless ones too) can reach that "
                       f"address (firewall). {engine.error or ''}".rstrip()) from None
    except Exception as exc:
        raise ApiError(502, "weight_transfer", f"joining the weight-transfer group failed on the server: "
                       f"{exc}. Check master_address/master_port and that both sides run the same "
                       "torch and vLLM versions.") from exc
    state.group = WeightGroup(uuid.uuid4().hex, req.master_address, req.master_port, req.bucket_bytes)
    return InitTransferResponse(group_id=state.group.group_id, world_size=req.world_size, backend=engine.backend)


@router.post("/start", response_model=StartUpdateResponse)
async def weights_start(req: StartUpdateRequest, state: State):
    owned_group(state, req.group_id)
    if not state.engine.alive:
        raise ApiError(503, "engine_dead", str(state.engine.dead_error()))
    problems = check_push(state.specs, req.names, req.dtype_names, req.shapes)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ApiError(400, "invalid_request", "; ".join(problems[:5]) + more, "names")
    if state.pending is not None:
        raise ApiError(409, "weight_transfer", "another weight push is in progress: one push at a time")
    transfer_id = uuid.uuid4().hex
    state.pending = pending = PendingPush(transfer_id, req)

    async def expire():
        await asyncio.sleep(ANNOUNCE_TTL_S)
        if state.pending is pending and pending.phase == "announced":
            log.warning("weight push %s expired: /weights/update did not follow within %.0f s", transfer_id,
                        ANNOUNCE_TTL_S)
            state.pending = None

    pending.expiry = asyncio.create_task(expire())
    nbytes = sum(m.nbytes for m in metas_from_info(req.names, req.dtype_names, req.shapes))
    return StartUpdateResponse(transfer_id=transfer_id, num_tensors=len(req.names), bytes=nbytes)


async def _finalize_after_failure(state: ServerState) -> None:
    """Leave no layer half-loaded after a failed push (see RELOAD_CLEANUP_STEPS)."""
    for method in RELOAD_CLEANUP_STEPS:
        if not state.engine.alive:
            return
        try:
            await state.engine.each(method, timeout=FINISH_TIMEOUT_S)
        except Exception as exc:
            log.info("cleanup after a failed push: %s: %s", method, exc)


# --- a push's phases on the engines, shared by /weights/update and vLLM's weight routes (vllm_weights.py) ---


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


@router.post("/update", response_model=WeightVersionResponse)
async def weights_update(req: FinishUpdateRequest, state: State):
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    pending = state.pending
    if pending is None or pending.transfer_id != req.transfer_id or pending.phase != "announced" or state.group is None:
        raise ApiError(409, "weight_transfer", f"transfer {req.transfer_id!r} is unknown, expired or already "
                       "loading: call /weights/start again", "transfer_id")
    engine = state.engine
    if (engine.backend == "ipc") != (req.ipc_handles_pickled is not None):
        raise ApiError(400, "invalid_request", "ipc_handles_pickled comes with a CUDA IPC push and only with one: "
                       f"this server's engines take {engine.backend!r} pushes", "ipc_handles_pickled")
    pending.expiry.cancel()
    pending.phase = "loading"
    push = pending.request
    try:
        was_consistent = await begin_load(state, push.timeout_s)
    except ApiError:
        state.pending = None
        raise
    began = time.perf_counter()
    info = {"names": push.names, "dtype_names": push.dtype_names, "shapes": push.shapes}
    if req.ipc_handles_pickled is not None:
        info["ipc_handles_pickled"] = req.ipc_handles_pickled
    info.update(sender_class(engine.backend).worker_update_fields(state.group.bucket_bytes))
    try:
        await engine.each("update_weights", WeightTransferUpdateRequest(update_info=info), timeout=push.timeout_s + 10)
        await finish_load(state, push.names, was_consistent, push.weight_version)
    except Exception as exc:
        raise await fail_load(state, exc, push.timeout_s) from None
    finally:
        await end_load(state)
    return WeightVersionResponse(weight_version=state.weight_version, seconds=round(time.perf_counter() - began, 4))


@router.post("/close", response_model=OkResponse)
async def weights_close(req: GroupRequest, state: State):
    """The owner leaves: its announced push is dropped and the group closed (not while a push loads)."""
    if state.group is None:
        return OkResponse()
    owned_group(state, req.group_id)
    if state.pending is not None and state.pending.phase == "loading":
        raise ApiError(409, "weight_transfer", "a weight push is loading: close the group once it has ended")
    end_pending(state)
    await close_group(state)
    return OkResponse()
