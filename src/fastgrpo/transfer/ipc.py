"""CUDA IPC: the weight-transfer backend for a trainer on the same GPU as its engine.

Colocate mode, and a server on the trainer's own GPU (a single-GPU user's setup),
put two processes on one device, which NCCL refuses. IPC needs no collective: the
update request itself carries, for each tensor, a CUDA IPC handle to a copy in the
engine's dtype, and the worker (vLLM's `IPCWeightTransferEngine`, unpacked mode,
the same in vLLM 0.26 and 0.32) maps it and loads it. The copies live until the
push is confirmed.

The handles travel pickled (vLLM's HTTP form), which the workers unpickle only
with VLLM_ALLOW_INSECURE_SERIALIZATION=1: the server sets it for its engines when
started with `--weight_transfer_backend ipc`, which then needs `--api_key` (refused at start
without one), takes pushes from loopback only, through /weights/* (each guarded by the
group owner's token), never through vLLM's weight routes.
"""

import base64
import pickle
import socket

import torch

from fastgrpo.transfer.base import DEFAULT_BUCKET_BYTES, WeightSender

# What an engine needs to unpickle the handles (vllm.envs reads it in each worker).
INSECURE_SERIALIZATION_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"


class IpcSender(WeightSender):
    backend = "ipc"
    handles_in_update = True

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(bucket_bytes)  # unused: unpacked IPC moves each tensor whole
        self.group = None  # a listening socket: the trainer's presence (see listen)
        self.copies: list[torch.Tensor] = []

    @staticmethod
    def worker_init_info(master_address, master_port, rank_offset, world_size, bucket_bytes, timeout_s) -> dict:
        return {}  # no rendezvous; unpacked is the default of both vLLM versions

    def listen(self, master_address, master_port, world_size, timeout_s) -> None:
        # No rendezvous, but a socket that accepts connections while this trainer lives: the server tells a
        # running owner of its group from a dead one by connecting to it (serve/weights.py).
        if self.group is None:
            self.group = socket.create_server((master_address, master_port))

    def open(self, master_address, master_port, world_size, timeout_s) -> None:
        self.listen(master_address, master_port, world_size, timeout_s)

    def share(self, metas, tensors) -> dict:
        handles = []
        for meta, tensor in zip(metas, tensors, strict=True):
            if tensor.device.type != "cuda":
                raise ValueError(f"{meta.name} is on {tensor.device}: CUDA IPC sends CUDA tensors only")
            # Always a copy: a gathering iterator (ZeRO-3, FSDP) may free its tensor once we pull the next.
            copy = tensor.detach().to(meta.torch_dtype, copy=True).contiguous()
            self.copies.append(copy)
            uuid = str(torch.cuda.get_device_properties(copy.device).uuid)
            handles.append({uuid: reduce_cuda_tensor(copy)})
        torch.cuda.synchronize()  # the copies are complete before another process reads them
        return {"ipc_handles_pickled": base64.b64encode(pickle.dumps(handles)).decode("ascii")}

    def send(self, metas, tensors) -> int:
        return sum(m.nbytes for m in metas)  # the handles in the update request carried everything

    def release(self) -> None:
        self.copies = []
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # lets the allocator reuse memory that the worker had mapped

    def close(self) -> None:
        self.release()
        if self.group is not None:
            self.group.close()
            self.group = None


def reduce_cuda_tensor(tensor: torch.Tensor) -> tuple:
    """The arguments of torch's `rebuild_cuda_tensor` for `tensor` (what vLLM's worker rebuilds it from)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor)[1]
