"""NCCL: the weight-transfer backend for CUDA tensors, on vLLM's own NCCL engine and packed broadcast.

The worker side is vLLM's `NCCLWeightTransferEngine` (packed mode). It receives
each chunk into a freshly allocated buffer, so the tensors that vLLM's layerwise
reload keeps until a layer is complete are never overwritten. Both sides cut
chunks by the same rule from the same metadata and `packed_buffer_size_bytes`,
which is our bucket size.

NCCL itself has no timeout: an init waits for every rank for ever, and a broadcast
to a rank that is gone never returns. Both are bounded here: the init runs on a
thread the caller stops waiting for (open_sender), and a watchdog aborts the
communicator (vLLM's `destroy`: ncclCommAbort) once a push has run past its
timeout, which makes the stuck broadcast return with an error.
"""

import contextlib
import threading

import torch
from vllm.distributed.weight_transfer.nccl_common import trainer_init
from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

from fastgrpo import vllm_compat
from fastgrpo.transfer.base import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S, WeightSender

NUM_BUFFERS = 2


def packing(bucket_bytes: int) -> dict:
    """The packed wire parameters both sides must agree on (chunks cut at `bucket_bytes`)."""
    return {"packed": True, "packed_buffer_size_bytes": bucket_bytes, "packed_num_buffers": NUM_BUFFERS}


class NcclSender(WeightSender):
    backend = "nccl"
    tells_arrivals = False  # nothing says a worker has begun to join: the init itself is what waits

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(bucket_bytes)
        self.group, self.timeout_s, self.aborted = None, None, False
        # The init may run on another thread (open_sender), which must use the caller's device.
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None

    @staticmethod
    def worker_init_info(master_address, master_port, rank_offset, world_size, bucket_bytes, timeout_s) -> dict:
        info = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                "world_size": world_size}
        return {**info, **packing(bucket_bytes)} if vllm_compat.nccl_packed_in_init() else info

    @staticmethod
    def worker_update_fields(bucket_bytes: int) -> dict:
        return {} if vllm_compat.nccl_packed_in_init() else packing(bucket_bytes)

    def open(self, master_address, master_port, world_size, timeout_s) -> None:
        self.timeout_s, self.aborted = timeout_s, False
        with torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext():
            self.group = trainer_init({"master_address": master_address, "master_port": master_port,
                                       "world_size": world_size})

    def send(self, metas, tensors) -> int:
        watchdog = threading.Timer(self.timeout_s or DEFAULT_TIMEOUT_S, self._abort_stuck_push)
        watchdog.daemon = True
        watchdog.start()
        try:
            # vLLM's packer holds a chunk's tensors until it concatenates them, so each one is copied (and cast
            # to its wire dtype) here: a gathering iterator may release its tensor as soon as we pull the next.
            pairs = ((m.name, t.detach().to(m.torch_dtype, copy=True)) for m, t in zip(metas, tensors, strict=True))
            packed_nccl_broadcast_producer(iterator=pairs, group=self.group, src=0,
                                           post_iter_func=lambda item: item[1], buffer_size_bytes=self.bucket_bytes,
                                           num_buffers=NUM_BUFFERS)
            torch.cuda.synchronize()  # vLLM 0.26's producer returns with its side streams still running
        except Exception as exc:
            if self.aborted:
                raise self._overdue() from exc
            raise
        finally:
            watchdog.cancel()
        if self.aborted:  # it finished as the watchdog fired: the communicator is gone all the same
            raise self._overdue()
        return sum(m.nbytes for m in metas)

    def _overdue(self) -> TimeoutError:
        return TimeoutError(f"the NCCL broadcast did not complete within {self.timeout_s:.0f} s (a worker gone or "
                            "stuck); the communicator was aborted")

    def _abort_stuck_push(self) -> None:
        self.aborted = True
        self.close()

    def close(self) -> None:
        group, self.group = getattr(self, "group", None), None
        if group is not None:
            group.destroy()
