"""vLLM general plugin: registers fastgrpo's gloo and shm weight-transfer backends (and loads vLLM 0.26's IPC
engine without ray, which that module imports but vLLM does not install: fastgrpo.vllm_compat).

It also lets each process use Intel AMX (vllm_compat.allow_amx). vLLM calls every `vllm.general_plugins` entry point in each of its processes
(API server, engine core, workers), so the backend exists wherever
`WeightTransferEngineFactory.create_engine` runs. Safe to call repeatedly.
"""

MODULE = "fastgrpo.transfer.gloo"
SHM_MODULE = "fastgrpo.transfer.shm"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", MODULE, "GlooWeightTransferEngine")
    if "shm" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("shm", SHM_MODULE, "ShmWeightTransferEngine")
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", MODULE, "GlooTrainerWeightTransferEngine")
    from fastgrpo import vllm_compat

    WeightTransferEngineFactory._registry["ipc"] = vllm_compat.ipc_engine_loader()
    vllm_compat.allow_amx()
