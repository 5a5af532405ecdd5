"""LoRA adapters served beside the base model, one per training run: push, list, delete, use.

A push (`PUT /adapters/{name}`, body: fastgrpo.transfer.adapters' safetensors payload)
brings a whole adapter at a weight version. The server writes it as a peft folder and
loads it into every DP rank under a new vLLM LoRA id, so vLLM validates it before
the push answers. Generations name an adapter (`adapter` on /generate, `model` on the
OpenAI routes) and keep the version they started with: a push changes neither a running
generation nor any other adapter, so several runs share one server. A replaced version
is unloaded once its last generation has ended.

A name belongs to the run that first pushed it, as a weight-transfer group belongs
to its trainer: its pushes and deletes carry the run's token (`X-Adapter-Owner`;
GRPOTrainer sends a digest of its machine and output folder, the same when it
resumes). Another run gets 409, until the owner has pushed nothing for
--adapter_lease seconds (it is gone) and the name can be taken over.
"""

import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fastgrpo.serve.protocol import AdapterInfo, AdapterListResponse, ErrorResponse, OkResponse
from fastgrpo.serve.state import ApiError, ServerState, server_state
from fastgrpo.serve.vllm_api import sync_adapters
from fastgrpo.transfer.adapters import (
    ADAPTER_OWNER_HEADER,
    check_adapter_shapes,
    unpack_adapter,
    unsupported_targets,
    write_adapter_dir,
)

log = logging.getLogger("fastgrpo.serve")
router = APIRouter(prefix="/adapters", tags=["LoRA adapters"], responses={
    code: {"model": ErrorResponse} for code in (400, 404, 409, 502)})
State = Annotated[ServerState, Depends(server_state)]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOAD_TIMEOUT_S = 120.0


@dataclass
class Adapter:
    name: str
    version: int
    request: object  # vllm.lora.request.LoRARequest
    path: Path
    rank: int
    bytes: int
    owner: str | None = None  # the token of the run that pushed it
    pushed_at: float = 0.0  # time.monotonic() of the push
    users: int = 0  # generations running on this version

    def info(self) -> AdapterInfo:
        return AdapterInfo(name=self.name, weight_version=self.version, lora_id=self.request.lora_int_id,
                           rank=self.rank, bytes=self.bytes)


class AdapterRegistry:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="fastgrpo-adapters-"))
        self.current: dict[str, Adapter] = {}
        self.retired: list[Adapter] = []  # replaced, still used by running generations
        self.next_id = 1

    def acquire(self, name: str) -> Adapter:
        adapter = self.current.get(name)
        if adapter is None:
            known = ", ".join(sorted(self.current)) or "none yet"
            raise ApiError(404, "not_found", f"no adapter named {name!r} on this server (adapters: {known}); push "
                           "it first (PUT /adapters/{name}, VLLMClient.push_adapter)", "adapter")
        adapter.users += 1
        return adapter

    async def release(self, adapter: Adapter, engine) -> None:
        adapter.users -= 1
        await self.unload_idle(engine)

    async def unload_idle(self, engine) -> None:
        idle = [a for a in self.retired if a.users == 0]
        self.retired = [a for a in self.retired if a.users > 0]
        for adapter in idle:
            try:
                await engine.each("remove_lora", adapter.request.lora_int_id, timeout=LOAD_TIMEOUT_S)
            except Exception:
                pass  # a dead engine has nothing left to unload
            shutil.rmtree(adapter.path, ignore_errors=True)

    def retire(self, adapter: Adapter | None) -> None:
        if adapter is not None:
            self.retired.append(adapter)

    def check_owner(self, name: str, owner: str | None, lease_s: float) -> None:
        """Refuse a push or delete of `name` by another run than its owner, unless the owner is gone (silent for
        `lease_s`); a takeover is logged."""
        current = self.current.get(name)
        if current is None or current.owner == owner:
            return
        idle = time.monotonic() - current.pushed_at
        if idle < lease_s:
            raise ApiError(409, "adapter_owned", f"adapter {name!r} belongs to another run (its last push was "
                           f"{idle:.0f} s ago): give this run another name (GRPOConfig.vllm_lora_name), or wait "
                           f"{lease_s - idle:.0f} s more, after which a name whose owner pushed nothing for "
                           f"--adapter_lease ({lease_s:.0f} s) can be taken over", "name")
        log.warning("adapter %r taken over from a run silent for %.0f s", name, idle)


def _lora_enabled(state: ServerState) -> None:
    if not state.settings.enable_lora:
        raise ApiError(400, "invalid_request", "this server serves no LoRA adapters: start it with --enable_lora "
                       "(and --max_lora_rank at least your adapters' rank)")


@router.put("/{name}", response_model=AdapterInfo)
async def push_adapter(name: str, request: Request, state: State):
    """Load (or replace) adapter `name`: the body is a fastgrpo.transfer.adapters.pack_adapter payload."""
    from vllm.lora.request import LoRARequest

    _lora_enabled(state)
    if not NAME.match(name):
        raise ApiError(400, "invalid_request", f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit", "name")
    body = await request.body()
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
