"""The weight-sync routes: open a group, announce a push, receive it, close.

A push is two requests so that a bad one is refused before any collective starts:
`/weights/start` validates the names, shapes and dtypes and drains in-flight
generations (a batch never mixes weights); `/weights/update` runs vLLM's
`start_weight_update` / `update_weights` / `finish_weight_update` on the workers of
the group while the trainer sends.

The guarantee: generation runs only on weights that one whole push left behind.
From the moment a push touches the engines until it has finished on every
replica, `weights_consistent` is False; a push that fails half-way leaves it False
(and each engine's layerwise reload cleaned up, so the next push starts clean),
and only a push that names every weight sets it True again.
"""

import asyncio
import logging
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends

from fastgrpo.serve.protocol import (
    FinishUpdateRequest,
    InitTransferRequest,
    StartUpdateRequest,
    StartUpdateResponse,
    WeightVersionResponse,
)
from fastgrpo.serve.specs import check_push, covers_all
from fastgrpo.serve.state import ApiError, PendingPush, ServerState, server_state
from fastgrpo.transfer import sender_class
from fastgrpo.transfer.push import RELOAD_CLEANUP_STEPS
from fastgrpo.transfer.gloo import TRAINER_DID_NOT_SEND
from fastgrpo.transfer.packing import metas_from_info

log = logging.getLogger("fastgrpo.serve")
router = APIRouter(prefix="/weights", tags=["weight sync"])
State = Annotated[ServerState, Depends(server_state)]
FINISH_TIMEOUT_S = 60.0


async def close_group(state: ServerState) -> None:
    """Leave the group on every live member (best effort); the trainer opens a new one."""
    members, state.group, state.transfer_open = state.group, [], False
    live = [r for r in members if r.alive]
    if live:
        try:
            await state.pool.each("shutdown_weight_transfer_engine", replicas=live, timeout=FINISH_TIMEOUT_S)
        except Exception:
            log.exception("leaving the weight-transfer group failed")


@router.post("/init")
async def weights_init(req: InitTransferRequest, state: State):
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    members, tp = state.pool.live, state.settings.tensor_parallel_size
    expected = state.weight_transfer_ranks + 1
    if req.world_size != expected:
        raise ApiError(400, "invalid_request", f"world_size={req.world_size}, but this server has "
                       f"{state.weight_transfer_ranks} live inference ranks (TP {tp} x {len(members)} live "
                       f"replicas), so the group is {expected} (they + the trainer); read weight_transfer_ranks "
                       "from GET /health", "world_size")
    if req.backend is not None and req.backend != state.pool.backend:
        raise ApiError(400, "invalid_request", f"backend {req.backend!r} requested, but the engines were "
                       f"built with {state.pool.backend!r} (gloo on the CPU build, nccl on GPUs); send "
                       "tensors from the matching device", "backend")
    # A push that just failed on the trainer may still be failing here (its workers wait out their timeout).
    deadline = time.monotonic() + req.timeout_s
    while state.pending is not None:
        if time.monotonic() > deadline:
            raise ApiError(409, "weight_transfer", f"a weight push is still in progress after {req.timeout_s:.0f} s: "
                           "open a new group once it has ended")
        await asyncio.sleep(0.05)
    if state.transfer_open:
        await close_group(state)
    sender = sender_class(state.pool.backend)
    infos = [WeightTransferInitRequest(init_info=sender.worker_init_info(
        req.master_address, req.master_port, 1 + i * tp, req.world_size, req.bucket_bytes, req.timeout_s))
        for i in range(len(members))]
    try:
        await state.pool.each_with("init_weight_transfer_engine", infos, members, timeout=req.timeout_s + 10)
    except TimeoutError:
        raise ApiError(504, "weight_transfer", f"the trainer did not open the weight-transfer group at "
                       f"{req.master_address}:{req.master_port} within {req.timeout_s:.0f} s: check that it did, "
                       "and that this server can reach that address (firewall)") from None
    except Exception as exc:
        raise ApiError(502, "weight_transfer", f"joining the weight-transfer group failed on the server: "
                       f"{exc}. Check master_address/master_port and that both sides run the same "
                       "torch and vLLM versions.") from exc
    state.group, state.transfer_open = members, True
    return {"ok": True, "world_size": req.world_size, "backend": state.pool.backend}


