"""Our weight-sync routes: open a group, announce a push, receive it, close (serve/weights.py says how)."""

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Request

from fastgrpo.protocol import (
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
from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.specs import check_push
from fastgrpo.serve.state import PendingPush, ServerState, State, WeightGroup
from fastgrpo.serve.weights import (
    ANNOUNCE_TTL_S,
    begin_load,
    check_group_address,
    close_group,
    end_load,
    end_pending,
    fail_load,
    finish_load,
    is_loopback,
    owned_group,
    rendezvous_error,
)
from fastgrpo.transfer import sender_class
from fastgrpo.transfer.packing import metas_from_info

log = logging.getLogger("fastgrpo.serve")
LOAD_CLEANUP_GRACE_S = 30.0  # after a failed load's workers give up: abort, finalize, close the group
router = APIRouter(prefix="/weights", tags=["weight sync"], responses={
    code: {"model": ErrorResponse} for code in (409, 502, 504)})


def check_init(req: InitTransferRequest, peer: str | None, state: ServerState) -> None:
    """Refuse, before anything waits or joins, a group this server could not be part of."""
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
    check_group_address(req.master_address, peer, state.weight_transfer_any_address)
    if engine.backend == "ipc" and not is_loopback(peer):
        raise ApiError(403, "forbidden", f"this server takes CUDA IPC pushes (--weight_transfer_backend ipc) from "
                       f"this machine only, and {peer} is not loopback: CUDA IPC maps the trainer's GPU memory, "
                       "so the trainer must run here, on the server's GPU", "master_address")


async def take_over_group(state: ServerState, timeout_s: float) -> None:
    """Close the open group, if any, once no push loads and its trainer is gone; 409 while it still runs."""
    # A push that just failed on the trainer may still be failing here: its workers wait out their receive
    # timeout, then clean up. Wait as long as that push can take (its bound, and the cleanup's grace), or this
    # request's timeout if longer: a trainer retrying a failed push at once must not race the server's timeout.
    began, pending = time.monotonic(), state.pending
    ends = pending.load_deadline + LOAD_CLEANUP_GRACE_S if pending is not None and pending.load_deadline else 0.0
    deadline = max(began + timeout_s, ends)
    while state.pending is not None and state.pending.phase == "loading":
        if time.monotonic() > deadline:
            raise ApiError(409, "weight_transfer", f"a weight push is still loading after "
                           f"{time.monotonic() - began:.0f} s: open a new group once it has ended")
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


@router.post("/init", response_model=InitTransferResponse)
async def weights_init(req: InitTransferRequest, request: Request, state: State):
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    engine = state.engine
    check_init(req, request.client.host if request.client else None, state)
    await take_over_group(state, req.timeout_s)
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
    # begin_load waits up to timeout_s for admitted requests, then the workers receive within timeout_s + 10.
    pending.load_deadline = time.monotonic() + 2 * push.timeout_s + 10
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
