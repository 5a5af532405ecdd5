"""Building the trainer's generator from its config: a `fastgrpo vllm-serve` server, a colocated vLLM engine,
or transformers' generate (generation.py holds the backends themselves)."""

import logging
import socket
import tempfile
from urllib.parse import urlparse

from fastgrpo.hardware import usable_cores
from fastgrpo.trainer.async_rounds import cores_shared_with_server
from fastgrpo.trainer.generation import ColocateBackend, ServerBackend
from fastgrpo.trainer.lora import adapter_config, run_identity

logger = logging.getLogger(__name__)

# vllm_mode left unset means fastgrpo's 'server', where a TRL script expects 'colocate': with nothing listening
# at the server's address, the start fails this soon, saying so, rather than after vllm_server_timeout.
UNSET_MODE_WAIT_S = 10.0
UNSET_MODE_HINT = ("GRPOConfig.vllm_mode was not set, and fastgrpo's default is 'server' (TRL's is 'colocate'). "
                   "Start `fastgrpo vllm-serve --model <model>` there, set vllm_mode='colocate' to generate inside "
                   "this process as TRL does, or set vllm_mode='server' to wait up to vllm_server_timeout for a "
                   "server that is starting")


def server_backend(args, adapter: str | None) -> ServerBackend:
    """A client of the run's server; `adapter`: the LoRA adapter its generations use (None: the base model)."""
    a = args
    return ServerBackend(a.vllm_server_base_url, a.vllm_server_host, a.vllm_server_port, a.vllm_server_timeout,
                         bucket_bytes=a.weight_sync_bucket_bytes, api_key=a.vllm_server_api_key, adapter=adapter,
                         adapter_owner=run_identity(a.output_dir), request_timeout=a.vllm_generation_timeout,
                         nothing_listening=(UNSET_MODE_WAIT_S, UNSET_MODE_HINT) if a.vllm_mode_is_default else None)


def colocate_backend(args, model, tokenizer, model_path, process_index: int, adapter_only: bool) -> ColocateBackend:
    """A vLLM engine in this process, on its device; a model given in memory is saved for it first."""
    a = args
    path = model_path
    if path is None or not isinstance(path, str):
        path = tempfile.mkdtemp(prefix="fastgrpo-colocate-")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    max_len = a.vllm_max_model_length or ((a.max_prompt_length or 1024) + a.max_completion_length)
    lora_rank = adapter_config(model)["r"] if adapter_only else None
    return ColocateBackend(path, a.vllm_gpu_memory_utilization, a.vllm_tensor_parallel_size, max_len,
                           seed=a.seed + process_index, bucket_bytes=a.weight_sync_bucket_bytes,
                           sleep_mode=a.vllm_enable_sleep_mode, lora_rank=lora_rank)


def warn_if_sharing_cores(backend: ServerBackend, device_type: str) -> None:
    """Async rounds overlap generation with training only where each has its own devices: a CPU server
    on this trainer's cores makes every step slower instead (the demo's steps: 2-3x)."""
    if device_type != "cpu":
        return
    host = urlparse(backend.client.base_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
        return
    shared = cores_shared_with_server(backend.client.info, set(usable_cores()))
    if shared:
        logger.warning(
            "async_generation: the server at %s generates on CPU cores %s, which this trainer runs on too; "
            "generation and training then compete for those cores and each step gets slower, not faster. "
            "Give each its own cores (start the server with VLLM_CPU_OMP_THREADS_BIND=<its cores> and the "
            "trainer under `taskset -c <the others>`), or train synchronously.",
            backend.client.base_url, ",".join(map(str, sorted(shared))))


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the generation config's EOS ids (chat models often have several,
    such as <|im_end|> and <|endoftext|>) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