@router.post("/start", response_model=StartUpdateResponse)
async def weights_start(req: StartUpdateRequest, state: State):
    if not state.transfer_open:
        raise ApiError(409, "weight_transfer", "no weight-transfer group is open: POST /weights/init first "
                       "(VLLMClient.update_weights does this on first use)")
    dead = [r.index for r in state.group if not r.alive]
    if dead:
        await close_group(state)
        raise ApiError(409, "group_stale", f"replica(s) {dead} died since the weight-transfer group opened: the "
                       "group is closed; open a new one with the live replicas (weight_transfer_ranks in GET "
                       "/health) and push again. VLLMClient.update_weights does this by itself.")
    problems = check_push(state.specs, req.names, req.dtype_names, req.shapes)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ApiError(400, "invalid_request", "; ".join(problems[:5]) + more, "names")
    if state.pending is not None:
        raise ApiError(409, "weight_transfer", "another weight push is in progress: one push at a time")
    transfer_id = uuid.uuid4().hex
    state.pending = PendingPush(transfer_id, req)  # claim first: concurrent starts get 409
    try:
        # Drain in-flight generations: a batch never mixes weights.
        await asyncio.wait_for(state.lock.acquire_write(), req.timeout_s)
    except TimeoutError:
        state.pending = None
        raise ApiError(503, "busy", f"in-flight generations did not finish within {req.timeout_s:.0f} s; "
                       "retry the push") from None

    async def expire():
        await asyncio.sleep(req.timeout_s)
        if state.pending is not None and state.pending.transfer_id == transfer_id:
            log.warning("weight push %s expired: the trainer never sent its data", transfer_id)
            state.pending = None
            await state.lock.release_write()

    state.pending.watchdog = asyncio.create_task(expire())
    nbytes = sum(m.nbytes for m in metas_from_info(req.names, req.dtype_names, req.shapes))
    return StartUpdateResponse(transfer_id=transfer_id, num_tensors=len(req.names), bytes=nbytes)


async def _finalize_after_failure(state: ServerState) -> None:
    """Leave no layer half-loaded after a failed push (see RELOAD_CLEANUP_STEPS)."""
    live = [r for r in state.group if r.alive]
    for method in RELOAD_CLEANUP_STEPS:
        try:
            await state.pool.each(method, replicas=live, timeout=FINISH_TIMEOUT_S)
        except Exception as exc:
            log.info("cleanup after a failed push: %s: %s", method, exc)


@router.post("/update", response_model=WeightVersionResponse)
async def weights_update(req: FinishUpdateRequest, state: State):
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    pending = state.pending
    if pending is None or pending.transfer_id != req.transfer_id:
        raise ApiError(409, "weight_transfer", f"transfer {req.transfer_id!r} is unknown or expired: call "
                       "/weights/start again", "transfer_id")
    pending.watchdog.cancel()
    push, members = pending.request, state.group
    began = time.perf_counter()
    info = {"names": push.names, "dtype_names": push.dtype_names, "shapes": push.shapes}
    was_consistent, state.weights_consistent = state.weights_consistent, False
    try:
        await state.pool.each("start_weight_update", replicas=members, timeout=FINISH_TIMEOUT_S)
        await state.pool.each_with("update_weights", [WeightTransferUpdateRequest(update_info=info)] * len(members),
                                   members, timeout=push.timeout_s + 10)
        await state.pool.each("finish_weight_update", replicas=members, timeout=FINISH_TIMEOUT_S)
        await state.pool.each("reset_prefix_cache", replicas=members)
        # Decided before the lock is released: a generation waiting for it must see the outcome.
        state.weights_consistent = was_consistent or covers_all(state.specs, push.names)
        state.weight_version = push.weight_version if push.weight_version is not None else state.weight_version + 1
    except Exception as exc:
        await _finalize_after_failure(state)
        await close_group(state)
        if isinstance(exc, TimeoutError) or TRAINER_DID_NOT_SEND in str(exc):
            raise ApiError(504, "weight_transfer", f"{TRAINER_DID_NOT_SEND} within {push.timeout_s:.0f} s (the "
                           "trainer side did not send): the group is closed and generation refused until a full "
                           "push lands; open the group again and push again") from None
        raise ApiError(502, "weight_transfer", f"the weight push failed on the server: {exc}. The group is closed "
                       "and generation refused until a full push lands: open it again and push again.") from exc
    finally:
        state.pending = None
        await state.lock.release_write()
    if not state.weights_consistent:
        log.warning("a partial push (%d tensors) after a failed one: generation stays refused until a push names "
                    "every weight", len(push.names))
    return WeightVersionResponse(weight_version=state.weight_version, seconds=round(time.perf_counter() - began, 4))


@router.post("/close")
async def weights_close(state: State):
    if state.transfer_open and state.pending is None:
        await close_group(state)
    return {"ok": True}
