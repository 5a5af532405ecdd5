"""How tensors travel: one byte stream cut into fixed-size buckets (pure; both sides run it).

The sender lays the tensors out one after another (each at a 64-byte aligned
offset, in the order it announced them) in a virtual byte stream, and sends that
stream in buckets of at most `bucket_bytes`. Both sides derive the same plan from
the same metadata (names, dtypes, shapes), so only raw bytes cross the
collective and nothing is pickled.

A tensor that fits inside one bucket arrives as a view of the receive buffer; a
tensor that crosses a bucket boundary (any tensor larger than a bucket does)
travels in pieces and is reassembled into its own memory. So a bucket never
grows past `bucket_bytes`, whatever the largest tensor is.
"""

import math
from dataclasses import dataclass

import torch

ALIGN = 64  # byte alignment of each tensor in the stream, so dtype views of a buffer are legal
MIN_BUCKET_BYTES = 4096
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


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
        return math.prod(self.shape) * self.torch_dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wire_meta(name: str, shape, dtype: torch.dtype, wire_dtype: torch.dtype) -> TensorMeta:
    """How a tensor travels: floating tensors in the engine's dtype (packing casts them), others as they are."""
    travels_as = wire_dtype if dtype.is_floating_point else dtype
    return TensorMeta(name, dtype_name(travels_as), tuple(int(d) for d in shape))


def update_info(metas: list[TensorMeta]) -> dict:
    """What the workers are told before the bytes arrive (vLLM's names/dtype_names/shapes)."""
    return {"names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
            "shapes": [list(m.shape) for m in metas]}


def metas_from_info(names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> list[TensorMeta]:
    return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(names, dtype_names, shapes, strict=True)]


def check_bucket_bytes(bucket_bytes: int) -> int:
    if not isinstance(bucket_bytes, int) or bucket_bytes < MIN_BUCKET_BYTES or bucket_bytes % ALIGN:
        raise ValueError(f"bucket_bytes={bucket_bytes!r}: use a multiple of {ALIGN} bytes, at least "
                         f"{MIN_BUCKET_BYTES} (32 MiB = {32 << 20} is the default)")
    return bucket_bytes


@dataclass(frozen=True)
class Piece:
    """Bytes [start, start + nbytes) of tensor `index`, at `offset` in its bucket."""

    index: int
    start: int
    nbytes: int
    offset: int

    def whole(self, metas: list[TensorMeta]) -> bool:
        return self.start == 0 and self.nbytes == metas[self.index].nbytes


def stream_offsets(metas: list[TensorMeta]) -> tuple[list[int], int]:
    """Each tensor's offset in the stream, and the stream's length."""
    offsets, end = [], 0
    for meta in metas:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + meta.nbytes
    return offsets, end


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[Piece]]:
    """Bucket k carries stream bytes [k * bucket_bytes, (k + 1) * bucket_bytes): its pieces, in order.

    Empty tensors have no piece. The last bucket may be shorter (see `bucket_length`).
    """
    check_bucket_bytes(bucket_bytes)
    offsets, end = stream_offsets(metas)
    buckets: list[list[Piece]] = [[] for _ in range(-(-end // bucket_bytes))]
    for index, (meta, start) in enumerate(zip(metas, offsets)):
        done = 0
        while done < meta.nbytes:
            k, at = divmod(start + done, bucket_bytes)
            n = min(meta.nbytes - done, bucket_bytes - at)
            buckets[k].append(Piece(index, done, n, at))
            done += n
    return buckets


def bucket_length(bucket: list[Piece]) -> int:
    """Bytes that must travel for this bucket (up to its last piece)."""
    return max((p.offset + p.nbytes for p in bucket), default=0)


@dataclass(frozen=True)
class Part:
    """Tensors [first, first + len(sizes)) of a push, back to back in one shared buffer: vLLM's packed IPC layout
    (the workers split the buffer by `sizes`, view each piece in its dtype and copy it out)."""

    first: int
    sizes: tuple[int, ...]  # bytes of each tensor

    @property
    def stop(self) -> int:
        return self.first + len(self.sizes)


def part_capacity(metas: list[TensorMeta], bucket_bytes: int) -> int:
    """The shared buffer a push in parts needs: a bucket, or the largest tensor where that is larger (a tensor
    is never cut: the workers view each one whole), or the whole push where that is smaller (at least a byte)."""
    return min(max([bucket_bytes] + [m.nbytes for m in metas]), max(sum(m.nbytes for m in metas), 1))


def plan_parts(metas: list[TensorMeta], bucket_bytes: int) -> list[Part]:
    """Cut a push into parts that each fit `part_capacity`: consecutive tensors, in order.

    A part also ends before a tensor whose offset would not be a multiple of its element size (dtype views need
    it); tensors of one dtype never cause that.
    """
    capacity = part_capacity(metas, check_bucket_bytes(bucket_bytes))
    parts: list[Part] = []
    first, sizes, used = 0, [], 0
    for index, meta in enumerate(metas):
        if sizes and (used + meta.nbytes > capacity or (meta.nbytes and used % meta.torch_dtype.itemsize)):
            parts.append(Part(first, tuple(sizes)))
            first, sizes, used = index, [], 0
        sizes.append(meta.nbytes)
        used += meta.nbytes
    if sizes:
        parts.append(Part(first, tuple(sizes)))
    return parts


def pack_part(part: Part, metas: list[TensorMeta], tensors, buffer: torch.Tensor) -> None:
    """Copy the part's tensors, pulled from `tensors` one at a time, back to back into `buffer` (each copy casts
    to the wire dtype and moves to the buffer's device)."""
    offset = 0
    for index, size in zip(range(part.first, part.stop), part.sizes):
        meta = metas[index]
        buffer[offset:offset + size].view(meta.torch_dtype).view(meta.shape).copy_(next(tensors))
        offset += size


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return tensor.reshape(-1).view(torch.uint8)


def pack_piece(piece: Piece, meta: TensorMeta, source: torch.Tensor, buffer: torch.Tensor) -> None:
    """Copy one piece of `source` into the bucket buffer; the copy itself casts it to the wire dtype and
    brings it to the buffer's device. A partial piece needs a contiguous `source`."""
    out = buffer[piece.offset : piece.offset + piece.nbytes].view(meta.torch_dtype)
    if piece.start == 0 and piece.nbytes == meta.nbytes:
        out.view(meta.shape).copy_(source)
    else:  # pieces start and end on element boundaries: offsets are multiples of ALIGN, or the tensor's end
        size = meta.torch_dtype.itemsize
        out.copy_(source.reshape(-1)[piece.start // size : (piece.start + piece.nbytes) // size])


def unpack_view(piece: Piece, meta: TensorMeta, buffer: torch.Tensor) -> torch.Tensor:
    """A whole tensor inside a received bucket, as a view (no copy)."""
    return buffer[piece.offset : piece.offset + piece.nbytes].view(meta.torch_dtype).view(meta.shape)
