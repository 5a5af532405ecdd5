"""Building vLLM engines with the settings fastgrpo uses everywhere (demo, server, trainer)."""

import os

# GiB of KV cache the CPU build reserves when the user has not chosen (vLLM's own
# default, 4 GiB, is more than a 135M model on a laptop needs).
DEFAULT_CPU_KVCACHE_GIB = 1


def on_cpu() -> bool:
    """True when the installed vLLM is the CPU build (or there is no GPU to use)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_dtype(dtype: str) -> str:
    """The dtype to build an engine with. "auto" serves a bf16 checkpoint in bf16, which a CPU without a
    bf16 matrix unit emulates: generation ran 8x slower than float32 on an AVX2-only EPYC (the demo's round:
    83 s against 10 s). There "auto" means float32."""
    from fastgrpo.hardware import cpu_has_fast_bf16

    if dtype == "auto" and on_cpu() and not cpu_has_fast_bf16():
        return "float32"
    return dtype


def prepare_cpu_env(kv_cache_space_gib: int | None = None) -> None:
    """Environment the CPU build reads when it creates its workers."""
    if kv_cache_space_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_space_gib)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KVCACHE_GIB))


# Engine arguments every CPU engine gets unless its caller says otherwise (server and in-process alike).
CPU_ENGINE_DEFAULTS = {
    # torch.compile costs 30-60 s of engine start on the CPU build and bought no throughput here
    # (135M model, 16x8x128 tokens: 418 tok/s eager and compiled).
    "enforce_eager": True,
    # vLLM 0.32's CPU build kills the worker ("CPU Generator does not use offset") when a seeded request's
    # prefill is chunked: it rewinds the sampler's generator, which CPU generators cannot do. Whole
    # prefills never rewind.
    "enable_chunked_prefill": False,
}


def make_llm(model: str, **engine_kwargs):
    """An in-process `vllm.LLM`. Callers must sit under `if __name__ == "__main__":` (vLLM spawns)."""
    if on_cpu():
        prepare_cpu_env(engine_kwargs.pop("kv_cache_space", None))
        engine_kwargs = {**CPU_ENGINE_DEFAULTS, **engine_kwargs}
    from vllm import LLM

    from fastgrpo import cpu_lora, quiet_gloo

    quiet_gloo.enable()
    cpu_lora.enable()
    engine_kwargs["dtype"] = engine_dtype(engine_kwargs.get("dtype", "auto"))
    return LLM(model=model, **engine_kwargs)
