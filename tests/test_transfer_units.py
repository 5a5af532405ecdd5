"""The weight-transfer data plane alone: the bucket plan, and the send and receive loops joined by an
in-memory wire (bytes the sender broadcasts are the bytes the receiver gets, in order).

The receiver's `load` here keeps every tensor it is handed until the end, as vLLM's layerwise reload
does until a layer is complete: a receive buffer reused too early shows up as a wrong tensor. Last, the
gloo device that every group of a process shares (fastgrpo.quiet_gloo), between two real processes.
"""

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fastgrpo.net import free_port
from fastgrpo.transfer import WeightTransferError
from fastgrpo.transfer.bucketed import ReceiveBuffers, receive_buckets, send_buckets
from fastgrpo.transfer.packing import (
    ALIGN,
    TensorMeta,
    bucket_length,
    dtype_name,
    pack_part,
    part_capacity,
    plan_buckets,
    plan_parts,
    stream_offsets,
    update_info,
    wire_meta,
)
from fastgrpo.transfer.weights import ModelWeights, NamedWeights


class _Done:
    def wait(self):
        pass


class _Fill:
    def __init__(self, source: torch.Tensor, target: torch.Tensor):
        self.source, self.target = source, target

    def wait(self):
        assert self.source.numel() == self.target.numel(), "sender and receiver cut the stream differently"
        self.target.copy_(self.source)
        self.source = self.target = None


