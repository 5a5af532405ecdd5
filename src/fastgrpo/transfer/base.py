"""The sender's interface, and the registry of backends (one file each: gloo.py, nccl.py, ipc.py).

A sender is rank 0 of a group that every inference worker joins at
`rank_offset + its rank`; it broadcasts the packed weights. A backend whose
workers map the trainer's memory instead (CUDA IPC, shared memory) broadcasts
nothing (`handles_in_update`): a push goes in parts (packing.plan_parts), each
packed into one reused buffer whose handle the part's update request carries, so
a push holds one buffer (a bucket, or the largest tensor), never a copy of the
model. The worker side of each
backend is a vLLM `WeightTransferEngine` (ours for gloo and shm, vLLM's own for NCCL and IPC),
whose init info the sender describes with `worker_init_info`, so the server, the
colocate backend and the client all build it in one place.
"""

import importlib
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from fastgrpo.transfer.packing import Part, TensorMeta, check_bucket_bytes

DEFAULT_BUCKET_BYTES = 32 << 20
DEFAULT_TIMEOUT_S = 120.0


class WeightSender(ABC):
    backend: str
    handles_in_update = False  # True: `share` hands out handles to the tensors, part by part; `send` is unused
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

    def share(self, parts: list[Part], metas: list[TensorMeta], tensors: Iterator[torch.Tensor]) -> Iterator[dict]:
        """For each part in order, the fields of its update request that let the workers read its tensors (a
        handle to the buffer they were packed into). The caller resumes it only once the workers have loaded the
        part: the next part overwrites the buffer."""
        raise NotImplementedError(f"the {self.backend} backend broadcasts; it shares no handles")

    def release(self) -> None:
        """After a push: drop what `share` kept for the workers (the buffer)."""

    def close(self) -> None:
        pass


class SharingSender(WeightSender):
    """A sender whose workers read the trainer's memory (CUDA IPC, shared memory): no rendezvous and no
    collective, only a socket that accepts connections while this trainer lives, by which the server tells a
    running owner of its group from a dead one (serve/weights.py)."""

    handles_in_update = True

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(bucket_bytes)
        self.group = None  # the listening socket

    @staticmethod
    def worker_init_info(master_address, master_port, rank_offset, world_size, bucket_bytes, timeout_s) -> dict:
        return {}

    def listen(self, master_address, master_port, world_size, timeout_s) -> None:
        if self.group is None:
            self.group = socket.create_server((master_address, master_port))

    def open(self, master_address, master_port, world_size, timeout_s) -> None:
        self.listen(master_address, master_port, world_size, timeout_s)

    def send(self, metas, tensors) -> int:
        raise NotImplementedError(f"a {self.backend} push goes in parts, through share()")

    def close(self) -> None:
        self.release()
        if self.group is not None:
            self.group.close()
            self.group = None


# name -> "module:Class"; imported on use, so neither backend is loaded unless asked for.
SENDERS = {
    "gloo": "fastgrpo.transfer.gloo:GlooSender",
    "nccl": "fastgrpo.transfer.nccl:NcclSender",
    "ipc": "fastgrpo.transfer.ipc:IpcSender",
    "shm": "fastgrpo.transfer.shm:ShmSender",
}
SHARING_BACKENDS = ("ipc", "shm")  # the workers read the trainer's memory: trainer and server share a machine


def sender_class(backend: str) -> type[WeightSender]:
    if backend not in SENDERS:
        raise ValueError(f"unknown weight-transfer backend {backend!r}: use one of {sorted(SENDERS)}")
    module, name = SENDERS[backend].split(":")
    return getattr(importlib.import_module(module), name)
