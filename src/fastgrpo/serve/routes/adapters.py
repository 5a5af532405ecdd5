"""The LoRA adapter routes: push (`PUT /adapters/{name}`), list, delete (serve/adapters.py says how)."""

import asyncio
import contextlib
import re
import shutil
import time

from fastapi import APIRouter, Request

from fastgrpo.protocol import AdapterInfo, AdapterListResponse, ErrorResponse, OkResponse
from fastgrpo.serve.adapters import LOAD_TIMEOUT_S, Adapter
from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.state import ServerState, State
from fastgrpo.serve.vllm_api import sync_adapters
from fastgrpo.transfer.adapters import (
    ADAPTER_OWNER_HEADER,
    check_adapter_shapes,
    unpack_adapter,
    unsupported_targets,
    write_adapter_dir,
)

router = APIRouter(prefix="/adapters", tags=["LoRA adapters"], responses={
    code: {"model": ErrorResponse} for code in (400, 404, 409, 502)})
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _lora_enabled(state: ServerState) -> None:
    if not state.settings.enable_lora:
        raise ApiError(400, "invalid_request", "this server serves no LoRA adapters: start it with --enable_lora "
                       "(and --max_lora_rank at least your adapters' rank)")


def checked_adapter(name: str, body: bytes, state: ServerState) -> tuple[dict, dict, int, int]:
    """A push's body unpacked (tensors, peft config, weight version, rank), once it fits this server and its
    model; else a 400 naming why not."""
    try:
        tensors, config, version = unpack_adapter(body)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc), "body") from None
    problems = unsupported_targets(config)
    if problems:
        raise ApiError(400, "invalid_request", f"vLLM's LoRA layers cannot serve {', '.join(problems)}; target "
                       "attention and MLP projections only, or push the merged model (GRPOTrainer falls back to "
                       "that by itself)", "adapter_config")
    rank, limit = int(config.get("r", 0)), state.settings.max_lora_rank
    if not 0 < rank <= limit:
        raise ApiError(400, "invalid_request", f"adapter rank r={rank}: this server takes ranks 1..{limit}; "
                       "restart it with a larger --max_lora_rank", "adapter_config")
    if state.specs.known:
        shapes = {name: shape for name, (_, shape) in state.specs.tensors.items()}
        bad = check_adapter_shapes(tensors, rank, shapes)
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ApiError(400, "invalid_request", f"adapter {name!r} does not fit this model: "
                           f"{'; '.join(bad[:3])}{more}", "body")
    return tensors, config, version, rank


@router.put("/{name}", response_model=AdapterInfo)
async def push_adapter(name: str, request: Request, state: State):
    """Load (or replace) adapter `name`: the body is a fastgrpo.transfer.adapters.pack_adapter payload."""
    from vllm.lora.request import LoRARequest

    _lora_enabled(state)
    if not NAME.match(name):
        raise ApiError(400, "invalid_request", f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit", "name")
    body = await request.body()
    tensors, config, version, rank = checked_adapter(name, body, state)
    registry = state.adapters
    owner = request.headers.get(ADAPTER_OWNER_HEADER)
    registry.check_owner(name, owner, state.settings.adapter_lease_s)
    lora_id, registry.next_id = registry.next_id, registry.next_id + 1
    path = registry.root / name / f"v{version}-{lora_id}"
    began = time.perf_counter()
    await asyncio.to_thread(write_adapter_dir, path, tensors, config)
    lora = LoRARequest(name, lora_id, str(path))
    try:  # vLLM checks names and shapes as it loads: a bad adapter fails here, before anything uses it
        await state.engine.each("add_lora", lora, timeout=LOAD_TIMEOUT_S)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await state.engine.each("remove_lora", lora_id, timeout=LOAD_TIMEOUT_S)
        shutil.rmtree(path, ignore_errors=True)
        raise ApiError(400, "invalid_request", f"vLLM could not load adapter {name!r}: {exc}", "body") from None
    adapter = Adapter(name, version, lora, path, rank, len(body), owner, time.monotonic())
    registry.retire(registry.current.get(name))
    registry.current[name] = adapter
    sync_adapters(request.app, state)
    await registry.unload_idle(state.engine)
    info = adapter.info()
    info.seconds = round(time.perf_counter() - began, 4)
    return info


@router.get("", response_model=AdapterListResponse)
async def list_adapters(state: State):
    return AdapterListResponse(adapters=[a.info() for a in state.adapters.current.values()])


@router.delete("/{name}", response_model=OkResponse)
async def delete_adapter(name: str, request: Request, state: State):
    _lora_enabled(state)
    registry = state.adapters
    if name not in registry.current:
        raise ApiError(404, "not_found", f"no adapter named {name!r} on this server", "name")
    registry.check_owner(name, request.headers.get(ADAPTER_OWNER_HEADER), state.settings.adapter_lease_s)
    registry.retire(registry.current.pop(name))
    sync_adapters(request.app, state)
    await registry.unload_idle(state.engine)
    return OkResponse()
