"""Generation backends behind one interface: vLLM server, vLLM colocated, transformers generate.

Each backend turns prompts (token ids) into `n` completions per prompt and
receives the trainer's new weights after each optimizer step (as a
`fastgrpo.transfer.Weights`: names and shapes first, tensors gathered one at a
time). The trainer does the gathering and scattering across processes; a backend
sees only its share (the server backend: all unique prompts, on the main process
only).
"""

import contextlib
import dataclasses
import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fastgrpo.transfer import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S, WeightControl, Weights
from fastgrpo.transfer.push import RELOAD_CLEANUP_STEPS

logger = logging.getLogger(__name__)


MASK64 = 2**64 - 1
SEED_SPAN = 2**62  # below the engines' 2^63 limit, with room for completion j's seed + j


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derived_seed(*parts: int) -> int:
    """A seed in [0, 2^62) hashed from integers (the run's seed, a round's index, a position...)."""
    x = 0
    for part in parts:
        x = _splitmix64(x ^ (part & MASK64))
    return x % SEED_SPAN


def prompt_seeds(seed: int, round_index: int, count: int) -> list[int]:
    """One sampling seed per prompt of a generation round, from the run's seed and the round's index.

    vLLM samples completion j of a request seeded s with seed s + j, so one seed for every prompt
    would give completion j of each prompt the same noise, and two copies of one prompt identical
    groups. Hashing (seed, round, position) spreads the seeds over 2^62 values: the ranges
    [s, s + n) of a round overlap with probability about count^2 * n / 2^62. Reproducible, so a
    resumed run samples what the uninterrupted run sampled.
    """
    return [derived_seed(seed, round_index, i) for i in range(count)]


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    max_tokens: int
    extra: tuple = ()  # generation_kwargs as sorted (key, value) pairs: stop, stop_token_ids, min_tokens, ...


@dataclass
class Completions:
    """For each prompt, its `n` completions: token ids, whether each ended on a stop condition (EOS, a
    stop token or string) rather than the length limit, and (vLLM only) the sampler's logprobs and the
    weight versions each ran under, (first, last): they differ where a push landed during generation."""

    token_ids: list[list[list[int]]]
    logprobs: list[list[list[float]]] | None
    weight_version: int | None
    stopped: list[list[bool]]
    weight_versions: list[list[tuple[int, int]]] | None = None


class GenerationBackend(ABC):
    has_sampling_logprobs = False

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, seeds: list[int],
                 max_tokens: list[int] | None = None) -> Completions:
        """`sampling.n` completions of each prompt; prompt i samples with seeds[i] (see prompt_seeds) and, given
        max_tokens, generates at most max_tokens[i] tokens (a backend that cannot cap each prompt may return more:
        the first max_tokens[i] of them are what a cap would have given)."""

    @abstractmethod
    def sync_weights(self, weights: Weights, version: int) -> None: ...

    def sync_adapter(self, name: str, tensors: dict, config: dict, version: int) -> None:
        """LoRA: load adapter `name` at `version`; later generations sample with it."""
        raise NotImplementedError(f"{type(self).__name__} takes whole models only")

    def close(self) -> None:
        pass


GENERATION_ATTEMPTS = 3
RETRY_PAUSE_S = 1.0


def generation_may_retry(exc: Exception) -> bool:
    """Whether sending the same generation again may succeed: the connection failed or broke (a restart, a network
    blip), or the server answered that it is starting or that a proxy in front of it failed. Not a timeout (the
    same request would take as long: raise vllm_generation_timeout), nor a refusal of the request itself."""
    from fastgrpo.client import ServerError, ServerUnavailable

    if isinstance(exc, ServerUnavailable):
        return True
    return isinstance(exc, ServerError) and (exc.status in (502, 504) or
                                             (exc.status == 503 and exc.type in ("not_ready", "busy")))


