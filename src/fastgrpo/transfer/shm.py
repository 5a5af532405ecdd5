"""Shared memory: the weight-transfer backend for a trainer on the same machine as a CPU server, both sides.

CUDA IPC's counterpart for CPU tensors, and its protocol: a push goes in parts
(packing.plan_parts), each packed into one file in /dev/shm that the trainer maps,
and each part's update request names the file; the workers map it, copy the
part's tensors out and load them (vLLM's layerwise reload, as gloo's workers do).
No rendezvous, no collective, no TCP, and nothing pickled: the request carries a
file name, which the workers accept only in this backend's form. The file lives
for one push (a trainer killed mid-push leaves one behind, named fastgrpo-weights-*).

The server takes it with `--weight_transfer_backend shm`, from loopback only, through
/weights/* (each part guarded by the group owner's token). The worker engine is
registered under "shm" by `fastgrpo.transfer.plugin`.
"""

import errno
import os
import re
import uuid
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from fastgrpo.transfer.base import DEFAULT_BUCKET_BYTES, SharingSender
from fastgrpo.transfer.packing import pack_part, part_capacity
from fastgrpo.transfer.reload import LayerwiseReload

SHM_DIR = "/dev/shm"
FILE_NAME = re.compile(r"fastgrpo-weights-[0-9a-f]{32}")  # all a request may name: nothing else is read


class ShmSender(SharingSender):
    backend = "shm"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(bucket_bytes)
        self.path: str | None = None  # the parts' file, during a push
        self.buffer: torch.Tensor | None = None  # its mapping

    def share(self, parts, metas, tensors):
        self.buffer = self._create(part_capacity(metas, self.bucket_bytes))
        tensors = iter(tensors)
        for part in parts:
            pack_part(part, metas, tensors, self.buffer)
            yield {"shm_name": os.path.basename(self.path)}

    def _create(self, nbytes: int) -> torch.Tensor:
        if not os.path.isdir(SHM_DIR):
            raise RuntimeError(f"the shm weight-transfer backend needs {SHM_DIR} (Linux); use gloo instead")
        self.path = os.path.join(SHM_DIR, f"fastgrpo-weights-{uuid.uuid4().hex}")
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC here, rather than SIGBUS on the first write past it
        except OSError as exc:
            self.release()
            if exc.errno != errno.ENOSPC:
                raise
            raise RuntimeError(
                f"{SHM_DIR} has no room for the push's {nbytes / 2**20:.0f} MiB buffer (a bucket, or the model's "
                "largest tensor): give it more (docker run --shm-size), or use the gloo backend") from exc
        finally:
            os.close(fd)
        return torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)

    def release(self) -> None:
        self.buffer = None
        if self.path is not None:
            path, self.path = self.path, None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------
# Worker side (runs inside vLLM's worker processes).


@dataclass
class ShmWeightTransferInitInfo(WeightTransferInitInfo):
    pass  # no rendezvous


@dataclass
class ShmWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    tensor_sizes: list[int]
    shm_name: str

    def __post_init__(self):
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes) == len(self.tensor_sizes)):
            raise ValueError(f"names, dtype_names, shapes and tensor_sizes must have one entry per tensor; got "
                             f"{len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)} and "
                             f"{len(self.tensor_sizes)}")
        if not FILE_NAME.fullmatch(self.shm_name):
            raise ValueError(f"shm_name {self.shm_name!r} is not a push's file (fastgrpo-weights-<32 hex>)")


class ShmWeightTransferEngine(LayerwiseReload,
                              WeightTransferEngine[ShmWeightTransferInitInfo, ShmWeightTransferUpdateInfo]):
    init_info_cls = ShmWeightTransferInitInfo
    update_info_cls = ShmWeightTransferUpdateInfo

    def init_transfer_engine(self, init_info: ShmWeightTransferInitInfo) -> None:
        pass

    def update_weights(self, update_info) -> None:
        # The base class synchronizes an accelerator afterwards; this is CPU memory, read synchronously.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: ShmWeightTransferUpdateInfo) -> None:
        path, nbytes = os.path.join(SHM_DIR, update_info.shm_name), sum(update_info.tensor_sizes)
        try:  # a part of empty tensors only has nothing to map
            mapped = (torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8) if nbytes
                      else torch.empty(0, dtype=torch.uint8))
        except RuntimeError as exc:
            raise RuntimeError(f"the trainer's shared-memory buffer {path} could not be read ({exc}): the trainer "
                               "must run on this machine, as the same user") from exc
        weights, offset = [], 0
        for name, dtype, shape, size in zip(update_info.names, update_info.dtype_names, update_info.shapes,
                                            update_info.tensor_sizes, strict=True):
            # A copy: the trainer packs the next part into the same file, and the layerwise reload may keep a
            # tensor until its layer is whole.
            weights.append((name, mapped[offset:offset + size].view(getattr(torch, dtype)).view(shape).clone()))
            offset += size
        del mapped
        self.model.load_weights(weights)

    def shutdown(self) -> None:
        pass

    @staticmethod
    def trainer_send_weights(iterator, trainer_args) -> None:  # abstract in vLLM 0.26's base class only
        raise NotImplementedError("the shm trainer side is ShmSender (VLLMClient)")
