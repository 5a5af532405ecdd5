"""The generation engine: one vLLM `AsyncLLM` on vLLM's own data parallelism.

`--data_parallel_size N` starts N engine cores that vLLM manages (`EngineCore_DP0..N-1`),
on this machine and, headless (serve/headless.py), on others. What fastgrpo adds on top:

- devices: vLLM gives local DP rank d the devices d*TP..(d+1)*TP-1 of what it sees
  (GPU: CUDA_VISIBLE_DEVICES; CPU: the '|'-separated core lists of
  VLLM_CPU_OMP_THREADS_BIND, which we always name, see `cpu_binding`);
- the load split: a prompt's completions go to DP ranks by tokens still to generate
  (`split_by_load`, through `data_parallel_rank`), or, with `--load_balance vllm`,
  where vLLM chooses (fewest requests);
- failure: a local engine core that dies fails vLLM's whole client; a remote one is
  not watched by vLLM, so `watch` asks every rank a cheap question and declares a
  rank that stays silent dead. Either way every generation in flight ends with
  `EngineDead` naming the rank, never a hang. A server with a dead rank must be
  restarted: vLLM's client cannot drop one engine and keep the others.

Engine-wide calls (pause, weight updates, LoRA, prefix cache) reach every rank:
vLLM's DP client broadcasts its utility calls.
"""

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

from fastgrpo import cpu_lora, quiet_gloo
from fastgrpo.engine import CPU_ENGINE_DEFAULTS, engine_dtype, prepare_cpu_env
from fastgrpo.hardware import usable_cores
from fastgrpo.transfer.ipc import INSECURE_SERIALIZATION_ENV
from fastgrpo.vllm_compat import call_on_dp_rank, dp_rank_counts, request_error_types

log = logging.getLogger("fastgrpo.serve")

# vLLM's default port for the engines of other nodes to reach the head (--data-parallel-rpc-port).
DEFAULT_DP_RPC_PORT = 13345


@dataclass
class ServerSettings:
    model: str
    revision: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Several machines: the DP ranks on this one (default: all), the first of them (headless nodes), and
    # where the head's engines listen for the other nodes' (vLLM's --data-parallel-address / -rpc-port).
    data_parallel_size_local: int | None = None
    data_parallel_start_rank: int = 0
    data_parallel_address: str | None = None
    data_parallel_rpc_port: int = DEFAULT_DP_RPC_PORT
    # Seconds the head waits for other nodes' engines to join at start, and for a rank to answer later.
    join_timeout_s: float = 600.0
    rank_timeout_s: float = 120.0
    load_balance: str = "tokens"  # "tokens": ours, by tokens to generate; "vllm": vLLM's, by request counts
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    max_model_len: int | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool | None = None  # None: eager on CPU (compile buys nothing there), vLLM's default on GPU
    max_num_seqs: int | None = None
    kv_cache_space: int | None = None  # GiB per rank, CPU build only (vLLM reads whole GiB)
    seed: int = 0
    # After a push, requests in flight "recompute" their keys and values under the new weights (vLLM
    # preempts them and resets the prefix cache), or "keep" theirs, and new requests' prefix-cache keys are
    # salted by weight version so that no other request reuses keys computed under old weights.
    kv_after_push: str = "recompute"
    # "auto": gloo on vLLM's CPU build, NCCL on GPUs; "ipc": CUDA IPC, for a trainer on the server's GPU;
    # "shm": shared memory, for a trainer's CPU tensors on the server's machine.
    weight_transfer_backend: str = "auto"
    # LoRA adapters (serve/adapters.py): vLLM's limits on their rank and on how many one batch mixes.
    enable_lora: bool = False
    max_lora_rank: int = 16
    max_loras: int = 4
    adapter_lease_s: float = 600.0  # an adapter whose owner pushed nothing this long may be taken over
    # vLLM's OpenAI layer (serve/vllm_api.py): its tool-call and reasoning parsers by name, a chat template file.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template: str | None = None

    def engine_backend(self, on_cpu: bool) -> str:
        if self.weight_transfer_backend == "auto":
            return "gloo" if on_cpu else "nccl"
        if on_cpu and self.weight_transfer_backend not in ("gloo", "shm"):
            raise ValueError(f"--weight_transfer_backend {self.weight_transfer_backend} needs GPUs; vLLM's CPU "
                             "build moves weights over gloo (auto), or shm from a trainer on this machine")
        return self.weight_transfer_backend

    @property
    def local_ranks(self) -> int:
        return self.data_parallel_size if self.data_parallel_size_local is None else self.data_parallel_size_local

    @property
    def world_size(self) -> int:
        """Inference workers on every node: the weight-transfer group less the trainer."""
        return self.tensor_parallel_size * self.data_parallel_size

    def rank_node(self, rank: int) -> str:
        """Where DP rank `rank` runs, as this (head) node sees it."""
        first, count = self.data_parallel_start_rank, self.local_ranks
        return "local" if first <= rank < first + count else "remote"