class ServerBackend(GenerationBackend):
    """`fastgrpo vllm-serve` over HTTP; weights over the server's collective."""

    has_sampling_logprobs = True

    def __init__(self, base_url: str | None, host: str, port: int, timeout: float,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, api_key: str | None = None, adapter: str | None = None,
                 adapter_owner: str | None = None, request_timeout: float = 600.0,
                 nothing_listening: tuple[float, str] | None = None):
        from fastgrpo.client import VLLMClient

        self.adapter = adapter  # LoRA: generations sample with this adapter (this run's)
        self.adapter_owner = adapter_owner  # the run's token: the server keeps the adapter name for it
        self.server_timeout = timeout
        if base_url is None and host == "0.0.0.0":
            host = "127.0.0.1"  # the server binds 0.0.0.0; the trainer connects locally
        self.client = VLLMClient(base_url=base_url, host=host, port=port, timeout=timeout, bucket_bytes=bucket_bytes,
                                 api_key=api_key, request_timeout=request_timeout, nothing_listening=nothing_listening)

    def generate(self, prompt_ids, sampling, seeds, max_tokens=None) -> Completions:
        """The server's completions. A request that failed for a reason that may pass is sent again, with the same
        seeds (so the same completions), once the server answers its health check; a server that is not the one
        the weights were pushed to (it restarted) raises ServerRestarted, for the trainer to push again."""
        from fastgrpo.client import ServerRestarted

        for attempt in range(1, GENERATION_ATTEMPTS + 1):
            try:
                response = self.client.generate(
                    prompt_token_ids=prompt_ids, n=sampling.n, temperature=sampling.temperature,
                    top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else -1, min_p=sampling.min_p,
                    repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_tokens, seeds=seeds,
                    adapter=self.adapter, max_tokens_per_prompt=max_tokens, **dict(sampling.extra))
                break
            except Exception as exc:
                if attempt == GENERATION_ATTEMPTS or not generation_may_retry(exc):
                    raise
                logger.warning("generating failed (%s: %s); waiting for the server, then asking again with the same "
                               "seeds (attempt %d of %d)", type(exc).__name__, exc, attempt + 1, GENERATION_ATTEMPTS)
                time.sleep(RETRY_PAUSE_S * attempt)
                self.client.wait_for_server(self.server_timeout)
        pushed = self.client.pushed_instance
        if pushed is not None and response.instance != pushed:
            raise ServerRestarted(f"the server at {self.client.base_url} restarted (process {response.instance}, "
                                  f"not {pushed} that holds this run's weights): its weights are its checkpoint's")
        return Completions(
            token_ids=[[c.token_ids for c in r.completions] for r in response.results],
            logprobs=[[c.logprobs for c in r.completions] for r in response.results],
            weight_version=response.weight_version,
            stopped=[[c.finish_reason == "stop" for c in r.completions] for r in response.results],
            weight_versions=[[tuple(c.weight_versions) for c in r.completions] for r in response.results],
        )

    def sync_weights(self, weights, version) -> None:
        self.client.update_weights(weights, weight_version=version)

    def sync_adapter(self, name, tensors, config, version) -> None:
        self.client.push_adapter(name, tensors, config, version, owner=self.adapter_owner)

    def close(self) -> None:
        self.client.close()


class _EngineControl(WeightControl):
    """The control plane of an in-process engine: vLLM's worker methods through `collective_rpc`."""

    def __init__(self, llm, sender):
        self.llm, self.sender = llm, sender

    def start(self, info):
        self.llm.collective_rpc("start_weight_update")

    def receive(self, info):
        self.llm.collective_rpc("update_weights", kwargs={"update_info": info})

    def receive_part(self, info, part, last):
        fields = self.sender.worker_update_fields(self.sender.bucket_bytes)  # vLLM 0.26's IPC: packed, per update
        self.llm.collective_rpc("update_weights", kwargs={"update_info": {**info, **fields}})

    def finish(self):
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()

    def abort(self):
        for method in RELOAD_CLEANUP_STEPS:  # leave no layer half-loaded
            try:
                self.llm.collective_rpc(method)
            except Exception:
                pass  # start fails where a session is still open; finish then ends it


