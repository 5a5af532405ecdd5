"""What differs between the vLLM releases fastgrpo supports, 0.26 to 0.32, in one place.

Read from both releases' sources (0.26.0: the CUDA wheel built for torch 2.11 and CUDA
13; 0.32.0: the CPU build CI runs). The same in both, so not here: the worker engine
methods (init / start / update / finish), the request wrappers, the layerwise reload,
pause_generation(mode="keep") and resume, sleep(level) / wake_up(tags), the IPC
engine's packed request (names, dtype_names, shapes, tensor_sizes, ipc_handles_pickled),
AsyncEngineArgs' fields, SamplingParams' fields and general plugins. What differs:

- the trainer-engine base class: 0.26 `TrainerWeightTransferEngine[Config, InitInfo]`
  built with a config, 0.32 `[InitInfo]` without one;
- 0.26's worker-engine base has one more abstract method, `trainer_send_weights`;
- NCCL's packed wire parameters, and IPC's `packed`: 0.32 agrees them once, in the init
  info; 0.26 takes them with every update (and rejects them in the init);
- request errors: 0.32 raises `VLLMClientError` (not a ValueError); 0.26 has only
  `VLLMValidationError`, a ValueError;
- 0.26's engines have no `shutdown_weight_transfer_engine` (a new init replaces the old);
- 0.26's IPC engine imports `ray` at the top of its module, which vLLM does not depend on.
"""

import dataclasses
import importlib
import inspect
import sys
import types
from functools import cache


def request_error_types() -> tuple[type[Exception], ...]:
    """vLLM's exceptions for a request it refuses (bad sampling parameters)."""
    import vllm.exceptions as errors

    found = (getattr(errors, "VLLMClientError", None), getattr(errors, "VLLMValidationError", None))
    return tuple(t for t in found if t is not None) + (ValueError,)


@cache
def nccl_packed_in_init() -> bool:
    """Whether vLLM's NCCL engine takes its packed wire parameters at init (0.27+) or with each update (0.26)."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    return "packed" in {f.name for f in dataclasses.fields(NCCLWeightTransferInitInfo)}


@cache
def ipc_packed_in_init() -> bool:
    """Whether vLLM's IPC engine is told packed mode once, in the init info (0.32), or with each update (0.26)."""
    info = import_without_ray("vllm.distributed.weight_transfer.ipc_engine").IPCWeightTransferInitInfo
    return "packed" in {f.name for f in dataclasses.fields(info)}


def has_engine_method(engine, name: str) -> bool:
    return callable(getattr(engine, name, None))


# --- the trainer engine (transfer/gloo.py's GlooTrainerWeightTransferEngine) ------------------------------

@cache
def trainer_engine_takes_config() -> bool:
    from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine

    return "config" in inspect.signature(TrainerWeightTransferEngine.__init__).parameters


def trainer_engine_base_kwargs(config) -> dict:
    """What the base class's __init__ takes besides client/source/is_sender: 0.26's config."""
    return {"config": config} if trainer_engine_takes_config() else {}


def trainer_init_arguments(args: tuple, kwargs: dict):
    """(init_info, config) from a `trainer_init` call: 0.32 passes (init_info), 0.26 (config=, init_info=)."""
    init_info, config = kwargs.pop("init_info", None), kwargs.pop("config", None)
    if init_info is None:
        if not args:
            raise TypeError("trainer_init needs init_info")
        init_info, args = args[-1], args[:-1]
    if config is None and args:
        config = args[0]
    return init_info, config


# --- vLLM 0.26's IPC engine and ray -------------------------------------------------------------------------

class _RayAbsent(types.ModuleType):
    """Stands in for `ray` while vLLM 0.26's IPC engine module imports; it uses ray only to send from a Ray
    actor (`trainer_send_weights(send_mode="ray")`), which fastgrpo never does."""

    def __getattr__(self, name):
        raise ImportError(f"ray is not installed (ray.{name} was asked for); vLLM 0.26's IPC engine imports it "
                          "at the top, and fastgrpo loads that module without it")


def import_without_ray(module: str):
    """Import `module` with a placeholder `ray` if ray is not installed; the placeholder is removed after."""
    if "ray" in sys.modules or importlib.util.find_spec("ray") is not None:
        return importlib.import_module(module)
    sys.modules["ray"] = _RayAbsent("ray")
    try:
        return importlib.import_module(module)
    finally:
        sys.modules.pop("ray", None)


def ipc_engine_loader():
    """A registry loader for vLLM's IPC worker engine that works without ray (0.26); 0.32 needs none."""
    def load():
        return import_without_ray("vllm.distributed.weight_transfer.ipc_engine").IPCWeightTransferEngine

    return load


# --- one DP rank of vLLM's data-parallel client --------------------------------------------------------------

async def call_on_dp_rank(engine, rank: int, method: str, *args):
    """Call an engine-core utility on DP rank `rank` alone (vLLM's DP client broadcasts its public calls).
    Both releases keep the rank-ordered `core_engines` identities and `_call_utility_async(..., engine=)`."""
    client = engine.engine_core
    return await client._call_utility_async(method, *args, engine=client.core_engines[rank])


def dp_rank_counts(engine) -> list[tuple[int, int]] | None:
    """(waiting, running) requests per DP rank, as vLLM's DP coordinator last reported them (every 100 ms);
    None without data parallelism (no coordinator)."""
    counts = getattr(engine.engine_core, "lb_engines", None)
    return None if counts is None else [(int(c[0]), int(c[1])) for c in counts]


def allow_amx() -> None:
    """Ask Linux for the AMX tile state in this process, where the CPU has AMX.

    vLLM 0.32's CPU attention picks its AMX kernel for bf16 whenever the CPU reports AMX, but never asks the
    kernel for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), which Linux requires per process; oneDNN asks
    only when it runs an AMX matmul itself. Seen on an Intel Xeon with AMX (2026-12): every bf16 generation
    killed the worker with SIGILL in cpu_attention_with_kv_cache; after this call it ran.
    """
    import torch

    if hasattr(torch.cpu, "_init_amx") and torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
