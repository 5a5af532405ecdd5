"""The send loop and the receive loop over any broadcast, pipelined two buckets deep.

`send_buckets` packs bucket k+1 while bucket k is on the wire; `receive_buckets`
receives bucket k+1 while bucket k loads. The transport is a function that
starts a broadcast of a uint8 buffer and returns something to `.wait()` on.

What the receiver hands to `load` stays valid for as long as anyone holds it.
vLLM's layerwise reload keeps the tensors of a layer until the whole layer has
arrived (some layers until `finish_weight_update`), so a receive buffer is
reused only once nothing refers to it any more (see `ReceiveBuffers`).
"""

from collections.abc import Callable, Iterator

import torch

from fastgrpo.transfer.packing import (
    TensorMeta,
    bucket_length,
    byte_view,
    pack_piece,
    plan_buckets,
    unpack_view,
)

Broadcast = Callable[[torch.Tensor], object]  # starts a broadcast of the buffer; returns work with .wait()


def send_buckets(metas: list[TensorMeta], tensors: Iterator[torch.Tensor], bucket_bytes: int,
                 broadcast: Broadcast, buffers: list, device: str | torch.device = "cpu") -> int:
    """Broadcast `tensors` (one per meta, in order, pulled lazily) bucket by bucket. Returns bytes sent.

    A tensor from `tensors` is used only until the next one is pulled (one that spans buckets is
    pulled once and packed piece by piece), so a gathering iterator may release it then. `buffers`
    (a list of two slots) is reused push after push.
    """
    in_flight = [None, None]
    current, current_index = None, -1  # the tensor being packed (held across buckets when it spans them)
    sent = 0
    for k, bucket in enumerate(plan_buckets(metas, bucket_bytes)):
        slot = k % 2
        if in_flight[slot] is not None:
            in_flight[slot].wait()  # its buffer is about to be reused
        length = bucket_length(bucket)
        if buffers[slot] is None or buffers[slot].numel() < length:
            buffers[slot] = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
        chunk = buffers[slot][:length]
        for piece in bucket:
            meta = metas[piece.index]
            while current_index < piece.index:  # pull up to this tensor (empty tensors have no piece)
                current = None  # let a gathering iterator release the previous one first
                current, current_index = next(tensors, None), current_index + 1
                if current is None:
                    raise ValueError(f"{len(metas)} tensors were announced but only {current_index} came")
            if piece.start == 0 and not piece.whole(metas):
                current = current.detach().contiguous()  # it spans buckets: packed piece by piece
            pack_piece(piece, meta, current.detach(), chunk)
        in_flight[slot] = broadcast(chunk)
        sent += length
    current = None
    for _ in tensors:  # trailing empty tensors: a gathering iterator must run to its end on every rank
        pass
    for work in in_flight:
        if work is not None:
            work.wait()
    return sent


def _storage_use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class ReceiveBuffers:
    """Receive buffers reused only when nothing else refers to their memory.

    A buffer is free when its storage's reference count is back to what the pool
    alone holds; otherwise a fresh one is allocated and the old one lives on in
    its holders. At most `keep` buffers are remembered between pushes.
    """

    def __init__(self, bucket_bytes: int, device: str | torch.device = "cpu", keep: int = 3):
        self.bucket_bytes, self.device, self.keep = bucket_bytes, device, keep
        self.pool: list[torch.Tensor] = []
        self.fresh = 0  # buffers allocated because every remembered one was held elsewhere
        probe = [torch.empty(1, dtype=torch.uint8)]
        self._baseline = _storage_use_count(probe[0]) if hasattr(torch._C, "_storage_Use_Count") else None

    def _free(self, buffer: torch.Tensor) -> bool:
        return self._baseline is not None and _storage_use_count(buffer) <= self._baseline

    def take(self, length: int) -> torch.Tensor:
        for buffer in self.pool:
            if self._free(buffer):
                return buffer[:length]
        buffer = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        self.fresh += 1
        if len(self.pool) < self.keep:
            self.pool.append(buffer)
        return buffer[:length]


def receive_buckets(metas: list[TensorMeta], bucket_bytes: int, broadcast: Broadcast,
                    load: Callable[[list[tuple[str, torch.Tensor]]], None], buffers: ReceiveBuffers,
                    wait: Callable[[object], None] = lambda work: work.wait()) -> None:
    """Receive the stream that `send_buckets` sends and hand each complete tensor to `load`, a bucket's
    worth at a time. Tensors inside one bucket arrive as views; tensors that span buckets are assembled
    in their own memory."""
    buckets = plan_buckets(metas, bucket_bytes)
    partial: dict[int, torch.Tensor] = {}

    def post(k: int):
        buffer = buffers.take(bucket_length(buckets[k]))
        return buffer, broadcast(buffer)

    incoming = post(0) if buckets else None
    for k, bucket in enumerate(buckets):
        buffer, work = incoming
        wait(work)
        del work  # a transport's work may hold the buffer too
        incoming = post(k + 1) if k + 1 < len(buckets) else None
        ready = []
        for piece in bucket:
            meta = metas[piece.index]
            if piece.whole(metas):
                ready.append((meta.name, unpack_view(piece, meta, buffer)))
                continue
            if piece.index not in partial:
                partial[piece.index] = torch.empty(meta.shape, dtype=meta.torch_dtype, device=buffer.device)
            target = byte_view(partial[piece.index])
            target[piece.start : piece.start + piece.nbytes].copy_(buffer[piece.offset : piece.offset + piece.nbytes])
            if piece.start + piece.nbytes == meta.nbytes:
                ready.append((meta.name, partial.pop(piece.index)))
        del buffer
        if ready:
            load(ready)
        del ready
    empty = [(m.name, torch.empty(m.shape, dtype=m.torch_dtype)) for m in metas if m.nbytes == 0]
    if empty:
        load(empty)
