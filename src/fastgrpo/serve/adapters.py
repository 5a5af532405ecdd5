"""LoRA adapters served beside the base model, one per training run: push, list, delete, use (the routes:
serve/routes/adapters.py; this module keeps the adapters).

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

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastgrpo.protocol import AdapterInfo
from fastgrpo.serve.engines import GenerationEngine
from fastgrpo.serve.errors import ApiError

if TYPE_CHECKING:  # vLLM: an optional dependency, imported where the server runs
    from vllm.lora.request import LoRARequest

log = logging.getLogger("fastgrpo.serve")
LOAD_TIMEOUT_S = 120.0


@dataclass
class Adapter:
    name: str
    version: int
    request: "LoRARequest"
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

    async def release(self, adapter: Adapter, engine: GenerationEngine) -> None:
        adapter.users -= 1
        await self.unload_idle(engine)

    async def unload_idle(self, engine: GenerationEngine) -> None:
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
