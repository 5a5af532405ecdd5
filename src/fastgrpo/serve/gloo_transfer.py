"""A gloo weight-transfer backend for vLLM: the CPU twin of vLLM's NCCL backend.

NCCL needs GPUs, so on vLLM's CPU build weights travel over a gloo process group
(a `TCPStore` rendezvous, TCP between processes). The trainer is rank 0 and the
only sender; each vLLM worker of each replica joins at `rank_offset + its rank`.

Tensors travel packed: the trainer copies consecutive tensors into byte buckets
of at most `bucket_bytes` and broadcasts each bucket once. Both sides derive the
same bucket plan from the same metadata (names, dtypes, shapes), so nothing but
raw bytes crosses the collective and nothing is pickled. Workers load each
bucket through `model.load_weights` inside vLLM's layerwise reload
(`start_weight_update` / `finish_weight_update`), which re-processes weights
after loading (the CPU backend repacks linear weights for oneDNN).

Registered with vLLM's `WeightTransferEngineFactory` (worker side) and
`WeightTransferTrainerFactory` (trainer side) under the name "gloo" by
`fastgrpo.serve.plugin`, a vLLM general plugin, so it exists in every worker.
"""

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

BACKEND_NAME = "gloo"
DEFAULT_BUCKET_BYTES = 32 * 2**20
DEFAULT_TIMEOUT_S = 120.0
# Raised by a worker whose trainer never sent; the server maps it to a 504 that says so.
TRAINER_DID_NOT_SEND = "the trainer's weights did not arrive"
_ALIGN = 64  # byte alignment of each tensor inside a bucket, so dtype views are legal


# ---------------------------------------------------------------------------
# Pure packing logic shared by both sides.


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.torch_dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wire_tensors(named, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[TensorMeta], dict]:
    """The tensors, their metadata as they travel (floats in the engine's `dtype`: packing
    casts them on the fly, with no intermediate copy), and the update info for the workers."""
    tensors = [t.detach() for _, t in named]
    metas = [TensorMeta(n, dtype_name(dtype if t.is_floating_point() else t.dtype), tuple(t.shape))
             for (n, _), t in zip(named, tensors)]
    info = {"names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
            "shapes": [list(m.shape) for m in metas]}
    return tensors, metas, info


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[tuple[int, int]]]:
    """Split tensors, in order, into buckets: each a list of (tensor index, byte offset).

    A tensor larger than `bucket_bytes` gets a bucket of its own.
    """
    buckets: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    used = 0
    for index, meta in enumerate(metas):
        size = _aligned(meta.nbytes)
        if current and used + size > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append((index, used))
        used += size
    if current:
        buckets.append(current)
    return buckets


def bucket_size(metas: list[TensorMeta], bucket: list[tuple[int, int]]) -> int:
    index, offset = bucket[-1]
    return offset + _aligned(metas[index].nbytes)