class _Wire:
    """Sender broadcasts append a copy of their bytes; receiver broadcasts fill the next one in on wait()."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []
        self.received = 0

    def send(self, buffer):
        self.sent.append(buffer.clone())
        return _Done()

    def receive(self, buffer):
        self.received += 1
        return _Fill(self.sent[self.received - 1], buffer)


def _random_tensors(rng: random.Random, count: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    out = []
    for i in range(count):
        shape = tuple(rng.randint(1, 40) for _ in range(rng.randint(1, 3)))
        kind = rng.random()
        if kind < 0.15:
            t = torch.randint(0, 1000, shape, generator=gen)
        elif kind < 0.3:
            t = torch.randn(shape, generator=gen).to(torch.bfloat16)
        else:
            t = torch.randn(shape, generator=gen)
        out.append((f"layer.{i}.w", t))
    return out


def _roundtrip(named, bucket_bytes: int, wire_dtype=torch.float32, buffers: ReceiveBuffers | None = None):
    weights = NamedWeights(named)
    metas = weights.metas(wire_dtype)
    wire = _Wire()
    sent = send_buckets(metas, iter(weights), bucket_bytes, wire.send, [None, None])
    held = []
    receive_buckets(metas, bucket_bytes, wire.receive, held.extend, buffers or ReceiveBuffers(bucket_bytes))
    return metas, sent, wire, dict(held)


def test_plan_covers_every_byte_once_in_order_and_no_bucket_exceeds_its_size():
    rng = random.Random(0)
    for _ in range(200):
        metas = [TensorMeta(f"t{i}", rng.choice(["float32", "bfloat16", "int64", "float16"]),
                            tuple(rng.randint(0, 30) for _ in range(rng.randint(1, 3)))) for i in range(rng.randint(1, 30))]
        bucket_bytes = rng.choice([4096, 4096 + ALIGN, 8192, 1 << 20])
        buckets = plan_buckets(metas, bucket_bytes)
        offsets, end = stream_offsets(metas)
        covered = {i: 0 for i in range(len(metas))}
        last = (-1, -1)
        for k, bucket in enumerate(buckets):
            assert 0 < bucket_length(bucket) <= bucket_bytes
            for piece in bucket:
                assert piece.start == covered[piece.index], "pieces of a tensor arrive in order, without gaps"
                covered[piece.index] += piece.nbytes
                assert k * bucket_bytes + piece.offset == offsets[piece.index] + piece.start
                assert (piece.index, piece.start) > last
                last = (piece.index, piece.start)
        assert covered == {i: m.nbytes for i, m in enumerate(metas)}
        assert len(buckets) == -(-end // bucket_bytes)
        # Tensors that fit in one bucket start aligned, so views of the buffer are legal for their dtype.
        for bucket in buckets:
            for piece in bucket:
                if piece.whole(metas):
                    assert piece.offset % ALIGN == 0


def test_a_tensor_larger_than_a_bucket_is_split_not_given_an_oversized_bucket():
    metas = [TensorMeta("small", "float32", (10,)), TensorMeta("big", "float32", (5000,))]  # 20 kB vs 4 kB buckets
    buckets = plan_buckets(metas, 4096)
    assert max(bucket_length(b) for b in buckets) == 4096
    assert sum(p.nbytes for b in buckets for p in b if p.index == 1) == 20000


@pytest.mark.parametrize("bucket_bytes", [4096, 4096 + 3 * ALIGN, 16384, 1 << 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roundtrip_is_exact_while_the_receiver_keeps_what_it_loaded(bucket_bytes, seed):
    rng = random.Random(seed)
    named = _random_tensors(rng, 40)
    named.insert(rng.randint(0, 40), ("empty", torch.empty(0, 3)))
    metas, sent, wire, held = _roundtrip(named, bucket_bytes)
    assert sent == sum(t.numel() for t in wire.sent)
    assert sorted(held) == sorted(n for n, _ in named)
    for name, tensor in named:
        expected = tensor.float() if tensor.is_floating_point() else tensor  # floats travel as float32 here
        assert held[name].dtype == expected.dtype and held[name].shape == expected.shape
        assert torch.equal(held[name], expected), name


def test_floats_travel_in_the_wire_dtype_and_integers_unchanged():
    named = [("w", torch.randn(300, 7)), ("ids", torch.arange(1000)), ("h", torch.randn(5).to(torch.float16))]
    metas, _, _, held = _roundtrip(named, 4096, wire_dtype=torch.bfloat16)
    assert [m.dtype for m in metas] == ["bfloat16", "int64", "bfloat16"]
    assert torch.equal(held["w"], named[0][1].to(torch.bfloat16))  # one rounding, as a cast would give
    assert torch.equal(held["ids"], named[1][1])
    assert torch.equal(held["h"], named[2][1].to(torch.bfloat16))
    assert update_info(metas)["dtype_names"] == ["bfloat16", "int64", "bfloat16"]


def test_a_pulled_tensor_is_used_only_until_the_next_pull():
    """A gathering iterator (ZeRO-3) frees each tensor when the next is pulled; here it scribbles over it."""
    rng = random.Random(3)
    named = _random_tensors(rng, 25)
    originals = [t.clone() for _, t in named]

    def scribbling():
        previous = None
        for _, tensor in named:
            if previous is not None:
                previous.fill_(7)
            previous = tensor.clone()
            yield previous

    metas = NamedWeights(named).metas(torch.float32)
    wire, held = _Wire(), []
    send_buckets(metas, scribbling(), 4096, wire.send, [None, None])
    receive_buckets(metas, 4096, wire.receive, held.extend, ReceiveBuffers(4096))
    for (name, tensor), original in zip(held, originals):
        assert torch.equal(tensor, original.float() if original.is_floating_point() else original), name


def test_receive_buffers_are_reused_only_when_nobody_holds_them():
    pool = ReceiveBuffers(4096)
    first = pool.take(100)
    view = first[10:20]
    del first
    second = pool.take(100)
    assert second.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()  # held by `view`
    del view, second
    third = pool.take(4096)
    assert pool.fresh == 2 and third.untyped_storage().data_ptr() in {b.untyped_storage().data_ptr() for b in pool.pool}


def test_receive_buffers_are_reused_across_pushes_when_loads_copy_out():
    named = _random_tensors(random.Random(4), 30)
    buffers = ReceiveBuffers(4096)
    weights = NamedWeights(named)
    metas = weights.metas(torch.float32)
    for _ in range(3):
        wire = _Wire()
        send_buckets(metas, iter(weights), 4096, wire.send, [None, None])
        copied = {}
        receive_buckets(metas, 4096, wire.receive, lambda pairs: copied.update((n, t.clone()) for n, t in pairs), buffers)
        assert all(torch.equal(copied[n], t.float() if t.is_floating_point() else t) for n, t in named)
    assert buffers.fresh <= 3  # two in flight at a time, never one per bucket


def test_model_weights_know_names_and_shapes_before_any_tensor_and_skip_tied_copies(tiny_qwen2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    weights = ModelWeights(model)
    assert "lm_head.weight" not in weights.names  # tied to the embedding: sent once
    assert weights.names == [n for n, _ in model.named_parameters()]
    metas = weights.metas(torch.bfloat16)
    assert metas[0] == wire_meta(weights.names[0], weights.shapes[0], torch.float32, torch.bfloat16)
    assert all(m.dtype == dtype_name(torch.bfloat16) for m in metas)
    pulled = list(weights)
    assert all(torch.equal(a, b) for a, b in zip(pulled, (p for _, p in model.named_parameters())))
    weights.drain()  # nothing left to gather


def test_a_refused_join_fails_at_once_and_leaves_no_thread_in_gloo():
    """open_sender builds the gloo group only once a worker has begun to join, so a refusal (a 409, a wrong
    world size) surfaces at once, and nothing waits in gloo until its timeout (one still waiting at exit
    aborts the process)."""
    import threading
    import time

    from fastgrpo.net import free_port
    from fastgrpo.transfer import WeightTransferError, open_sender
    from fastgrpo.transfer.gloo import GlooSender

    def refused():
        time.sleep(0.2)
        raise RuntimeError("server error 409: another trainer owns this server's weight-transfer group")

    sender = GlooSender()
    began = time.perf_counter()
    with pytest.raises(WeightTransferError, match="it answered server error 409"):
        open_sender(sender, refused, "127.0.0.1", free_port(), 2, timeout_s=60)
    assert time.perf_counter() - began < 5  # not the 60 s rendezvous timeout
    assert sender.group is None and sender.store is None
    time.sleep(0.1)
    assert [t.name for t in threading.enumerate() if t.name.startswith("weights-")] == []


# --- one gloo device per process (fastgrpo.quiet_gloo) --------------------------------------------------


@pytest.mark.parametrize("shared", ["1", "0"])
def test_gloo_groups_share_one_device_and_its_polling_thread_where_asked(shared):
    """Each gloo device polls its sockets every 10 ms in a thread of its own; torch makes one per group."""
    script, port = Path(__file__).parent / "scripts" / "gloo_groups.py", free_port()
    env = {**os.environ, "FASTGRPO_SHARED_GLOO_DEVICE": shared}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(port)], stdout=subprocess.PIPE, env=env,
                              text=True) for rank in (0, 1)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # (1 + 2) doubled by each of the 3 later all-reduces: the groups really communicate.
    assert all(o["value"] == [24.0, 24.0, 24.0] for o in outs)
    assert all(o["loops"] == (1 if shared == "1" else 5) for o in outs)  # the world's group and 4 more


class _PartSender:
    """A backend whose workers read the tensors themselves (CUDA IPC's and shm's shape, in plain memory): each
    part packed into one reused buffer, as theirs are."""

    backend, handles_in_update, bucket_bytes = "handles", True, 4096

    def __init__(self, events):
        self.events, self.buffer = events, None

    def share(self, parts, metas, tensors):
        self.buffer = torch.empty(part_capacity(metas, self.bucket_bytes), dtype=torch.uint8)
        tensors = iter(tensors)
        for k, part in enumerate(parts):
            pack_part(part, metas, tensors, self.buffer)
            self.events.append(f"share {k}")
            yield {"handle": id(self.buffer)}

    def release(self):
        self.events.append("release")
        self.buffer = None

    def close(self):
        self.events.append("close")


class _RecordingControl:
    """Loads each part from the sender's buffer, as a worker would."""

    def __init__(self, events, sender, fail_at=None):
        self.events, self.sender, self.fail_at, self.loaded, self.parts = events, sender, fail_at, {}, 0

    def start(self, info):
        self.events.append("start")

    def receive_part(self, info, part, last):
        k, self.parts = self.parts, self.parts + 1
        self.events.append(f"receive {k}")
        if k == self.fail_at:
            raise RuntimeError("the worker could not map the buffer")
        offset = 0
        for name, dtype, shape, size in zip(info["names"], info["dtype_names"], info["shapes"], info["tensor_sizes"],
                                            strict=True):
            piece = self.sender.buffer[offset:offset + size].view(getattr(torch, dtype)).view(shape)
            self.loaded[name] = piece.clone()
            offset += size
        return {"weight_version": 1} if last else {"tensors_loaded": part.stop}

    def finish(self):
        self.events.append("finish")

    def abort(self):
        self.events.append("abort")


