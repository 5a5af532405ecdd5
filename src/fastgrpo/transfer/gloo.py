"""gloo: the weight-transfer backend for CPU tensors (vLLM's CPU build), both sides.

NCCL needs GPUs, so on vLLM's CPU build weights travel over a gloo process group
(a `TCPStore` rendezvous, TCP between processes). The trainer is rank 0 and the
only sender; each vLLM worker of each DP rank joins at `rank_offset + dp_rank x TP + its rank`.
The stream is bucketed (packing.py) and pipelined (bucketed.py). Workers load
what arrives through `model.load_weights` inside vLLM's layerwise reload
(`start_weight_update` / `finish_weight_update`), which re-processes weights
after loading (the CPU backend repacks linear weights for oneDNN).

The worker engine is registered with vLLM's `WeightTransferEngineFactory`, and the
trainer engine with `WeightTransferTrainerFactory`, under "gloo" by
`fastgrpo.transfer.plugin`, a vLLM general plugin, so it exists in every worker.
"""

import datetime
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from fastgrpo import vllm_compat
from fastgrpo.quiet_gloo import gloo_options
from fastgrpo.transfer.base import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S, WeightSender
from fastgrpo.transfer.bucketed import ReceiveBuffers, receive_buckets, send_buckets
from fastgrpo.transfer.packing import TensorMeta, dtype_name, metas_from_info
from fastgrpo.transfer.reload import LayerwiseReload

# Raised by a worker whose trainer never sent; the server maps it to a 504 that says so.
TRAINER_DID_NOT_SEND = "the trainer's weights did not arrive"


# How long a worker looks for the trainer's rendezvous. The trainer hosts it before it asks the workers to
# join, so this is quick when the address is right; a wrong one blocks the engine (a join runs in its busy
# loop) only this long, whatever the collectives' timeout.
WORKER_RENDEZVOUS_TIMEOUT_S = 30.0


