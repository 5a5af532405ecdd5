"""Our weight-sync routes: open a group, announce a push, receive it, close (serve/weights.py says how)."""

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Request

from fastgrpo.protocol import (
    PART_HANDLE_FIELDS,
    ErrorResponse,
    FinishUpdateRequest,
    GroupRequest,
    InitTransferRequest,
    InitTransferResponse,
    OkResponse,
    PushPart,
    PushPartResponse,
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
    until_idle,
)
from fastgrpo.transfer import sender_class
from fastgrpo.transfer.base import SHARING_BACKENDS
from fastgrpo.transfer.packing import metas_from_info
from fastgrpo.transfer.shm import FILE_NAME as SHM_FILE_NAME

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
    if engine.backend in SHARING_BACKENDS and not is_loopback(peer):
        raise ApiError(403, "forbidden", f"this server takes {engine.backend} pushes (--weight_transfer_backend "
                       f"{engine.backend}) from this machine only, and {peer} is not loopback: the engines read the "
                       "trainer's memory, so the trainer must run here", "master_address")


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


@router.post("/update", response_model=WeightVersionResponse | PushPartResponse)
async def weights_update(req: FinishUpdateRequest, state: State):
    """Load the announced push: all of it (gloo, nccl: the trainer broadcasts meanwhile), or its next part (ipc,
    shm: the workers read the trainer's buffer), the engines held from the first part to the last."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    pending, part, engine = state.pending, req.part, state.engine
    phase = "loading" if part is not None and part.first > 0 else "announced"
    if (pending is None or pending.transfer_id != req.transfer_id or pending.phase != phase
            or pending.part_loading or state.group is None):
        raise ApiError(409, "weight_transfer", f"transfer {req.transfer_id!r} is unknown, expired, or not at this "
                       "point (a part is loading, or parts came out of order): call /weights/start again",
                       "transfer_id")
    push = pending.request
    problem = part_problem(engine.backend, part, push, pending.loaded)
    if problem is not None:
        error = ApiError(400, "invalid_request", problem, "part")
        if pending.phase == "loading":  # parts already loaded: this push cannot end whole
            await fail_between_parts(state, pending, error)
        raise error
    pending.part_loading = True  # from here on, another part gets 409
    await hold_engines(state, pending)
    first, stop = (part.first, part.first + len(part.tensor_sizes)) if part is not None else (0, len(push.names))
    info = {"names": push.names[first:stop], "dtype_names": push.dtype_names[first:stop],
            "shapes": push.shapes[first:stop]}
    if part is not None:
        info.update(part.model_dump(include={"tensor_sizes", *PART_HANDLE_FIELDS.values()}, exclude_none=True))
    info.update(sender_class(engine.backend).worker_update_fields(state.group.bucket_bytes))
    last = part is None or part.last
    try:
        await engine.each("update_weights", WeightTransferUpdateRequest(update_info=info), timeout=push.timeout_s + 10)
        pending.loaded = stop
        if last:
            await finish_load(state, push.names, pending.was_consistent, push.weight_version)
    except BaseException as exc:  # a cancelled request too: the engines are released either way
        stop_watching(pending)
        error = await fail_load(state, exc, push.timeout_s)
        await end_load(state)
        if not isinstance(exc, Exception):
            raise
        raise error from None
    finally:
        pending.part_loading = False
    if not last:
        pending.touched = time.monotonic()
        if pending.idle is None:  # one watcher for the whole push
            pending.idle = asyncio.create_task(fail_if_idle(state, pending))
        return PushPartResponse(tensors_loaded=stop, tensors=len(push.names))
    stop_watching(pending)
    await end_load(state)
    return WeightVersionResponse(weight_version=state.weight_version,
                                 seconds=round(time.perf_counter() - pending.began, 4))


async def hold_engines(state: ServerState, pending: PendingPush) -> None:
    """Before a push's first part: pause the engines for it (begin_load). Before a later one: they are held
    already."""
    push = pending.request
    if pending.phase == "loading":
        pending.load_deadline = time.monotonic() + push.timeout_s + 10
        return
    pending.expiry.cancel()
    pending.phase = "loading"
    # begin_load waits up to timeout_s for admitted requests, then the workers receive within timeout_s + 10.
    pending.load_deadline = time.monotonic() + 2 * push.timeout_s + 10
    try:
        pending.was_consistent = await begin_load(state, push.timeout_s)
    except ApiError:
        state.pending = None
        raise
    pending.began = time.perf_counter()


def part_problem(backend: str, part: PushPart | None, push: StartUpdateRequest, loaded: int) -> str | None:
    """What is wrong with a /weights/update's part, for the engines' backend and the push so far; None if fine."""
    field = PART_HANDLE_FIELDS.get(backend)
    if field is None:
        return None if part is None else (f"`part` comes with ipc and shm pushes only; this server's engines take "
                                          f"{backend!r} pushes, which the trainer broadcasts in one request")
    if part is None:
        return f"this server's engines take {backend!r} pushes, which come in parts: send `part` (VLLMClient does)"
    sent = {name for name in PART_HANDLE_FIELDS.values() if getattr(part, name) is not None}
    if sent != {field}:
        return f"a {backend} part carries `{field}` and no other handle; this one has {sorted(sent) or 'none'}"
    if backend == "shm" and not SHM_FILE_NAME.fullmatch(part.shm_name):
        return f"shm_name {part.shm_name!r} is not a push's file (fastgrpo-weights-<32 hex>)"
    stop = part.first + len(part.tensor_sizes)
    if part.first != loaded:
        return f"the part starts at tensor {part.first}, but {loaded} are loaded: parts come in order"
    if stop > len(push.names) or part.last != (stop == len(push.names)):
        return (f"the part ends at tensor {stop} with last={part.last}, but {len(push.names)} were announced: the "
                "last part, and only it, ends there")
    metas = metas_from_info(push.names[part.first:stop], push.dtype_names[part.first:stop],
                            push.shapes[part.first:stop])
    for meta, size in zip(metas, part.tensor_sizes):
        if size != meta.nbytes:
            return (f"tensor_sizes says {size} bytes for {meta.name}, but {meta.dtype} {list(meta.shape)} is "
                    f"{meta.nbytes}")
    return None


async def fail_if_idle(state: ServerState, pending: PendingPush) -> None:
    """A push in parts whose next part has not come within its timeout fails (its trainer died or hangs)."""
    timeout_s = pending.request.timeout_s
    await until_idle(lambda: pending.part_loading, lambda: pending.touched, timeout_s)
    if state.pending is pending:
        log.warning("weight push %s failed: its next part did not come within %.0f s", pending.transfer_id,
                    timeout_s)
        await fail_between_parts(state, pending, TimeoutError())


def stop_watching(pending: PendingPush) -> None:
    if pending.idle is not None and pending.idle is not asyncio.current_task():
        pending.idle.cancel()


async def fail_between_parts(state: ServerState, pending: PendingPush, why: BaseException) -> None:
    """End a push in parts that waits for its next part: the engines are released, the group closed, and
    generation refused until a whole push lands."""
    pending.part_loading = True  # claimed: a part that comes now gets 409
    stop_watching(pending)
    await fail_load(state, why, pending.request.timeout_s)
    await end_load(state)


@router.post("/close", response_model=OkResponse)
async def weights_close(req: GroupRequest, state: State):
    """The owner leaves: its announced push is dropped, a push in parts that waits for its next part fails, and
    the group is closed (not while the workers load)."""
    if state.group is None:
        return OkResponse()
    owned_group(state, req.group_id)
    pending = state.pending
    if pending is not None and pending.phase == "loading":
        if pending.idle is None or pending.part_loading:
            raise ApiError(409, "weight_transfer", "a weight push is loading: close the group once it has ended")
        await fail_between_parts(state, pending, ApiError(
            409, "weight_transfer", f"the trainer closed its group after {pending.loaded} of "
            f"{len(pending.request.names)} tensors of its push had loaded"))  # fail_load closes the group
    end_pending(state)
    await close_group(state)
    return OkResponse()