def test_a_push_in_parts_packs_each_part_only_after_the_workers_loaded_the_last_and_releases_after_finish():
    from fastgrpo.transfer import push_weights

    # 4096-byte bucket, but d (1500 floats, 6000 B) is larger, so the buffer holds 6000 B: parts [a] (4000 B, b does
    # not fit beside it), [b, c] (4800 B), [d], [e].
    tensors = {"a": torch.arange(1000.0), "b": torch.arange(600.0) + 0.5, "c": torch.arange(600.0) - 0.5,
               "d": torch.arange(1500.0).reshape(30, 50), "e": torch.ones(10)}
    metas = [wire_meta(n, t.shape, t.dtype, torch.float32) for n, t in tensors.items()]
    events = []
    sender = _PartSender(events)
    control = _RecordingControl(events, sender)
    assert push_weights(control, sender, metas, iter(tensors.values()), 5) == {"weight_version": 1}
    # The buffer is reused: each part is packed only once the one before it was loaded, and kept until the finish.
    assert events == ["start", "share 0", "receive 0", "share 1", "receive 1", "share 2", "receive 2", "share 3",
                      "receive 3", "finish", "release"]
    assert control.loaded.keys() == tensors.keys()
    assert all(torch.equal(control.loaded[n], t) for n, t in tensors.items())

    events.clear()
    control = _RecordingControl(events, sender, fail_at=1)
    with pytest.raises(WeightTransferError, match="part 2 of 4 of the push failed .*could not map.* loaded 1 of 5"):
        push_weights(control, sender, metas, iter(tensors.values()), 5)
    assert events == ["start", "share 0", "receive 0", "share 1", "receive 1", "release", "abort"]


