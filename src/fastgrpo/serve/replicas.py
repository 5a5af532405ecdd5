"""Engine replicas: N independent vLLM engines (data parallel), each on its own devices.

vLLM's own data parallelism refuses dense models since 0.14, so DP here means
independent `AsyncLLM` engines, each pinned to disjoint devices (GPU: a slice of
the visible devices; CPU: disjoint cores), with work split among them by load.
"""

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from fastgrpo.hardware import usable_cores
from fastgrpo.vllm_compat import request_error_types

log = logging.getLogger("fastgrpo.serve")


@dataclass
class ServerSettings:
    model: str
    revision: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    max_model_len: int | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None  # None: eager on CPU (compile buys nothing there), vLLM's default on GPU
    max_num_seqs: int | None = None
    kv_cache_space: int | None = None  # GiB, CPU build only (vLLM reads whole GiB)
    seed: int = 0
    # After a push, requests in flight "recompute" their keys and values under the new weights (vLLM
    # preempts them and resets the prefix cache), or "keep" theirs, and new requests' prefix-cache keys are
    # salted by weight version so that no other request reuses keys computed under old weights.
    kv_after_push: str = "recompute"
    # "auto": gloo on vLLM's CPU build, NCCL on GPUs; "ipc": CUDA IPC, for a trainer on the server's GPU.
    weight_transfer_backend: str = "auto"
    # LoRA adapters (serve/adapters.py): vLLM's limits on their rank and on how many one batch mixes.
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 4

    def engine_backend(self, on_cpu: bool) -> str:
        if self.weight_transfer_backend == "auto":
            return "gloo" if on_cpu else "nccl"
        if on_cpu and self.weight_transfer_backend != "gloo":
            raise ValueError(f"--weight_transfer_backend {self.weight_transfer_backend} needs GPUs; vLLM's CPU "
                             "build moves weights over gloo: leave it at auto")
        return self.weight_transfer_backend

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