def rendezvous(master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float):
    """The group's TCPStore: rank 0 hosts it (and returns at once), the others connect to it."""
    return dist.TCPStore(master_address, master_port, world_size, is_master=(rank == 0),
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def open_group(store, rank: int, world_size: int, timeout_s: float):
    """The gloo group over a rendezvous store; blocks until every rank has arrived (the store's timeout).
    Collectives then time out after `timeout_s`."""
    return dist.ProcessGroupGloo(dist.PrefixStore("fastgrpo-weights", store), rank, world_size,
                                 gloo_options(datetime.timedelta(seconds=timeout_s)))


def broadcaster(group):
    """Start a broadcast from rank 0 (the trainer) of a buffer; returns the work to `.wait()` on."""
    def broadcast(buffer: torch.Tensor):
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return group.broadcast([buffer], options)

    return broadcast


# ---------------------------------------------------------------------------
# Trainer side.


class GlooSender(WeightSender):
    backend = "gloo"

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        super().__init__(bucket_bytes)
        self.store = self.group = None
        self.buffers = [None, None]  # packing buffers, reused push after push (fresh memory costs page faults)

    @staticmethod
    def worker_init_info(master_address, master_port, rank_offset, world_size, bucket_bytes, timeout_s) -> dict:
        return {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                "world_size": world_size, "bucket_bytes": bucket_bytes, "timeout_s": timeout_s}

    def listen(self, master_address, master_port, world_size, timeout_s) -> None:
        self.store = rendezvous(master_address, master_port, 0, world_size, timeout_s)

    def peers_arrived(self) -> bool:
        return self.store is not None and self.store.num_keys() > 0  # a worker's gloo rendezvous wrote its key

    def open(self, master_address, master_port, world_size, timeout_s) -> None:
        if self.store is None:
            self.listen(master_address, master_port, world_size, timeout_s)
        self.group = open_group(self.store, 0, world_size, timeout_s)

    def send(self, metas, tensors) -> int:
        if self.group is None:
            raise RuntimeError("the gloo group is not open: call open() first")
        return send_buckets(metas, tensors, self.bucket_bytes, broadcaster(self.group), self.buffers)

    def close(self) -> None:
        self.group = self.store = None  # gloo tears its sockets down, and the store its port, when released


# ---------------------------------------------------------------------------
# Worker side (runs inside vLLM's worker processes).


@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError(f"names, dtype_names and shapes must have one entry per tensor; got "
                             f"{len(self.names)}, {len(self.dtype_names)} and {len(self.shapes)}")


def _wait_for_trainer(work) -> None:
    try:
        work.wait()
    except RuntimeError as exc:
        if "Timed out" in str(exc) or "timed out" in str(exc):
            raise TimeoutError(f"{TRAINER_DID_NOT_SEND} (gloo: {exc})") from exc
        raise


class GlooWeightTransferEngine(LayerwiseReload,
                               WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        self.buffers = ReceiveBuffers(self.bucket_bytes)

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        if self.group is not None:
            self.shutdown()
        if init_info.bucket_bytes != self.bucket_bytes:
            self.bucket_bytes, self.buffers = init_info.bucket_bytes, ReceiveBuffers(init_info.bucket_bytes)
        # vLLM's rule (nccl_common.worker_init_process_group): DP ranks first, then TP ranks within one.
        # data_parallel_index is the DP rank, which data_parallel_rank is not for a dense model's engine cores.
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        store = rendezvous(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                           min(init_info.timeout_s, WORKER_RENDEZVOUS_TIMEOUT_S))
        self.group = open_group(store, rank, init_info.world_size, init_info.timeout_s)

    def update_weights(self, update_info) -> None:
        # The base class synchronizes an accelerator afterwards; gloo is synchronous on CPU.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialized: call init_weight_transfer_engine first")
        metas = metas_from_info(update_info.names, update_info.dtype_names, update_info.shapes)
        receive_buckets(metas, self.bucket_bytes, broadcaster(self.group), self.model.load_weights, self.buffers,
                        wait=_wait_for_trainer)

    def shutdown(self) -> None:
        self.group = None

    @staticmethod
    def trainer_send_weights(iterator, trainer_args) -> None:  # abstract in vLLM 0.26's base class only
        raise NotImplementedError("the gloo trainer side is GlooSender (VLLMClient) or GlooTrainerWeightTransferEngine")


# ---------------------------------------------------------------------------
# The trainer engine for vLLM's own clients (`WeightTransferTrainerFactory`): lets a plain
# `vllm serve` with this plugin be fed from a `WeightSource`. fastgrpo's own client uses the
# same sender and the same push (push.py).


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine):  # unparametrised: 0.26 and 0.32 differ
    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender=True, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 timeout_s=DEFAULT_TIMEOUT_S, config=None):
        super().__init__(client=client, source=source, is_sender=is_sender,
                         **vllm_compat.trainer_engine_base_kwargs(config))
        self.sender = GlooSender(bucket_bytes)
        self.timeout_s = timeout_s

    @classmethod
    def trainer_init(cls, *args, client, source=None, **kwargs):
        init_info, config = vllm_compat.trainer_init_arguments(args, kwargs)
        if source is None:
            raise ValueError("gloo trainer weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s, config=config)
        if engine.is_sender:
            from fastgrpo.transfer.push import open_sender

            worker_info = GlooSender.worker_init_info(init_info.master_address, init_info.master_port, 1,
                                                      init_info.world_size, init_info.bucket_bytes,
                                                      init_info.timeout_s)
            open_sender(engine.sender, lambda: client.init_weight_transfer_engine(worker_info),
                        init_info.master_address, init_info.master_port, init_info.world_size, init_info.timeout_s)
        return engine

    def send_weights(self) -> None:
        from fastgrpo.transfer.push import VllmClientControl, push_weights

        metas = [TensorMeta(m.name, dtype_name(m.dtype), tuple(m.shape)) for m in self.source.metadata()]
        tensors = (tensor for _, tensor in self.source)
        if not self.is_sender:
            for _ in tensors:  # gathering is a collective: every rank iterates
                pass
            return
        push_weights(VllmClientControl(self.client), self.sender, metas, tensors, self.timeout_s)

    def shutdown(self) -> None:
        self.sender.close()

