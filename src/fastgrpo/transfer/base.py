"""The sender's interface, and the registry of backends (one file each: gloo.py, nccl.py, ipc.py).

A sender is rank 0 of a group that every inference worker joins at
`rank_offset + its rank`; it broadcasts the packed weights. A backend whose
workers map the trainer's memory instead (CUDA IPC) broadcasts nothing: its
`share` returns fields that the update request carries (`handles_in_update`). The worker side of each
backend is a vLLM `WeightTransferEngine` (ours for gloo, vLLM's own for NCCL),
whose init info the sender describes with `worker_init_info`, so the server, the
colocate backend and the client all build it in one place.
"""

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from fastgrpo.transfer.packing import TensorMeta, check_bucket_bytes

DEFAULT_BUCKET_BYTES = 32 << 20
DEFAULT_TIMEOUT_S = 120.0


class WeightSender(ABC):
    backend: str
    handles_in_update = False  # True: `share` hands out the tensors' handles, and `send` moves no bytes
    tells_arrivals = True  # False: `peers_arrived` cannot tell, and `open` may wait for ever (NCCL's init)

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.bucket_bytes = check_bucket_bytes(bucket_bytes)

    @staticmethod
    @abstractmethod
    def worker_init_info(master_address: str, master_port: int, rank_offset: int, world_size: int,
                         bucket_bytes: int, timeout_s: float) -> dict:
        """The init info of this backend's worker engine (vLLM's `init_weight_transfer_engine`)."""

    @staticmethod
    def worker_update_fields(bucket_bytes: int) -> dict:
        """What every update request of this backend adds for the workers (vLLM 0.26's NCCL packing)."""
        return {}

    def listen(self, master_address: str, master_port: int, world_size: int, timeout_s: float) -> None:
        """Start hosting the rendezvous without waiting for anyone, where the backend can (gloo); see open_sender."""

    def peers_arrived(self) -> bool:
        """Whether a worker has begun to join the rendezvous; True where a backend cannot tell (NCCL)."""
        return True

    @abstractmethod
    def open(self, master_address: str, master_port: int, world_size: int, timeout_s: float) -> None:
        """Host the group as rank 0; returns once every worker has joined (or raises on timeout)."""

    @abstractmethod
    def send(self, metas: list[TensorMeta], tensors: Iterator[torch.Tensor]) -> int:
        """Broadcast one tensor per meta, in order, pulled lazily. Returns bytes sent."""

    def share(self, metas: list[TensorMeta], tensors: Iterator[torch.Tensor]) -> dict:
        """Fields for the update request that let the workers read the tensors themselves (IPC handles)."""
        raise NotImplementedError(f"the {self.backend} backend broadcasts; it shares no handles")

    def release(self) -> None:
        """After a push: drop what `share` kept alive for the workers."""

    def close(self) -> None:
        pass


# name -> "module:Class"; imported on use, so neither backend is loaded unless asked for.
SENDERS = {
    "gloo": "fastgrpo.transfer.gloo:GlooSender",
    "nccl": "fastgrpo.transfer.nccl:NcclSender",
    "ipc": "fastgrpo.transfer.ipc:IpcSender",
}


def sender_class(backend: str) -> type[WeightSender]:
    if backend not in SENDERS:
        raise ValueError(f"unknown weight-transfer backend {backend!r}: use one of {sorted(SENDERS)}")
    module, name = SENDERS[backend].split(":")
    return getattr(importlib.import_module(module), name)
