"""Where a run started from a spec (the demo) computes: the server's devices and the trainer's.

`choose_placement` is the rule (pure, unit-tested); `detect_placement` feeds it what
this machine has. The rule:

- no GPU: the server on vLLM's CPU build, the trainer on the CPU;
- two or more GPUs: the server on the first visible GPU, the trainer on the second;
- one GPU: both share it. The server takes a fraction of its memory (TRL's colocate
  default, 0.3) and weights go over CUDA IPC, since NCCL refuses two ranks on one device;
- bf16 only where the trainer's device computes it fast (a GPU that supports it, a CPU
  with a bf16 matrix unit); float32 elsewhere.
"""

import os
from dataclasses import dataclass

# The server's share of a GPU it shares with the trainer (TRL's vllm_gpu_memory_utilization for colocate).
SHARED_GPU_SERVER_MEMORY = 0.3


@dataclass(frozen=True)
class Placement:
    trainer_device: str  # "cpu", or "cuda:N" (N counts the trainer's visible GPUs)
    server_gpus: str | None  # the server's CUDA_VISIBLE_DEVICES; None: vLLM's CPU build, on the CPU cores
    bf16: bool
    shares_gpu: bool = False  # the server and the trainer on one GPU (weights over CUDA IPC)
    server_gpu_memory_utilization: float | None = None  # None: the server's default (0.9)

    @property
    def use_cpu(self) -> bool:
        return self.trainer_device == "cpu"

    def describe(self) -> str:
        if self.server_gpus is None:
            where = "server on vLLM's CPU build, trainer on the " + ("CPU" if self.use_cpu else self.trainer_device)
        elif self.shares_gpu:
            where = (f"server and trainer share GPU {self.server_gpus} (server: "
                     f"{self.server_gpu_memory_utilization:.0%} of its memory; weights over CUDA IPC)")
        else:
            where = f"server on GPU {self.server_gpus}, trainer on {self.trainer_device}"
        return f"{where}; training in {'bf16 autocast' if self.bf16 else 'float32'}"


def use_trainer_device(placement: Placement) -> None:
    """Make this process's trainer use the placement's device (accelerate reads ACCELERATE_TORCH_DEVICE in
    a single process); an explicit setting wins."""
    if not placement.use_cpu:
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", placement.trainer_device)


class PlacementError(RuntimeError):
    pass


def choose_placement(visible_gpus: list[str], vllm_cpu_build: bool, gpu_bf16: bool, cpu_bf16: bool) -> Placement:
    """The devices of a one-server, one-trainer run. `visible_gpus`: the trainer's CUDA devices by their
    CUDA_VISIBLE_DEVICES names; `vllm_cpu_build`: vLLM is its CPU build; `gpu_bf16` / `cpu_bf16`: the
    GPU / the CPU computes bf16 fast."""
    if not visible_gpus:
        if not vllm_cpu_build:
            raise PlacementError("vLLM's CUDA build is installed but no GPU is visible: make one visible "
                                 "(CUDA_VISIBLE_DEVICES, the driver), or install vLLM's CPU build (`make demo`)")
        return Placement("cpu", None, bf16=cpu_bf16)
    if vllm_cpu_build:  # a CUDA torch beside vLLM's CPU build: the server can only use the CPU
        return Placement("cuda:0", None, bf16=gpu_bf16)
    if len(visible_gpus) >= 2:
        return Placement("cuda:1", visible_gpus[0], bf16=gpu_bf16)
    return Placement("cuda:0", visible_gpus[0], bf16=gpu_bf16, shares_gpu=True,
                     server_gpu_memory_utilization=SHARED_GPU_SERVER_MEMORY)


def visible_gpu_names() -> list[str]:
    """The CUDA devices this process sees, named as CUDA_VISIBLE_DEVICES names them (indices by default)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and len(listed) >= count:
        return listed[:count]
    return [str(i) for i in range(count)]


def detect_placement() -> Placement:
    from fastgrpo.engine import on_cpu
    from fastgrpo.hardware import bf16_is_fast, cpu_has_fast_bf16

    gpus = visible_gpu_names()
    return choose_placement(gpus, vllm_cpu_build=on_cpu(), gpu_bf16=bool(gpus) and bf16_is_fast(use_cpu=False),
                            cpu_bf16=cpu_has_fast_bf16())