class ColocateBackend(GenerationBackend):
    """An in-process vLLM engine sharing the trainer's devices.

    Weights reach it through vLLM's weight-transfer API (init / start / update /
    finish on its workers): on the CPU build with fastgrpo's gloo backend over
    loopback, on a GPU with CUDA IPC (the workers map the trainer's tensors; NCCL
    refuses two ranks on one device). The same sender, push and receiver as server
    mode, so the layerwise reload re-processes them exactly as there.

    With `sleep_mode` (GPU only, TRL's vllm_enable_sleep_mode) the engine frees its
    KV cache and moves its weights to host memory after each generation, so the
    trainer has the GPU to itself while it trains; it wakes the weights for a push
    and the KV cache for the next generation.
    """

    has_sampling_logprobs = True

    def __init__(self, model: str, gpu_memory_utilization: float, tensor_parallel_size: int,
                 max_model_len: int | None, seed: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT_S, dtype: str = "auto", sleep_mode: bool = False,
                 lora_rank: int | None = None):
        from vllm.config import WeightTransferConfig

        from fastgrpo.engine import make_llm, on_cpu
        from fastgrpo.transfer import sender_class

        backend = "gloo" if on_cpu() else "ipc"
        if sleep_mode and backend == "gloo":
            raise ValueError("vllm_enable_sleep_mode needs a GPU: vLLM's CPU build has no sleep mode")
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if backend == "ipc":
            from fastgrpo.placement import visible_gpu_names
            from fastgrpo.transfer.ipc import INSECURE_SERIALIZATION_ENV

            if tensor_parallel_size != 1:
                raise ValueError(f"vllm_tensor_parallel_size={tensor_parallel_size}: colocate mode on GPUs runs one "
                                 "engine per trainer process on that process's GPU (TP 1); for TP > 1 use server "
                                 "mode (`fastgrpo vllm-serve --tensor_parallel_size N`)")
            os.environ[INSECURE_SERIALIZATION_ENV] = "1"  # the workers unpickle our IPC handles; they are our children
            # The engine's processes inherit this: each trainer process's engine on that process's own GPU.
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu_names()[torch.cuda.current_device()]
        lora = {}
        if lora_rank is not None:  # LoRA: the adapter is served beside the frozen base (sync_adapter)
            from fastgrpo.transfer.adapters import rank_limit

            lora = dict(enable_lora=True, max_lora_rank=rank_limit(lora_rank), max_loras=1)
        try:
            self.llm = make_llm(model, gpu_memory_utilization=gpu_memory_utilization,
                                tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
                                dtype=dtype, logprobs_mode="processed_logprobs", enable_sleep_mode=sleep_mode,
                                weight_transfer_config=WeightTransferConfig(backend=backend), **lora)
        finally:
            if backend == "ipc":
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved
        self.world_size = tensor_parallel_size + 1
        self.sender = sender_class(backend)(bucket_bytes)
        self.sleep_mode, self.asleep = sleep_mode, set()  # asleep: what sleeps ("weights", "kv_cache")
        self.lora_request, self.adapter_dir, self.lora_ids = None, None, 0  # LoRA: the adapter's current version
        self.timeout_s = timeout_s
        self.version = 0
        self.consistent = True  # False after a push that failed half-way, until a whole one lands

    def generate(self, prompt_ids, sampling, seeds, max_tokens=None) -> Completions:
        from vllm import SamplingParams

        if not self.consistent:
            raise RuntimeError("the last weight push to the colocated engine failed half-way, so it holds a mix of "
                               "old and new weights; push the weights again before generating")
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, min_p=sampling.min_p,
                                 repetition_penalty=sampling.repetition_penalty, max_tokens=cap,
                                 logprobs=0, seed=seed, **dict(sampling.extra))
                  for seed, cap in zip(seeds, max_tokens or [sampling.max_tokens] * len(seeds))]
        self._wake("weights", "kv_cache")
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        if self.sleep_mode:  # level 1: the KV cache is freed, the weights wait in host memory
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}
        token_ids = [[list(c.token_ids) for c in o.outputs] for o in outputs]
        logprobs = [[[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in o.outputs] for o in outputs]
        stopped = [[c.finish_reason == "stop" for c in o.outputs] for o in outputs]
        versions = [[(self.version, self.version)] * len(o.outputs) for o in outputs]
        return Completions(token_ids, logprobs, self.version, stopped, versions)

    def sync_adapter(self, name, tensors, config, version) -> None:
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from fastgrpo.transfer.adapters import write_adapter_dir

        if self.adapter_dir is None:
            self.adapter_dir = tempfile.mkdtemp(prefix="fastgrpo-colocate-adapter-")
        previous = self.lora_request
        path = write_adapter_dir(f"{self.adapter_dir}/v{version}", tensors, config)
        self.lora_ids += 1  # a new id per push: vLLM loads it afresh (and a retried push is a new one too)
        request = LoRARequest(name, self.lora_ids, str(path))
        self.llm.llm_engine.add_lora(request)
        self.lora_request, self.version = request, version
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _wake(self, *tags: str) -> None:
        tags = [t for t in tags if t in self.asleep]
        if tags:
            self.llm.wake_up(tags=tags)
            self.asleep -= set(tags)

    def _open_group(self) -> None:
        from fastgrpo.net import free_port
        from fastgrpo.transfer import open_sender

        port = free_port()
        info = self.sender.worker_init_info("127.0.0.1", port, 1, self.world_size, self.sender.bucket_bytes,
                                            self.timeout_s)
        open_sender(self.sender, lambda: self.llm.collective_rpc("init_weight_transfer_engine",
                                                                 kwargs={"init_info": info}),
                    "127.0.0.1", port, self.world_size, self.timeout_s, peer="the colocated vLLM engine")

    def sync_weights(self, weights, version) -> None:
        from fastgrpo.transfer import push_weights

        self._wake("weights")  # the KV cache stays asleep until the next generation
        if self.sender.group is None:
            self._open_group()
        self.consistent = False
        metas = weights.metas(self.llm.llm_engine.model_config.dtype)
        push_weights(_EngineControl(self.llm, self.sender), self.sender, metas, iter(weights), self.timeout_s)
        self.consistent = True  # the trainer always pushes its whole model
        self.version = version

    def close(self) -> None:
        import shutil

        self.sender.close()
        self.llm.llm_engine.engine_core.shutdown()
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)


