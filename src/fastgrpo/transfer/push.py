"""The one send path: open a group, and push weights through it.

Every caller (fastgrpo's `VLLMClient` for the server, the colocate backend, the
gloo trainer engine for a plain `vllm serve`) differs only in its control plane,
a `WeightControl`: how the workers are told to join, to expect a push, to receive
it and to finish it. The data plane is a `WeightSender` (base.py).
"""

import threading
import time
from collections.abc import Callable, Iterator

import torch

from fastgrpo.transfer.base import WeightSender
from fastgrpo.transfer.packing import Part, TensorMeta, plan_parts, update_info


# What a generator runs after a failed push. vLLM ends a worker's update session when `update_weights`
# fails, but its layerwise reload keeps the layers that got part of their tensors on the meta device,
# waiting for the rest: the next push would complete them with a mix of both pushes, or fail outright
# ("'Parameter' object has no attribute 'weight_loader'", seen here). A new session finished at once
# materializes them (layers that got nothing get their previous tensors back) and resets that state.
# `start` fails where a session is still open; `finish` then ends it.
RELOAD_CLEANUP_STEPS = ("start_weight_update", "finish_weight_update")


class WeightTransferError(RuntimeError):
    """A weight push or a group rendezvous failed; the message says which side and what to check."""


class Background:
    """Run a blocking call on a daemon thread beside a collective (never joined if it hangs)."""

    def __init__(self, fn: Callable, *args, **kwargs):
        self.value, self.error, self.done = None, None, threading.Event()

        def run():
            try:
                self.value = fn(*args, **kwargs)
            except BaseException as exc:  # surfaced by result()
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True, name=f"weights-{getattr(fn, '__name__', 'call')}").start()

    def result(self, timeout: float):
        if not self.done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.value

    def said(self) -> str:
        """What the call raised, if it already failed (for error messages)."""
        return f" The other side said: {self.error}" if self.done.is_set() and self.error is not None else ""


class WeightControl:
    """The generator's control plane for one push. `receive` runs on a thread while the sender sends."""

    def start(self, info: dict) -> None:
        """Announce the push (names, dtypes, shapes); may refuse it before any byte moves."""

    def receive(self, info: dict):
        """Block until every worker has received and loaded the push; returns the generator's answer."""
        raise NotImplementedError

    def receive_part(self, info: dict, part: Part, last: bool):
        """A push in parts (a sharing backend): block until every worker has loaded this part, whose update
        info (vLLM's: its tensors' names, dtypes, shapes and sizes, and the buffer's handle) is `info`. Returns
        the generator's answer; the last part's is the push's."""
        raise NotImplementedError

    def finish(self) -> None:
        """After a successful receive."""

    def abort(self) -> None:
        """After a failed push (best effort): leave the generator loadable again."""


class VllmClientControl(WeightControl):
    """vLLM's own control plane (`VLLMWeightSyncClient`: HTTP routes of `vllm serve`, Ray actors)."""

    def __init__(self, client):
        self.client = client

    def start(self, info):
        self.client.start_weight_update()

    def receive(self, info):
        return self.client.update_weights(info)

    def finish(self):
        self.client.finish_weight_update()


def open_sender(sender: WeightSender, join: Callable[[], object], master_address: str, master_port: int,
                world_size: int, timeout_s: float, peer: str = "the inference workers"):
    """Host the group as rank 0 while `join()` asks the workers to join it; returns what `join()` returned.

    The rendezvous starts listening first; the group itself is built (which blocks until every worker has
    joined) only once a worker has begun to join. So a join the generator refuses (a wrong world size, a
    group owned by another trainer, an address it cannot reach) fails here at once, and no thread is left
    waiting inside the collective library (one still waiting there when the process exits aborts it).
    """
    sender.listen(master_address, master_port, world_size, timeout_s)
    joined = Background(join)
    if not sender.tells_arrivals:
        return _open_beside_join(sender, joined, master_address, master_port, world_size, timeout_s, peer)
    deadline = time.monotonic() + timeout_s
    while not joined.done.is_set() and not sender.peers_arrived() and time.monotonic() < deadline:
        joined.done.wait(0.02)
    if joined.error is not None:
        sender.close()
        raise WeightTransferError(f"{peer} did not join the weight-transfer group at {master_address}:"
                                  f"{master_port}: it answered {joined.error}") from joined.error
    try:
        sender.open(master_address, master_port, world_size, timeout_s)
    except Exception as exc:
        sender.close()
        raise WeightTransferError(
            f"{peer} ({world_size - 1} workers) did not join the weight-transfer group at {master_address}:"
            f"{master_port} within {timeout_s:.0f} s ({exc}).{joined.said()} Check that they can reach this "
            f"machine at {master_address} (firewall), and that both sides run the same torch version."
        ) from exc
    try:
        return joined.result(timeout_s + 30)
    except Exception as exc:
        sender.close()
        raise WeightTransferError(f"{peer} failed to join the weight-transfer group: {exc}") from exc


