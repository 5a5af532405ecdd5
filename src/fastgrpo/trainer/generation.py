"""Generation backends behind one interface: vLLM server, vLLM colocated, transformers generate.

Each backend turns prompts (token ids) into `n` completions per prompt and
receives the trainer's new weights after each optimizer step (as a
`fastgrpo.transfer.Weights`: names and shapes first, tensors gathered one at a
time). The trainer does the gathering and scattering across processes; a backend
sees only its share (the server backend: all unique prompts, on the main process
only).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fastgrpo.transfer import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S, WeightControl, Weights
from fastgrpo.transfer.push import RELOAD_CLEANUP_STEPS


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    max_tokens: int


@dataclass
class Completions:
    """For each prompt, its `n` completions: token ids and (vLLM only) the sampler's logprobs."""

    token_ids: list[list[list[int]]]
    logprobs: list[list[list[float]]] | None
    weight_version: int | None


class GenerationBackend(ABC):
    has_sampling_logprobs = False

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling, seed: int) -> Completions: ...

    @abstractmethod
    def sync_weights(self, weights: Weights, version: int) -> None: ...

    def close(self) -> None:
        pass


class ServerBackend(GenerationBackend):
    """`fastgrpo vllm-serve` over HTTP; weights over the server's collective."""

    has_sampling_logprobs = True

    def __init__(self, base_url: str | None, host: str, port: int, timeout: float,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, api_key: str | None = None):
        from fastgrpo.client import VLLMClient

        if base_url is None and host == "0.0.0.0":
            host = "127.0.0.1"  # the server binds 0.0.0.0; the trainer connects locally
        self.client = VLLMClient(base_url=base_url, host=host, port=port, timeout=timeout, bucket_bytes=bucket_bytes,
                                 api_key=api_key)

    def generate(self, prompt_ids, sampling, seed) -> Completions:
        response = self.client.generate(
            prompt_token_ids=prompt_ids, n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_tokens, seed=seed)
        return Completions(
            token_ids=[[c.token_ids for c in r.completions] for r in response.results],
            logprobs=[[c.logprobs for c in r.completions] for r in response.results],
            weight_version=response.weight_version,
        )

    def sync_weights(self, weights, version) -> None:
        self.client.update_weights(weights, weight_version=version)

    def close(self) -> None:
        self.client.close()


class _EngineControl(WeightControl):
    """The control plane of an in-process engine: vLLM's worker methods through `collective_rpc`."""

    def __init__(self, llm):
        self.llm = llm

    def start(self, info):
        self.llm.collective_rpc("start_weight_update")

    def receive(self, info):
        self.llm.collective_rpc("update_weights", kwargs={"update_info": info})

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
    finish on its workers) with fastgrpo's gloo backend over loopback: the same
    sender, push and receiver as server mode, so the layerwise reload
    re-processes them exactly as there.
    """

    has_sampling_logprobs = True

    def __init__(self, model: str, gpu_memory_utilization: float, tensor_parallel_size: int,
                 max_model_len: int | None, seed: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT_S, dtype: str = "auto"):
        from vllm.config import WeightTransferConfig

        from fastgrpo.engine import make_llm
        from fastgrpo.transfer.gloo import GlooSender

        self.llm = make_llm(model, gpu_memory_utilization=gpu_memory_utilization,
                            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
                            dtype=dtype, logprobs_mode="processed_logprobs",
                            weight_transfer_config=WeightTransferConfig(backend="gloo"))
        self.world_size = tensor_parallel_size + 1
        self.sender = GlooSender(bucket_bytes)
        self.timeout_s = timeout_s
        self.version = 0
        self.consistent = True  # False after a push that failed half-way, until a whole one lands

    def generate(self, prompt_ids, sampling, seed) -> Completions:
        from vllm import SamplingParams

        if not self.consistent:
            raise RuntimeError("the last weight push to the colocated engine failed half-way, so it holds a mix of "
                               "old and new weights; push the weights again before generating")
        # One seed per row: rows repeat the same prompt, and equal seeds would sample equal completions.
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, min_p=sampling.min_p,
                                 repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_tokens,
                                 logprobs=0, seed=seed + row)
                  for row in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        token_ids = [[list(c.token_ids) for c in o.outputs] for o in outputs]
        logprobs = [[[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in o.outputs] for o in outputs]
        return Completions(token_ids, logprobs, self.version)

    def _open_group(self) -> None:
        from fastgrpo.serve.launcher import free_port
        from fastgrpo.transfer import open_sender

        port = free_port()
        info = self.sender.worker_init_info("127.0.0.1", port, 1, self.world_size, self.sender.bucket_bytes,
                                            self.timeout_s)
        open_sender(self.sender, lambda: self.llm.collective_rpc("init_weight_transfer_engine",
                                                                 kwargs={"init_info": info}),
                    "127.0.0.1", port, self.world_size, self.timeout_s, peer="the colocated vLLM engine")

    def sync_weights(self, weights, version) -> None:
        from fastgrpo.transfer import push_weights

        if self.sender.group is None:
            self._open_group()
        self.consistent = False
        push_weights(_EngineControl(self.llm), self.sender, weights.metas(self.llm.llm_engine.model_config.dtype),
                     iter(weights), self.timeout_s)
        self.consistent = True  # the trainer always pushes its whole model
        self.version = version

    def close(self) -> None:
        self.sender.close()
        self.llm.llm_engine.engine_core.shutdown()


class TransformersBackend(GenerationBackend):
    """`model.generate` on the training model itself (use_vllm=False): slow, but needs nothing else."""

    def __init__(self, get_model, tokenizer):
        self.get_model = get_model  # returns the unwrapped training model at call time
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(self, prompt_ids, sampling, seed) -> Completions:
        model = self.get_model()
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        rows = [p for p in prompt_ids for _ in range(sampling.n)]
        width = max(len(p) for p in rows)
        device = next(model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=sampling.temperature,
                    top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else None,
                    min_p=sampling.min_p or None, repetition_penalty=sampling.repetition_penalty,
                    max_new_tokens=sampling.max_tokens, pad_token_id=pad, eos_token_id=eos,
                )
        finally:
            model.train(was_training)
        completions = []
        for row in output[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]  # keep the EOS, as vLLM does
            completions.append(row)
        grouped = [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompt_ids))]
        return Completions(grouped, None, None)

    def sync_weights(self, weights, version) -> None:
        pass  # it generates with the training weights themselves