class TransformersBackend(GenerationBackend):
    """`model.generate` on the training model itself (use_vllm=False): slow, but needs nothing else."""

    GENERATION_KWARGS = ("stop_token_ids", "min_tokens")  # vLLM's names it maps; GenerationConfig's pass through

    @staticmethod
    def unknown_kwargs(keys) -> list[str]:
        """generation_kwargs that neither vLLM's mapped names nor transformers' GenerationConfig know."""
        from transformers import GenerationConfig

        known = set(GenerationConfig().to_dict())
        return sorted(k for k in keys if k not in known and k not in TransformersBackend.GENERATION_KWARGS)

    def __init__(self, get_model, tokenizer, stop_token_ids: list[int], synced: bool = False, weights=None):
        self.get_model = get_model  # returns the unwrapped training model at call time
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids  # the generation config's EOS ids, and generation_kwargs' stop ids
        # Sharded training (FSDP2, ZeRO-3): every forward gathers shards, so every rank steps until all are done.
        self.synced = synced
        self.weights = weights or contextlib.nullcontext  # a context holding the weights generation runs on

    @torch.no_grad()
    def generate(self, prompt_ids, sampling, seeds, max_tokens=None) -> Completions:
        if max_tokens is not None:  # one generate call caps every row alike: generate the most, callers cut
            sampling = dataclasses.replace(sampling, max_tokens=max(max_tokens))
        model = self.get_model()
        pad = self.tokenizer.pad_token_id
        extra = dict(sampling.extra)
        stops = self.stop_token_ids + [t for t in extra.pop("stop_token_ids", None) or [] if t not in self.stop_token_ids]
        rows = [p for p in prompt_ids for _ in range(sampling.n)]
        width = max(len(p) for p in rows)
        device = next(model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.weights():
                torch.manual_seed(seeds[0])  # one generator samples every row: rows draw different noise
                # TRL's order: the run's sampling fields, then generation_kwargs (GenerationConfig's keys, such as
                # do_sample or no_repeat_ngram_size) over them.
                settings = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k if sampling.top_k > 0 else None, min_p=sampling.min_p or None,
                                repetition_penalty=sampling.repetition_penalty, max_new_tokens=sampling.max_tokens,
                                min_new_tokens=extra.pop("min_tokens", None) or None)
                settings.update(extra)
                output = model.generate(input_ids=input_ids, attention_mask=attention, pad_token_id=pad,
                                        eos_token_id=stops, synced_gpus=self.synced, **settings)
        finally:
            model.train(was_training)
        completions, stopped = [], []
        for row in output[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            if end is not None:
                row = row[: end + 1]  # keep the stop token, as vLLM does
            completions.append(row)
            stopped.append(end is not None)
        n = sampling.n
        return Completions([completions[i * n : (i + 1) * n] for i in range(len(prompt_ids))], None, None,
                           [stopped[i * n : (i + 1) * n] for i in range(len(prompt_ids))])

    def sync_weights(self, weights, version) -> None:
        pass  # it generates with the training weights themselves