def _open_beside_join(sender: WeightSender, joined: Background, master_address: str, master_port: int,
                      world_size: int, timeout_s: float, peer: str):
    """open_sender for a backend whose open waits for ever and cannot tell who is coming (NCCL): the open runs
    on a thread beside the join, and a refused join, a failed open or the timeout ends the wait at once. An
    init left waiting is abandoned on its thread (NCCL cannot cancel one); the error says so."""
    opening = Background(sender.open, master_address, master_port, world_size, timeout_s)
    deadline = time.monotonic() + timeout_s
    while not opening.done.is_set() and joined.error is None and time.monotonic() < deadline:
        opening.done.wait(0.02)
    where = f"the weight-transfer group at {master_address}:{master_port}"
    if joined.error is not None:
        sender.close()
        raise WeightTransferError(f"{peer} did not join {where}: it answered {joined.error}") from joined.error
    if not opening.done.is_set():
        sender.close()
        raise WeightTransferError(
            f"{peer} ({world_size - 1} workers) did not join {where} within {timeout_s:.0f} s.{joined.said()} "
            f"Check that they can reach this machine at {master_address} (firewall). NCCL cannot cancel its "
            "init: it is left waiting on a thread of its own.")
    try:
        opening.result(0)
        return joined.result(timeout_s + 30)
    except Exception as exc:
        sender.close()
        raise WeightTransferError(f"{peer} failed to join {where}: {exc}") from exc


def push_weights(control: WeightControl, sender: WeightSender, metas: list[TensorMeta],
                 tensors: Iterator[torch.Tensor], timeout_s: float):
    """Announce, send and confirm one push. Returns what `control.receive` returned.

    On failure the sender's group is closed (the caller reopens it for the next push) and
    `control.abort()` runs, and the error says which side failed.
    """
    info = update_info(metas)
    control.start(info)
    if sender.handles_in_update:  # the update requests carry handles to the tensors; nothing is broadcast
        return _push_in_parts(control, sender, metas, tensors, info)
    received = Background(control.receive, info)
    try:
        try:
            sender.send(metas, tensors)
        except Exception as exc:
            raise WeightTransferError(f"sending the weights failed ({type(exc).__name__}: {exc}).{received.said()} "
                                      "The group is closed; the next push reopens it.") from exc
        try:
            result = received.result(timeout_s + 30)
        except TimeoutError as exc:
            raise WeightTransferError(f"the weights were sent but the generator did not confirm loading them "
                                      f"within {timeout_s + 30:.0f} s; check its log") from exc
    except BaseException:
        sender.close()
        control.abort()
        raise
    try:
        control.finish()
    finally:
        sender.release()  # only now: vLLM's layerwise reload may read shared tensors until the finish
    return result


def _push_in_parts(control: WeightControl, sender: WeightSender, metas: list[TensorMeta],
                   tensors: Iterator[torch.Tensor], info: dict):
    """A push through a sharing backend: each part packed into the sender's buffer, then loaded by the workers,
    before the next overwrites it. Returns the last part's answer."""
    parts = plan_parts(metas, sender.bucket_bytes)
    loaded, result = 0, None
    try:
        for part, fields in zip(parts, sender.share(parts, metas, tensors), strict=True):
            part_info = {key: values[part.first:part.stop] for key, values in info.items()}
            result = control.receive_part({**part_info, "tensor_sizes": list(part.sizes), **fields}, part,
                                          last=part is parts[-1])
            loaded += 1
    except BaseException as exc:
        sender.release()
        control.abort()
        if not isinstance(exc, Exception):
            raise
        if loaded == 0:
            raise WeightTransferError(f"the first part of the push failed ({type(exc).__name__}: {exc}) before "
                                      "the generator loaded any tensor; the next push starts afresh") from exc
        raise WeightTransferError(f"part {loaded + 1} of {len(parts)} of the push failed ({type(exc).__name__}: "
                                  f"{exc}) after the generator loaded {parts[loaded].first} of {len(metas)} "
                                  "tensors: it refuses to generate until a whole push lands; push again") from exc
    try:
        control.finish()
    finally:
        sender.release()
    return result
