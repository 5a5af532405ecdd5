"""vLLM's weight routes, as `vllm serve` has them, on our push machinery: what TRL's VLLMClient and other trainers
written for stock vLLM call.

    POST /init_weight_transfer_engine  {"init_info": {...}}     open the group (the backend's own fields)
    POST /start_weight_update          {}                       take the engines (requests in flight are kept)
    POST /update_weights               {"update_info": {...}}   load tensors (names, dtype_names, shapes), as often
                                                                as the trainer likes between start and finish
    POST /finish_weight_update         {"weight_version": ...}  the new version; the engines resume

The bodies are vLLM's; what differs from stock vLLM is what ours guarantees (serve/weights.py): a push is
admitted like ours (new requests wait for it, running ones are paused and resume), generation is refused
while a push that failed half-way left mixed weights, completions report the versions they ran under, the
group belongs to whoever opened it (another trainer gets 409 while the owner is alive), the group must be
hosted by the requester with this server's world size, tensors are checked against the model before a
collective starts, and every step is bounded: a push that sees no call for PUSH_IDLE_S is failed and the
engines released, so a trainer that died mid-push does not stall generation.
"""

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.specs import check_push
from fastgrpo.serve.state import PendingPush, ServerState, State, VllmPush, WeightGroup
from fastgrpo.serve.weights import (
    FINISH_TIMEOUT_S,
    begin_load,
    check_group_address,
    close_group,
    end_load,
    fail_load,
    finish_load,
    rendezvous_error,
    until_idle,
)
from fastgrpo.transfer.base import SHARING_BACKENDS
from fastgrpo.transfer.plugin import register

log = logging.getLogger("fastgrpo.serve")
router = APIRouter(tags=["vLLM's weight transfer"], responses={  # errors in OpenAI's shape, as on vLLM's routes
    code: {"model": ErrorResponse} for code in (400, 403, 409, 502, 503, 504)})
VLLM_API_OWNER = "vllm-api"  # the group id of a group opened through these routes (they carry none)
INIT_TIMEOUT_S = 120.0  # for the group to form: the trainer joins it while this request runs
LOAD_TIMEOUT_S = 600.0  # for one /update_weights: the trainer sends while it runs
PUSH_IDLE_S = 120.0  # between two calls of one push


def engine_class(backend: str):
    """The worker-side engine class of a backend, whose init and update info types check a body's fields."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    register()
    return WeightTransferEngineFactory._registry[backend]()


def check_fields(info_cls, info: dict, what: str) -> Any:
    try:
        return info_cls(**info)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "invalid_request", f"{what} does not fit this server's {info_cls.__name__}: {exc}",
                       what) from None


def start_push(state: ServerState, was_consistent: bool) -> VllmPush:
    """The push /start_weight_update begins, watched: one that sees no call for PUSH_IDLE_S is failed and the
    engines released (a trainer that died mid-push)."""
    push = VllmPush(was_consistent)
    push.idle = asyncio.create_task(fail_when_idle(state, push))
    return push


async def fail_when_idle(state: ServerState, push: VllmPush) -> None:
    await until_idle(lambda: push.loading > 0, lambda: push.touched, PUSH_IDLE_S)
    log.warning("a push through vLLM's weight routes saw no call for %.0f s: failed, engines released", PUSH_IDLE_S)
    await fail_push(state, push, TimeoutError(f"no /update_weights or /finish_weight_update for {PUSH_IDLE_S:.0f} s"))


async def fail_push(state: ServerState, push: VllmPush, exc: BaseException) -> ApiError:
    """Fail `push`, if it is still the one in progress, and release the engines; returns the error to answer."""
    if state.pending is None or state.pending.request is not push:
        return ApiError(409, "weight_transfer", "the push has already ended")
    error = await fail_load(state, exc, LOAD_TIMEOUT_S)
    await end_push(state, push)
    return error


async def end_push(state: ServerState, push: VllmPush) -> None:
    if asyncio.current_task() is not push.idle:
        push.idle.cancel()
    await end_load(state)


def current_push(state: ServerState) -> VllmPush:
    pending = state.pending
    if pending is None or not isinstance(pending.request, VllmPush):
        raise ApiError(409, "weight_transfer", "no push started through /start_weight_update is in progress (it "
                       f"ended, failed, or saw no call for {PUSH_IDLE_S:.0f} s): call /start_weight_update first")
    pending.request.touched = time.monotonic()
    return pending.request


def checked_init_info(init_info: dict[str, Any], peer: str | None, state: ServerState) -> Any:
    """vLLM's init info, as its backend's InitInfo, once the group it opens fits this server: its size, our
    workers' ranks in it, and a host that is the requester."""
    engine = state.engine
    if not engine.alive:
        raise ApiError(503, "engine_dead", str(engine.dead_error()))
    if engine.backend in SHARING_BACKENDS:  # the engines read what a push names: only an owned group may name it
        raise ApiError(403, "forbidden", f"this server takes {engine.backend} pushes through /weights/* only, where "
                       "the group's owner token guards each part (fastgrpo's VLLMClient); vLLM's weight routes carry "
                       "no owner", "init_info")
    info = check_fields(engine_class(engine.backend).init_info_cls, init_info, "init_info")
    expected = state.weight_transfer_ranks + 1
    if getattr(info, "world_size", expected) != expected:
        raise ApiError(400, "invalid_request", f"world_size={info.world_size}, but this server has "
                       f"{state.weight_transfer_ranks} inference ranks (GET /get_world_size), so the group is "
                       f"{expected}", "init_info")
    if getattr(info, "rank_offset", 1) != 1:
        raise ApiError(400, "invalid_request", f"rank_offset={info.rank_offset}: the trainer is rank 0 and the "
                       "server's workers follow it, so rank_offset is 1", "init_info")
    address = getattr(info, "master_address", None)
    if address is not None:
        check_group_address(address, peer, state.weight_transfer_any_address)
    return info