def cpu_binding(settings: ServerSettings) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for this node's ranks: disjoint cores per worker, '|' between workers
    (vLLM gives local DP rank d the lists d*TP..(d+1)*TP-1).

    Cores are always named: vLLM's own binding ("auto") refuses TP > 1 on a single-NUMA-node machine
    ("Not enough allowed NUMA nodes") and keeps a core per worker for its scheduler: on 2 cores its one
    worker generated on 1, B1's round in 30.8 s against 20.1 s on both."""
    workers = settings.tensor_parallel_size * settings.local_ranks
    cores = usable_cores()
    if len(cores) < workers:
        raise ValueError(f"--data_parallel_size {settings.local_ranks} (on this node) x --tensor_parallel_size "
                         f"{settings.tensor_parallel_size} needs {workers} CPU cores, this process may use "
                         f"{len(cores)}: lower DP or TP")
    per_worker = len(cores) // workers
    return "|".join(",".join(map(str, cores[i * per_worker:(i + 1) * per_worker])) for i in range(workers))


def visible_gpus() -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES names, or None where it is unset (then every GPU is visible)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [d.strip() for d in visible.split(",") if d.strip()]


def check_devices(settings: ServerSettings, on_cpu: bool) -> None:
    """Refuse, before any engine starts, a layout this node cannot hold."""
    if on_cpu:
        cpu_binding(settings)
        return
    workers = settings.tensor_parallel_size * settings.local_ranks
    visible = visible_gpus()
    if visible is not None:
        count = len(visible)
    else:
        from vllm.platforms import current_platform

        count = current_platform.device_count()
    if count < workers:
        raise ValueError(f"--data_parallel_size {settings.local_ranks} (on this node) x --tensor_parallel_size "
                         f"{settings.tensor_parallel_size} needs {workers} GPUs, {count} are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): lower DP or TP")


def engine_args(settings: ServerSettings, on_cpu: bool, backend: str):
    """vLLM's engine arguments, the same on the head and on headless nodes (vLLM checks they agree)."""
    from vllm.config import WeightTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    s = settings
    chosen = dict(CPU_ENGINE_DEFAULTS) if on_cpu else {}
    if s.enforce_eager is not None:
        chosen["enforce_eager"] = s.enforce_eager
    if s.max_num_seqs:
        chosen["max_num_seqs"] = s.max_num_seqs
    if s.enable_lora:  # a run's current and previous versions, for max_loras runs, stay loaded in host memory
        chosen.update(enable_lora=True, max_lora_rank=s.max_lora_rank, max_loras=s.max_loras,
                      max_cpu_loras=4 * s.max_loras)
    if s.data_parallel_size > 1:
        chosen.update(data_parallel_size=s.data_parallel_size, data_parallel_size_local=s.local_ranks,
                      data_parallel_address=s.data_parallel_address or "127.0.0.1",
                      data_parallel_rpc_port=s.data_parallel_rpc_port)
        if s.data_parallel_start_rank:
            chosen["data_parallel_start_rank"] = s.data_parallel_start_rank
    return AsyncEngineArgs(
        model=s.model, revision=s.revision, tensor_parallel_size=s.tensor_parallel_size,
        gpu_memory_utilization=s.gpu_memory_utilization, dtype=engine_dtype(s.dtype),
        max_model_len=s.max_model_len, enable_prefix_caching=s.enable_prefix_caching, seed=s.seed,
        logprobs_mode="processed_logprobs",  # logprobs of what was sampled from
        weight_transfer_config=WeightTransferConfig(backend=backend), reasoning_parser=s.reasoning_parser or "",
        disable_log_stats=False, **chosen,  # stats: vLLM's Prometheus /metrics
    )


