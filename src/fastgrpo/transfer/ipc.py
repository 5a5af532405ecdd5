"""CUDA IPC: the weight-transfer backend for a trainer on the same GPU as its engine.

Colocate mode, and a server on the trainer's own GPU (a single-GPU user's setup),
put two processes on one device, which NCCL refuses. IPC needs no collective: a
push goes in parts (packing.plan_parts), each packed into one GPU buffer in the
engine's dtype whose CUDA IPC handle the part's update request carries, and the
workers (vLLM's `IPCWeightTransferEngine`, packed mode) map it, copy the tensors
out and load them. So a push costs one buffer, a bucket or the largest tensor,
not a second copy of the model on a GPU that already holds two.

The next part overwrites the buffer only once every worker's update call has
returned, and vLLM's engine returns only after synchronizing its device (0.26 and
0.32), so its copies of the part are complete. The buffer is exported afresh for
each part: torch pairs each export with one import and release on the worker,
which vLLM 0.26's packed consumer does per part.

The handles travel pickled (vLLM's HTTP form), which the workers unpickle only
with VLLM_ALLOW_INSECURE_SERIALIZATION=1: the server sets it for its engines when
started with `--weight_transfer_backend ipc`, which then needs `--api_key` (refused at start
without one), takes pushes from loopback only, through /weights/* (each guarded by the
group owner's token), never through vLLM's weight routes.
"""

import base64
import itertools
import pickle

import torch

from fastgrpo import vllm_compat
from fastgrpo.transfer.base import DEFAULT_BUCKET_BYTES, SharingSender
from fastgrpo.transfer.packing import pack_part, part_capacity

# What an engine needs to unpickle the handles (vllm.envs reads it in each worker).
INSECURE_SERIALIZATION_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"


class IpcSender(SharingSender):
    backend = "ipc"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(bucket_bytes)
        self.buffer: torch.Tensor | None = None  # the parts' buffer, during a push

    @staticmethod
    def worker_init_info(master_address, master_port, rank_offset, world_size, bucket_bytes, timeout_s) -> dict:
        return {"packed": True} if vllm_compat.ipc_packed_in_init() else {}

    @staticmethod
    def worker_update_fields(bucket_bytes: int) -> dict:
        return {} if vllm_compat.ipc_packed_in_init() else {"packed": True}  # vLLM 0.26: with every update

    def share(self, parts, metas, tensors):
        tensors = iter(tensors)
        for part in parts:
            first = next(tensors)  # the part's device decides the buffer's
            if first.device.type != "cuda":
                raise ValueError(f"{metas[part.first].name} is on {first.device}: CUDA IPC sends CUDA tensors only")
            if self.buffer is None:
                self.buffer = torch.empty(part_capacity(metas, self.bucket_bytes), dtype=torch.uint8,
                                          device=first.device)
            pack_part(part, metas, itertools.chain([first], tensors), self.buffer)
            torch.cuda.synchronize()  # the part is complete before another process reads it
            uuid = str(torch.cuda.get_device_properties(self.buffer.device).uuid)
            handle = {uuid: reduce_cuda_tensor(self.buffer)}  # a fresh export per part (see the module's doc)
            yield {"ipc_handles_pickled": base64.b64encode(pickle.dumps(handle)).decode("ascii")}

    def release(self) -> None:
        self.buffer = None  # back to the allocator for training
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # once the workers released their imports, torch frees the exports


def reduce_cuda_tensor(tensor: torch.Tensor) -> tuple:
    """The arguments of torch's `rebuild_cuda_tensor` for `tensor` (what vLLM's worker rebuilds it from)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor)[1]