def test_parts_fit_the_bucket_or_the_largest_tensor_and_never_split_one():
    def metas(*specs):
        return [TensorMeta(f"t{i}", dtype, (n,)) for i, (dtype, n) in enumerate(specs)]

    bucket = 4096
    # Exactly full, then one element over: a new part.
    assert [p.sizes for p in plan_parts(metas(("float32", 512), ("float32", 512)), bucket)] == [(2048, 2048)]
    assert [p.sizes for p in plan_parts(metas(("float32", 512), ("float32", 513)), bucket)] == [(2048,), (2052,)]
    # A tensor larger than the bucket sets the capacity; smaller ones fill parts up to it.
    big = metas(("float32", 100), ("float32", 3000), ("float32", 100), ("float32", 2900))
    assert part_capacity(big, bucket) == 12000 and part_capacity(big, 1 << 30) == 24400  # never past the push
    assert part_capacity(metas(("float32", 0)), bucket) == 1
    assert [(p.first, p.sizes) for p in plan_parts(big, bucket)] == [(0, (400,)), (1, (12000,)), (2, (400, 11600))]
    # A float32 at an offset of 2 mod 4 (after 3 bfloat16s) starts a new part, so each dtype view is aligned.
    mixed = metas(("bfloat16", 3), ("float32", 4), ("bfloat16", 2), ("bfloat16", 1))
    assert [p.sizes for p in plan_parts(mixed, bucket)] == [(6,), (16, 4, 2)]
    # An empty tensor needs no alignment: it never ends a part by itself.
    assert [p.sizes for p in plan_parts(metas(("bfloat16", 3), ("float32", 0)), bucket)] == [(6, 0)]
    # Empty tensors travel in a part too (their loader must still see them); every tensor once, in order.
    many = metas(("float32", 0), *[("float32", 300)] * 40, ("int64", 7))
    parts = plan_parts(many, bucket)
    assert [i for p in parts for i in range(p.first, p.stop)] == list(range(len(many)))
    assert all(sum(p.sizes) <= bucket for p in parts) and len(parts) == 14
    assert plan_parts([], bucket) == []