def prepare_process(settings: ServerSettings, on_cpu: bool, backend: str) -> None:
    """What vLLM's engine processes read from this one's environment and plugins, set before they spawn."""
    if engine_dtype(settings.dtype) != settings.dtype:
        log.warning("serving float32: this CPU has no bf16 matrix unit, so bf16 would be emulated slowly; pass "
                    "--dtype bfloat16 to force it")
    if on_cpu:
        prepare_cpu_env(settings.kv_cache_space)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(settings)
    if backend == "ipc":  # the workers unpickle the trainer's CUDA IPC handles (transfer/ipc.py)
        os.environ[INSECURE_SERIALIZATION_ENV] = "1"
    # The head waits this long for remote engines' ready messages once they have connected.
    os.environ["VLLM_ENGINE_READY_TIMEOUT_S"] = str(int(settings.join_timeout_s))
    quiet_gloo.enable()
    cpu_lora.enable()


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


class EngineDead(RuntimeError):
    pass


def refused_request(exc: BaseException) -> BaseException | None:
    """The request's own fault behind what vLLM raised, if it was one: its input validation, or what failed while
    AsyncLLM handed the request to the engine (an int that does not serialize, say), which it wraps in an
    EngineGenerateError without a message."""
    cause = exc.__cause__ if type(exc).__name__ == "EngineGenerateError" else exc
    return cause if isinstance(cause, (*request_error_types(), TypeError, OverflowError)) else None


class EngineRejected(ValueError):
    """vLLM refused a request while validating it (a bad input, not a broken engine)."""


def split_by_load(prompts: list[tuple[int, int]], loads: list[int]) -> list[list[tuple[int, int]]]:
    """Which DP rank generates which completions: for each prompt, its chunks as (rank, count), in rank order.

    `prompts[i]` is (n, tokens of one completion), `loads[r]` rank r's tokens still to generate. Prompts go
    whole to the least-loaded rank, longest first (their completions then share one prefill); then, while
    moving one completion from the busiest rank to the idlest narrows the gap, one moves. A round whose one
    prompt asks for 10x the tokens thus spreads that prompt's completions instead of leaving a rank idle.
    Pure, so tests can check it alone.
    """
    loads = list(loads)
    chunks = [dict() for _ in prompts]  # prompt -> {rank: count}
    for i in sorted(range(len(prompts)), key=lambda i: -prompts[i][0] * prompts[i][1]):
        n, cost = prompts[i]
        r = min(range(len(loads)), key=lambda r: (loads[r], r))
        chunks[i][r] = n
        loads[r] += n * cost
    while len(loads) > 1:
        busy = max(range(len(loads)), key=lambda r: (loads[r], -r))
        idle = min(range(len(loads)), key=lambda r: (loads[r], r))
        gap = loads[busy] - loads[idle]
        # the busiest rank's costliest completion that, moved, narrows the gap (cost < gap)
        movable = [i for i in range(len(prompts)) if chunks[i].get(busy) and 0 < prompts[i][1] < gap]
        if not movable:
            break
        i = max(movable, key=lambda i: (prompts[i][1], -i))
        chunks[i][busy] -= 1
        chunks[i][idle] = chunks[i].get(idle, 0) + 1
        loads[busy] -= prompts[i][1]
        loads[idle] += prompts[i][1]
    return [sorted((r, c) for r, c in chunk.items() if c) for chunk in chunks]


