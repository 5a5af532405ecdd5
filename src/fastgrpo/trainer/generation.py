"""Generation backends behind one interface: vLLM server, vLLM colocated, transformers generate.

Each backend turns prompts (token ids) into `n` completions per prompt and
receives the trainer's new weights after each optimizer step. The trainer does
the gathering and scattering across processes; a backend sees only its share
(the server backend: all unique prompts, on the main process only).
"""

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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
    def sync_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None: ...

    def close(self) -> None:
        pass


class ServerBackend(GenerationBackend):
    """`fastgrpo vllm-serve` over HTTP; weights over the server's collective."""

    has_sampling_logprobs = True

    def __init__(self, base_url: str | None, host: str, port: int, timeout: float):
        from fastgrpo.client import VLLMClient

        if base_url is None and host == "0.0.0.0":
            host = "127.0.0.1"  # the server binds 0.0.0.0; the trainer connects locally
        self.client = VLLMClient(base_url=base_url, host=host, port=port, timeout=timeout)

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

    def sync_weights(self, named_tensors, version) -> None:
        self.client.update_weights(named_tensors, weight_version=version)

    def close(self) -> None:
        self.client.close()


class ColocateBackend(GenerationBackend):
    """An in-process vLLM engine sharing the trainer's devices.

    Weights reach it through vLLM's weight-transfer API (init / start / update /
    finish on its workers) with fastgrpo's gloo backend over loopback, so the
    layerwise reload re-processes them exactly as in server mode.
    """

    has_sampling_logprobs = True

    def __init__(self, model: str, gpu_memory_utilization: float, tensor_parallel_size: int,
                 max_model_len: int | None, seed: int):
        from vllm.config import WeightTransferConfig

        from fastgrpo.engine import make_llm

        self.llm = make_llm(model, gpu_memory_utilization=gpu_memory_utilization,
                            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed,
                            logprobs_mode="processed_logprobs",
                            weight_transfer_config=WeightTransferConfig(backend="gloo"))
        self.world_size = tensor_parallel_size + 1
        self.group = None
        self.buffers = [None, None]  # packing buffers (CPU), reused push after push
        self.version = 0

    def generate(self, prompt_ids, sampling, seed) -> Completions:
        from vllm import SamplingParams

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
        from fastgrpo.serve.gloo_transfer import open_group

        port = free_port()
        info = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": self.world_size}
        joined = _in_thread(self.llm.collective_rpc, "init_weight_transfer_engine", kwargs={"init_info": info})
        self.group = open_group("127.0.0.1", port, 0, self.world_size, timeout_s=120)
        joined.join_result()

    def sync_weights(self, named_tensors, version) -> None:
        from fastgrpo.serve.gloo_transfer import DEFAULT_BUCKET_BYTES, send_buckets, wire_tensors

        if self.group is None:
            self._open_group()
        tensors, metas, info = wire_tensors(named_tensors, self.llm.llm_engine.model_config.dtype)
        self.llm.collective_rpc("start_weight_update")
        received = _in_thread(self.llm.collective_rpc, "update_weights", kwargs={"update_info": info})
        send_buckets(self.group, metas, tensors, DEFAULT_BUCKET_BYTES, self.buffers)
        received.join_result()
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        self.group = None
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

    def sync_weights(self, named_tensors, version) -> None:
        pass  # it generates with the training weights themselves


class _in_thread:
    """Run a blocking call beside a collective; `join_result` re-raises its error."""

    def __init__(self, fn, *args, **kwargs):
        self.result, self.error = None, None

        def target():
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as exc:  # surfaced in join_result
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join_result(self, timeout: float = 300):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("the vLLM engine did not finish its side of the weight transfer in time")
        if self.error is not None:
            raise self.error
        return self.result