def device_slices(settings: ServerSettings, on_cpu: bool) -> list[str | None]:
    """What each replica is pinned to: a CUDA_VISIBLE_DEVICES value (GPU) or a
    VLLM_CPU_OMP_THREADS_BIND value (CPU, ranks separated by '|'). None: vLLM's default."""
    tp, dp = settings.tensor_parallel_size, settings.data_parallel_size
    if on_cpu:
        # Cores are always named here. vLLM's own binding ("auto") refuses TP > 1 on a single-NUMA-node
        # machine ("Not enough allowed NUMA nodes"), and keeps a core per worker for its scheduler: on 2
        # cores its one worker generated on 1, B1's round in 30.8 s against 20.1 s on both.
        cores = usable_cores()
        if len(cores) < tp * dp:
            raise ValueError(
                f"--data_parallel_size {dp} x --tensor_parallel_size {tp} needs {tp * dp} CPU cores, "
                f"this process may use {len(cores)}: lower DP or TP"
            )
        per_rank = len(cores) // (tp * dp)
        ranks = [cores[i * per_rank : (i + 1) * per_rank] for i in range(tp * dp)]
        binds = [",".join(map(str, r)) for r in ranks]
        return ["|".join(binds[d * tp : (d + 1) * tp]) for d in range(dp)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else None
    if devices is None:
        from vllm.platforms import current_platform

        devices = [str(i) for i in range(current_platform.device_count())]
    if len(devices) < tp * dp:
        raise ValueError(
            f"--data_parallel_size {dp} x --tensor_parallel_size {tp} needs {tp * dp} GPUs, "
            f"{len(devices)} are visible (CUDA_VISIBLE_DEVICES={visible!r}): lower DP or TP"
        )
    return [",".join(devices[d * tp : (d + 1) * tp]) for d in range(dp)]


class RWLock:
    """Many generations at once, or one weight update alone. Writers go first once waiting."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def read(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    async def acquire_write(self) -> None:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True

    async def release_write(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


@dataclass
class Replica:
    index: int
    devices: str | None
    engine: object = None
    load_tokens: int = 0  # tokens still to be generated for requests assigned here
    error: str | None = None
    started_s: float | None = None
    requests: set[str] = field(default_factory=set)  # ids of its requests in flight (to abort them)

    @property
    def alive(self) -> bool:
        if self.error is not None or self.engine is None:
            return False
        return not self.engine.errored

    def describe(self) -> dict:
        state = "ready" if self.alive else ("failed" if self.error or self.engine is not None else "starting")
        return {"index": self.index, "devices": self.devices, "state": state,
                "load_tokens": self.load_tokens, "error": self.error, "start_seconds": self.started_s}


class ReplicaDead(RuntimeError):
    pass


class EngineRejected(ValueError):
    """vLLM refused a request while validating it (a bad input, not a broken engine)."""


def assign_by_load(costs: list[int], loads: list[int]) -> list[int]:
    """Greedy longest-first assignment of work items to the least-loaded replica.

    `costs[i]` is item i's tokens to generate, `loads[r]` replica r's outstanding
    tokens. Returns the replica of each item. Pure, so tests can check it alone.
    """
    loads = list(loads)
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(len(loads)), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner


@dataclass
class ReplicaPool:
    settings: ServerSettings
    on_cpu: bool
    backend: str  # weight-transfer backend compiled into every engine
    replicas: list[Replica] = field(default_factory=list)

    def start(self) -> None:
        """Create every engine, one after another (each inherits the pinning env at spawn)."""
        from vllm.config import WeightTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from fastgrpo import cpu_lora, quiet_gloo
        from fastgrpo.engine import CPU_ENGINE_DEFAULTS, engine_dtype, prepare_cpu_env

        s = self.settings
        dtype = engine_dtype(s.dtype)
        if dtype != s.dtype:
            log.warning("serving %s: this CPU has no bf16 matrix unit, so bf16 would be emulated slowly; pass "
                        "--dtype bfloat16 to force it", dtype)
        slices = device_slices(s, self.on_cpu)
        self.replicas = [Replica(i, d) for i, d in enumerate(slices)]
        if self.on_cpu:
            prepare_cpu_env(s.kv_cache_space)
        if self.backend == "ipc":  # the workers unpickle the trainer's CUDA IPC handles (transfer/ipc.py)
            from fastgrpo.transfer.ipc import INSECURE_SERIALIZATION_ENV

            os.environ[INSECURE_SERIALIZATION_ENV] = "1"
        quiet_gloo.enable()
        cpu_lora.enable()
        env_key = "VLLM_CPU_OMP_THREADS_BIND" if self.on_cpu else "CUDA_VISIBLE_DEVICES"
        chosen = dict(CPU_ENGINE_DEFAULTS) if self.on_cpu else {}
        if s.enforce_eager is not None:
            chosen["enforce_eager"] = s.enforce_eager
        if s.max_num_seqs:
            chosen["max_num_seqs"] = s.max_num_seqs
        if s.enable_lora:  # a run's current and previous versions, for max_loras runs, stay loaded in host memory
            chosen.update(enable_lora=True, max_lora_rank=s.max_lora_rank, max_loras=s.max_loras,
                          max_cpu_loras=4 * s.max_loras)
        saved = os.environ.get(env_key)
        try:
            for replica in self.replicas:
                if replica.devices is not None:
                    os.environ[env_key] = replica.devices
                args = AsyncEngineArgs(
                    model=s.model,
                    revision=s.revision,
                    tensor_parallel_size=s.tensor_parallel_size,
                    gpu_memory_utilization=s.gpu_memory_utilization,
                    dtype=dtype,
                    max_model_len=s.max_model_len,
                    enable_prefix_caching=s.enable_prefix_caching,
                    **chosen,
                    seed=s.seed,
                    logprobs_mode="processed_logprobs",  # logprobs of what was sampled from
                    weight_transfer_config=WeightTransferConfig(backend=self.backend),
                    disable_log_stats=True,
                )
                began = time.perf_counter()
                try:
                    replica.engine = AsyncLLM.from_engine_args(args)
                except Exception as exc:  # keep the others; health reports this one
                    replica.error = f"engine failed to start: {exc}"
                    log.exception("replica %d failed to start", replica.index)
                    raise
                replica.started_s = round(time.perf_counter() - began, 1)
                log.info("replica %d ready on %s in %.1f s", replica.index, replica.devices or "default devices",
                         replica.started_s)
        finally:
            if saved is None:
                os.environ.pop(env_key, None)
            else:
                os.environ[env_key] = saved

    def shutdown(self) -> None:
        for replica in self.replicas:
            if replica.engine is not None:
                with contextlib.suppress(Exception):
                    replica.engine.shutdown()

    @property
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def check_dead(self) -> None:
        for replica in self.replicas:
            if replica.engine is not None and replica.engine.errored and replica.error is None:
                replica.error = "engine process died (see the server log for its last words)"

    async def generate_one(self, replica: Replica, prompt, params, cost: int, lora_request=None):
        """One prompt (with its n completions) on one replica; returns the final RequestOutput."""
        request_id = uuid.uuid4().hex
        replica.load_tokens += cost
        replica.requests.add(request_id)
        final = None
        try:
            async for output in replica.engine.generate(prompt, params, request_id, lora_request=lora_request):
                final = output
        except Exception as exc:
            self.check_dead()
            if not replica.alive:
                raise ReplicaDead(
                    f"replica {replica.index} ({replica.devices or 'default devices'}) died while serving this "
                    f"request: {replica.error}. Its other replicas keep serving; restart the server to recover it."
                ) from exc
            # vLLM's input validation; AsyncLLM wraps what fails while it hands a request to the engine (an
            # int that does not serialize, say) in an EngineGenerateError without a message.
            cause = exc.__cause__ if type(exc).__name__ == "EngineGenerateError" else exc
            if isinstance(cause, (*request_error_types(), TypeError, OverflowError)):
                raise EngineRejected(str(cause)) from exc
            raise
        finally:
            replica.load_tokens -= cost
            replica.requests.discard(request_id)
        return final

    async def generate(self, prompts: list, params, costs: list[int], lora_request=None):
        """Run prompts across live replicas, split by load; results in input order with replica indices.
        `params`: one SamplingParams for every prompt, or a list of one per prompt; `lora_request`: an adapter."""
        self.check_dead()
        if not isinstance(params, list):
            params = [params] * len(prompts)
        live = self.live
        if not live:
            raise ReplicaDead("no replica is alive: " + "; ".join(f"{r.index}: {r.error}" for r in self.replicas))
        owners = assign_by_load(costs, [r.load_tokens for r in live])
        tasks = [self.generate_one(live[o], p, sp, c, lora_request) for p, sp, o, c in zip(prompts, params, owners, costs)]
        outputs = await asyncio.gather(*tasks)
        return [(out, live[o].index) for out, o in zip(outputs, owners)]

    async def each(self, method: str, *args, replicas: list[Replica] | None = None, timeout: float | None = None,
                   **kwargs) -> list:
        """Call an engine method on each of `replicas` (default: the live ones) concurrently."""
        replicas = self.live if replicas is None else replicas
        calls = [getattr(r.engine, method)(*args, **kwargs) for r in replicas]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout)

    async def abort_all(self, replicas: list[Replica]) -> None:
        """Abort every request in flight on `replicas` (their generate calls end without an output)."""
        for r in replicas:
            if r.requests:
                await r.engine.abort(list(r.requests))

    async def each_with(self, method: str, per_replica_args: list, replicas: list[Replica],
                        timeout: float | None = None) -> list:
        calls = [getattr(r.engine, method)(a) for r, a in zip(replicas, per_replica_args, strict=True)]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout)