@dataclass
class PromptOutput:
    """One prompt's completions, gathered from the DP ranks that generated them."""

    completions: list  # vLLM CompletionOutputs, in the order of their seeds (seed, seed + 1, ...)
    prompt_logprobs: list | None
    dp_ranks: list[int | None]  # the rank of each completion; None where vLLM chose


@dataclass
class DPRank:
    index: int
    node: str  # "local" or "remote" (another machine's headless engines)
    devices: str | None  # CPU cores or GPU indices of a local rank; None for a remote one
    load_tokens: int = 0  # tokens still to be generated for requests routed here
    error: str | None = None  # why this rank is dead

    def describe(self, engine: "GenerationEngine", counts: list[tuple[int, int]] | None) -> dict:
        """`counts`: vLLM's (waiting, running) per rank (GenerationEngine.request_counts)."""
        # A live rank of a failed engine is "stopped": vLLM's DP client serves as one engine or not at all.
        state = "failed" if self.error else ("stopped" if engine.error else engine.state)
        waiting, running = counts[self.index] if counts else (None, None)
        return {"rank": self.index, "node": self.node, "devices": self.devices, "state": state,
                "load_tokens": self.load_tokens, "waiting": waiting, "running": running, "error": self.error}


@dataclass
class GenerationEngine:
    settings: ServerSettings
    on_cpu: bool
    backend: str  # weight-transfer backend compiled into every engine
    engine: object = None  # vllm AsyncLLM
    ranks: list[DPRank] = field(default_factory=list)
    error: str | None = None
    failed: asyncio.Event | None = None  # set (in the server's loop) once a rank is dead
    requests: set[str] = field(default_factory=set)  # ids of the requests in flight (to abort them)
    busy: int = 0  # engine-wide calls running: a rank is silent meanwhile, and not for being dead
    busy_epoch: int = 0

    def __post_init__(self):
        s = self.settings
        binds = cpu_binding(s).split("|") if self.on_cpu else None
        tp, first = s.tensor_parallel_size, s.data_parallel_start_rank
        self.ranks = []
        for r in range(s.data_parallel_size):
            local = r - first
            devices = None
            if s.rank_node(r) == "local":
                devices = "|".join(binds[local * tp:(local + 1) * tp]) if binds else self._gpu_slice(local)
            self.ranks.append(DPRank(r, s.rank_node(r), devices))

    def _gpu_slice(self, local: int) -> str:
        tp = self.settings.tensor_parallel_size
        names = visible_gpus() or [str(i) for i in range((local + 1) * tp)]
        return ",".join(names[local * tp:(local + 1) * tp])

    def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        prepare_process(self.settings, self.on_cpu, self.backend)
        began = time.perf_counter()
        try:
            self.engine = AsyncLLM.from_engine_args(engine_args(self.settings, self.on_cpu, self.backend))
        except Exception as exc:
            self.error = f"the engines failed to start: {exc}"
            raise
        log.info("%d DP rank(s) ready in %.1f s", len(self.ranks), time.perf_counter() - began)

    def shutdown(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.shutdown()

    def kill_processes(self) -> None:
        """Before this process exits without cleanup: end the engine cores and workers it started, even those
        still starting (vLLM's handle on them is not ours yet). psutil comes with vLLM."""
        import psutil

        self.shutdown()
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()

    def request_counts(self) -> list[tuple[int, int]] | None:
        """vLLM's own (waiting, running) per DP rank, where its DP coordinator reports them (DP > 1)."""
        if self.engine is None or self.error is not None:
            return None
        counts = dp_rank_counts(self.engine)
        return counts if counts is not None and len(counts) == len(self.ranks) else None

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        return "starting" if self.engine is None else "ready"

    @property
    def alive(self) -> bool:
        self.check_dead()
        return self.engine is not None and self.error is None

    def check_dead(self) -> None:
        """A local engine core that died has failed vLLM's client: say which one."""
        if self.engine is None or self.error is not None or not self.engine.errored:
            return
        gone = {}
        with contextlib.suppress(Exception):
            gone = self.engine.engine_core.resources.engine_manager.finished_procs()
        # vLLM stops the other engine cores once one has died (SIGTERM, or a clean exit): the culprit is whichever
        # ended otherwise, if any did.
        culprits = {name: code for name, code in gone.items() if code not in (0, -signal.SIGTERM)}
        gone = culprits or gone
        which = ", ".join(f"{name} (exit code {code})" for name, code in gone.items()) or "an engine core"
        message = f"{which} died (see the server log for its last words)"
        for name in gone:  # vLLM names them EngineCore_DP<rank>
            rank = name.rpartition("_DP")[2]
            if rank.isdigit() and int(rank) < len(self.ranks):
                self.ranks[int(rank)].error = f"{name} died"
        self.fail(message)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
            log.error("the engine failed: %s. Every generation in flight ends with an error; restart the server "
                      "(and any headless node) to recover.", message)
        if self.failed is not None:
            self.failed.set()

    def failure_event(self) -> asyncio.Event:
        """Set once the engine fails; made on first use, inside the server's event loop."""
        if self.failed is None:
            self.failed = asyncio.Event()
        return self.failed

    def dead_error(self) -> EngineDead:
        return EngineDead(f"{self.error}. vLLM's data parallelism runs its DP ranks as one engine, so the server "
                          "serves no more: restart it (and its headless nodes).")

    # --- generation ---------------------------------------------------------------------------------------

    async def generate_one(self, prompt, params, cost: int, rank: int | None, lora_request=None):
        """One request (a prompt with its n completions, or some of them) on `rank`; returns the final
        RequestOutput."""
        self.check_dead()
        if self.error is not None:
            raise self.dead_error()
        counted = self.ranks[rank] if rank is not None else None
        if counted is not None:
            counted.load_tokens += cost
        request_id = uuid.uuid4().hex
        self.requests.add(request_id)

        async def final():
            last = None
            async for output in self.engine.generate(prompt, params, request_id, lora_request=lora_request,
                                                     data_parallel_rank=rank if len(self.ranks) > 1 else None):
                last = output
            return last

        running = asyncio.ensure_future(final())
        dead = asyncio.ensure_future(self.failure_event().wait())
        try:
            await asyncio.wait({running, dead}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():  # a rank died: requests on the others may go on, but the engine is gone
                running.cancel()
                raise self.dead_error()
            return running.result()
        except (EngineDead, asyncio.CancelledError):
            raise
        except Exception as exc:
            self.check_dead()
            if self.error is not None:
                raise self.dead_error() from exc
            cause = refused_request(exc)
            if cause is not None:
                raise EngineRejected(str(cause)) from exc
            raise
        finally:
            dead.cancel()
            if not running.done():
                running.cancel()
            self.requests.discard(request_id)
            if counted is not None:
                counted.load_tokens -= cost

    async def generate(self, prompts: list, params: list, lora_request=None) -> list[PromptOutput]:
        """Generate every prompt's completions across the DP ranks; one PromptOutput per prompt, in order.

        `params`: one SamplingParams per prompt. With --load_balance tokens a prompt's n completions may be
        cut into chunks on several ranks (`split_by_load`); a chunk of completions first..first+k-1 is one
        request with n=k and seed+first, which is what vLLM gives those children of the whole request, so
        a seeded prompt gets the same completions however it is cut."""
        if self.settings.load_balance == "vllm" and len(self.ranks) > 1:
            plan = [[(None, sp.n)] for sp in params]
        else:
            plan = split_by_load([(sp.n, sp.max_tokens) for sp in params], [r.load_tokens for r in self.ranks])
        calls, owners = [], []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            first = 0
            for rank, count in plan[i]:
                chunk = sp
                if count != sp.n:
                    chunk = sp.clone()
                    chunk.n = count
                    if sp.seed is not None:
                        chunk.seed = sp.seed + first
                    if first:  # the prompt's logprobs come with its first chunk
                        chunk.prompt_logprobs = None
                calls.append(self.generate_one(prompt, chunk, count * sp.max_tokens, rank, lora_request))
                owners.append((i, rank, count))
                first += count
        outputs = await asyncio.gather(*calls)
        results = [PromptOutput([], None, []) for _ in prompts]
        for (i, rank, count), out in zip(owners, outputs):
            result = results[i]
            if not result.completions:
                result.prompt_logprobs = out.prompt_logprobs
            result.completions.extend(out.outputs)
            result.dp_ranks.extend([rank] * len(out.outputs))
        return results

    # --- engine-wide calls --------------------------------------------------------------------------------

    async def each(self, method: str, *args, timeout: float | None = None, **kwargs):
        """An AsyncLLM method that vLLM broadcasts to every DP rank (pause, weights, LoRA, prefix cache)."""
        if not self.alive:
            raise self.dead_error()
        self.busy += 1
        self.busy_epoch += 1
        try:
            return await asyncio.wait_for(getattr(self.engine, method)(*args, **kwargs), timeout)
        except TimeoutError:
            self.check_dead()
            raise
        finally:
            self.busy -= 1
            self.busy_epoch += 1

    async def abort_all(self) -> None:
        """Abort every request in flight (their generate calls end without an output)."""
        if self.requests and self.engine is not None:
            await self.engine.abort(list(self.requests))

    # --- liveness -----------------------------------------------------------------------------------------

    async def watch(self, interval_s: float = 5.0) -> None:
        """Until the engine fails: every `interval_s`, ask each DP rank a question its busy loop answers between
        two steps. vLLM notices a local engine core that exits, but not a remote node that dies or drops off
        the network: its requests would wait forever. A rank silent for `rank_timeout_s`, while no engine-wide
        call (a weight push) was keeping it busy, is dead."""
        timeout = self.settings.rank_timeout_s
        while self.error is None:
            await asyncio.sleep(interval_s)
            self.check_dead()
            if self.error is not None or self.busy:
                continue
            epoch = self.busy_epoch
            answers = await asyncio.gather(*[self._answers(r, timeout) for r in self.ranks])
            silent = [r for r, ok in zip(self.ranks, answers) if not ok]
            if silent and self.busy_epoch == epoch and self.error is None:
                for r in silent:
                    r.error = f"DP rank {r.index} ({self._where(r)}) did not answer for {timeout:.0f} s"
                self.fail("; ".join(r.error for r in silent))

    async def _answers(self, rank: DPRank, timeout: float) -> bool:
        try:
            await asyncio.wait_for(call_on_dp_rank(self.engine, rank.index, "is_scheduler_paused"), timeout)
            return True
        except TimeoutError:
            return False
        except Exception:
            self.check_dead()
            return self.error is None

    def _where(self, rank: DPRank) -> str:
        if rank.node == "local":
            return f"this node, devices {rank.devices}"
        return (f"a headless node that joined {self.settings.data_parallel_address}:"
                f"{self.settings.data_parallel_rpc_port}: it died or the network between the nodes failed")

    def describe(self) -> list[dict]:
        counts = self.request_counts()
        return [r.describe(self, counts) for r in self.ranks]

    def describe_remote_ranks(self) -> str:
        remote = [r.index for r in self.ranks if r.node == "remote"]
        return f"DP rank(s) {remote}" if remote else "no remote rank"