@router.post("/init_weight_transfer_engine")
async def init_weight_transfer_engine(request: Request, state: State,
                                      init_info: Annotated[dict[str, Any], Body(embed=True)]):
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

    engine = state.engine
    info = checked_init_info(init_info, request.client.host if request.client else None, state)
    address, port = getattr(info, "master_address", None), getattr(info, "master_port", None)
    if state.pending is not None:
        raise ApiError(409, "weight_transfer", "a weight push is in progress: open a group once it has ended")
    owner = state.group
    if owner is not None and owner.group_id != VLLM_API_OWNER \
            and await rendezvous_error(owner.master_address, owner.master_port) is None:
        raise ApiError(409, "weight_transfer", f"another trainer (at {owner.master_address}:{owner.master_port}) "
                       "owns this server's weight-transfer group, and it is still running: one trainer pushes to "
                       "a server at a time")
    await close_group(state)
    try:  # the trainer joins the group while this runs (TRL's client does so from another thread)
        await engine.each("init_weight_transfer_engine", WeightTransferInitRequest(init_info=init_info),
                          timeout=INIT_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(504, "weight_transfer", f"the weight-transfer group at {address}:{port} did not form within "
                       f"{INIT_TIMEOUT_S:.0f} s: the trainer must join it while this request runs; check the "
                       "address, the port and any firewall between the server's nodes and the trainer") from None
    except Exception as exc:
        raise ApiError(502, "weight_transfer", f"joining the weight-transfer group failed on the server: {exc}") \
            from exc
    state.group = WeightGroup(VLLM_API_OWNER, address or "", port or 0)
    return {"message": "Weight transfer initialized"}


@router.post("/start_weight_update")
async def start_weight_update(state: State):
    group = state.group
    if group is None or group.group_id != VLLM_API_OWNER:
        raise ApiError(409, "group_closed", "no weight-transfer group was opened through "
                       "/init_weight_transfer_engine (or it was closed after a failed push): open it first")
    if state.pending is not None:
        raise ApiError(409, "weight_transfer", "another weight push is in progress: one push at a time")
    state.pending = PendingPush("vllm-api", None, phase="loading")  # held from here: no other push starts
    try:
        was_consistent = await begin_load(state, FINISH_TIMEOUT_S)
    except ApiError:
        state.pending = None
        raise
    state.pending.request = start_push(state, was_consistent)
    return {"message": "Weight update started"}


@router.post("/update_weights")
async def update_weights(state: State, update_info: Annotated[dict[str, Any], Body(embed=True)]):
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    push = current_push(state)
    info = check_fields(engine_class(state.engine.backend).update_info_cls, update_info, "update_info")
    names = list(getattr(info, "names", []))
    problems = check_push(state.specs, names, list(getattr(info, "dtype_names", [])),
                          [list(s) for s in getattr(info, "shapes", [])]) if names else []
    if problems:  # before any collective: the trainer's send then fails on its side, not in the engines
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ApiError(400, "invalid_request", "; ".join(problems[:5]) + more, "update_info")
    push.loading += 1
    try:
        await state.engine.each("update_weights", WeightTransferUpdateRequest(update_info=update_info),
                                timeout=LOAD_TIMEOUT_S)
    except Exception as exc:
        raise await fail_push(state, push, exc) from None
    finally:
        push.loading -= 1
    push.names += names
    push.touched = time.monotonic()
    return {"message": "Weights updated"}


@router.post("/finish_weight_update")
async def finish_weight_update(state: State, weight_version: Annotated[str | None, Body(embed=True)] = None):
    push = current_push(state)
    version = None
    if weight_version is not None:
        if not weight_version.isdigit():
            raise ApiError(400, "invalid_request", f"weight_version {weight_version!r}: this server numbers "
                           "versions; send a whole number >= 0, or leave it out for the next one", "weight_version")
        version = int(weight_version)
    push.loading += 1
    try:
        await finish_load(state, push.names, push.was_consistent, version)
    except Exception as exc:
        raise await fail_push(state, push, exc) from None
    finally:
        push.loading -= 1
    await end_push(state, push)
    return {"message": "Weight update finished", "weight_version": state.weight_version}