# --- NCCL has no timeout of its own: ours bound it. NCCL needs GPUs, so these stand a blocking fake in for its
# init and its broadcast (the only parts mocked); the code around them is the real one.

def blocking_nccl(monkeypatch):
    """Replace NCCL's init and broadcast with calls that block until the communicator is aborted."""
    import fastgrpo.transfer.nccl as nccl

    aborted = threading.Event()

    class Communicator:
        def destroy(self):  # vLLM's destroy: ncclCommAbort
            aborted.set()

    def init(info):
        aborted.wait()
        raise RuntimeError("NCCL error: the init was aborted")

    def broadcast(**kwargs):
        for _ in kwargs["iterator"]:
            pass
        aborted.wait()
        raise RuntimeError("NCCL error: remote process exited or there was a network error")

    monkeypatch.setattr(nccl, "trainer_init", init)
    monkeypatch.setattr(nccl, "packed_nccl_broadcast_producer", broadcast)
    return nccl, Communicator, aborted


def test_an_nccl_group_the_server_refuses_fails_at_once(monkeypatch):
    from fastgrpo.transfer.push import open_sender

    nccl, _, _ = blocking_nccl(monkeypatch)

    def refuse():  # the server's answer takes a round trip: NCCL's init has begun by then
        time.sleep(0.2)
        raise RuntimeError("409: another trainer owns this server's weight-transfer group")

    began = time.monotonic()
    with pytest.raises(WeightTransferError, match="did not join.*409: another trainer"):
        open_sender(nccl.NcclSender(), refuse, "127.0.0.1", 1, 2, timeout_s=60)
    assert time.monotonic() - began < 5  # not the 60 s timeout, and not for ever


def test_an_nccl_group_nobody_joins_fails_after_its_timeout(monkeypatch):
    from fastgrpo.transfer.push import open_sender

    nccl, _, _ = blocking_nccl(monkeypatch)
    joined = threading.Event()
    began = time.monotonic()
    with pytest.raises(WeightTransferError, match="did not join .* within 1 s.*left waiting"):
        open_sender(nccl.NcclSender(), lambda: joined.wait(30), "127.0.0.1", 1, 2, timeout_s=1)
    assert time.monotonic() - began < 5


def test_a_stuck_nccl_broadcast_is_aborted_after_the_push_timeout(monkeypatch):
    nccl, Communicator, aborted = blocking_nccl(monkeypatch)
    sender = nccl.NcclSender()
    sender.group, sender.timeout_s = Communicator(), 1.0
    metas = [TensorMeta("w", "float32", (2, 2))]
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="did not complete within 1 s.*communicator was aborted"):
        sender.send(metas, iter([torch.ones(2, 2)]))
    assert aborted.is_set() and sender.group is None and time.monotonic() - began < 5