def pack_bucket(metas, bucket, tensors: dict[int, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy the bucket's tensors into the uint8 buffer `out` at their offsets, cast to their
    wire dtype (and brought to the buffer's device) by the copy itself."""
    for index, offset in bucket:
        meta = metas[index]
        out[offset : offset + meta.nbytes].view(meta.torch_dtype).view(meta.shape).copy_(tensors[index].detach())
    return out


def unpack_bucket(metas, bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of the bucket's tensors inside `buffer` (no copies)."""
    views = []
    for index, offset in bucket:
        meta = metas[index]
        raw = buffer[offset : offset + meta.nbytes]
        views.append((meta.name, raw.view(meta.torch_dtype).view(meta.shape)))
    return views


# ---------------------------------------------------------------------------
# The process group.


def open_group(master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float):
    """Join (or, as rank 0, host) a gloo group. Blocks until all ranks arrived or timeout."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address, master_port, world_size, is_master=(rank == 0),
        timeout=timeout, wait_for_workers=False,
    )
    return dist.ProcessGroupGloo(dist.PrefixStore("fastgrpo-weights", store), rank, world_size, timeout)


def broadcast_from_trainer(group, buffer: torch.Tensor):
    """Start a broadcast from rank 0 (the trainer); returns the work to `.wait()` on."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return group.broadcast([buffer], options)


# ---------------------------------------------------------------------------
# Worker side (runs inside vLLM's worker processes).

from vllm.distributed.weight_transfer.base import (  # noqa: E402
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)


def refresh_tied_cpu_heads(model: torch.nn.Module) -> None:
    """Re-pack the CPU GEMM of modules that share a tied weight (lm_head = embed_tokens).

    vLLM's CPU build packs each linear/LM-head weight for its GEMM kernels after
    loading (`cpu_linear`). With tied embeddings the checkpoint only carries
    `embed_tokens`, so a reload re-processes that module alone and the LM head
    keeps computing logits from its stale packed copy (measured here: a pushed
    embedding changed the server's logprobs by ~2 nats against transformers).
    Re-dispatching every module of a shared weight fixes it; it is idempotent.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    sharers: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(module, "cpu_linear"):
            sharers.setdefault(id(weight), []).append(module)
    for modules in sharers.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


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
            raise ValueError(
                f"names, dtype_names and shapes must have one entry per tensor; got "
                f"{len(self.names)}, {len(self.dtype_names)} and {len(self.shapes)}"
            )

    def metas(self) -> list[TensorMeta]:
        return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        self.buffers: list[torch.Tensor | None] = [None, None]

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        if self.group is not None:
            self.shutdown()
        rank = init_info.rank_offset + self.parallel_config.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.group = open_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_cpu_heads(self.model)

    def update_weights(self, update_info) -> None:
        # The base class synchronizes an accelerator afterwards; gloo is synchronous on CPU.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialized: call init_weight_transfer_engine first")
        metas = update_info.metas()
        buckets = plan_buckets(metas, self.bucket_bytes)

        def post(i):
            bucket, size, slot = buckets[i], bucket_size(metas, buckets[i]), i % 2
            if self.buffers[slot] is None or self.buffers[slot].numel() < size:
                self.buffers[slot] = torch.empty(max(size, self.bucket_bytes), dtype=torch.uint8)
            buffer = self.buffers[slot][:size]
            return bucket, buffer, broadcast_from_trainer(self.group, buffer)

        # Receive bucket i+1 while loading bucket i: the transfer and the load overlap. Two
        # buffers alternate, kept between pushes (load_weights copies out of them).
        incoming = post(0)
        for i in range(len(buckets)):
            bucket, buffer, work = incoming
            try:
                work.wait()
            except RuntimeError as exc:
                if "Timed out" in str(exc):
                    raise TimeoutError(f"{TRAINER_DID_NOT_SEND} (gloo: {exc})") from exc
                raise
            incoming = post(i + 1) if i + 1 < len(buckets) else None
            self.model.load_weights(unpack_bucket(metas, bucket, buffer))

    def shutdown(self) -> None:
        self.group = None  # gloo tears its sockets down when the group is released


# ---------------------------------------------------------------------------
# Trainer side.


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND_NAME

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


def send_buckets(group, metas: list[TensorMeta], tensors: Iterable[torch.Tensor], bucket_bytes: int,
                 buffers: list | None = None) -> int:
    """Broadcast `tensors` (in `metas` order) bucket by bucket. Returns bytes sent.

    Two buffers alternate: the next bucket is packed while the previous one is on the wire.
    Pass the same `buffers` list on every push to reuse them (fresh memory costs page faults).
    """
    iterator: Iterator[torch.Tensor] = iter(tensors)
    sent = 0
    buffers = buffers if buffers is not None else [None, None]
    in_flight = [None, None]
    for i, bucket in enumerate(plan_buckets(metas, bucket_bytes)):
        slot = i % 2
        if in_flight[slot] is not None:
            in_flight[slot].wait()  # its buffer is about to be reused
        size = bucket_size(metas, bucket)
        if buffers[slot] is None or buffers[slot].numel() < size:
            buffers[slot] = torch.empty(size, dtype=torch.uint8)
        chunk = buffers[slot][:size]
        pack_bucket(metas, bucket, {index: next(iterator) for index, _ in bucket}, chunk)
        in_flight[slot] = broadcast_from_trainer(group, chunk)
        sent += size
    for work in in_flight:
        if work is not None:
            work.wait()
    return sent


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side for vLLM's own clients (`WeightTransferTrainerFactory`).

    fastgrpo's `VLLMClient` drives the same wire protocol against its server's
    routes; this class lets a plain `vllm serve` with this plugin be fed too.
    """

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender=True, bucket_bytes=DEFAULT_BUCKET_BYTES):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo trainer weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port, rank_offset=1,
            world_size=init_info.world_size, bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s,
        )
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            engine.group = open_group(
                init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
            )
            joined.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        metas = [TensorMeta(m.name, dtype_name(m.dtype), tuple(m.shape)) for m in meta]
        info = GlooWeightTransferUpdateInfo([m.name for m in metas], [m.dtype for m in metas], [list(m.shape) for m in metas])
        from concurrent.futures import ThreadPoolExecutor

        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))
            send_buckets(self.group, metas, (tensor for _, tensor in self.source), self.bucket_bytes)
            received.result()
        finally:
            pool.shutdown(wait=False)  # never join a worker stuck in a failed collective
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None
