"""Pushes in parts: CUDA IPC's protocol, run here through shm, its CPU twin, on real vLLM (DP=2, float32).

A push whose workers read the trainer's memory goes in parts packed into one reused buffer: a bucket,
or the largest tensor where that is larger, never a copy of the model. The tiny model's largest tensor
(the embedding) is 196 kB in float32 and the whole model 1.4 MB, so a 48 KiB bucket cuts it into 9
parts and a 1 GiB one pushes it in one. Logprobs after a push must equal transformers' within
LOGPROB_TOL (test_weight_sync.py says why that tolerance). A part that is wrong, late or missing fails
the whole push, and the server refuses to generate until a whole push lands.

What cannot run here is CUDA's own handle (tests/test_gpu.py runs the same protocol over it on a GPU).
"""

import glob
import os
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from test_weight_sync import (
    LOGPROB_TOL,
    PROBE,
    SMALL_BUCKET,
    FailingWeights,
    gap,
    hf_logprobs,
    perturbed,
    server_logprobs_by_rank,
    shuffled,
)

from fastgrpo.client import ServerError, VLLMClient, _ServerControl
from fastgrpo.transfer import NamedWeights, WeightTransferError, push_weights
from fastgrpo.transfer.packing import part_capacity, plan_parts
from fastgrpo.transfer.shm import SHM_DIR

pytestmark = pytest.mark.slow

SHM_FILES = os.path.join(SHM_DIR, "fastgrpo-weights-*")


@pytest.fixture(scope="module")
def server(server_factory, tiny_qwen2):
    return server_factory(["--model", tiny_qwen2, "--data-parallel-size", "2", "--dtype", "float32",
                           "--max-model-len", "256", "--kv-cache-space", "1", "--weight-transfer-backend", "shm"])


@pytest.fixture(scope="module")
def probe_ids(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)(PROBE)["input_ids"]


class CountingControl(_ServerControl):
    """The client's own control, counting the parts it sends."""

    parts = 0

    def receive_part(self, info, part, last):
        self.parts += 1
        return super().receive_part(info, part, last)


class ShmWatch:
    """Polls /dev/shm during a push: the most bytes its files held at once."""

    def __init__(self):
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            sizes = []
            for path in glob.glob(SHM_FILES):
                try:
                    sizes.append(os.path.getsize(path))
                except FileNotFoundError:
                    pass  # released between glob and stat
            self.peak = max(self.peak, sum(sizes))
            time.sleep(0.001)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def test_a_push_in_parts_is_exact_and_holds_one_buffer_at_any_part_size(server, tiny_qwen2, probe_ids):
    model = perturbed(tiny_qwen2, seed=11)
    expected = hf_logprobs(model, probe_ids)
    metas = NamedWeights(list(model.named_parameters())).metas(torch.float32)
    model_bytes = sum(m.nbytes for m in metas)
    assert glob.glob(SHM_FILES) == []
    seen = {}
    # Below the largest tensor every bucket gives its plan (one part per 196 kB); 1 MiB cuts 2 parts, 1 GiB one.
    for bucket_bytes, order in [(SMALL_BUCKET, "shuffled"), (1 << 20, "model"), (1 << 30, "model")]:
        with VLLMClient(base_url=server.base_url, bucket_bytes=bucket_bytes, weight_transfer_timeout=30) as client:
            assert client.health()["weight_transfer_backend"] == "shm"
            client.update_weights({"model.norm.weight": model.model.norm.weight.detach()})  # opens the group
            weights = NamedWeights(shuffled(model, seed=bucket_bytes) if order == "shuffled"
                                   else list(model.named_parameters()))
            control, watch = CountingControl(client, None), ShmWatch()
            push_weights(control, client.sender, weights.metas(torch.float32), iter(weights), 30)
            peak = watch.stop()
            planned = plan_parts(weights.metas(torch.float32), bucket_bytes)
            assert control.parts == len(planned) == {SMALL_BUCKET: len(planned), 1 << 20: 2, 1 << 30: 1}[bucket_bytes]
            # One buffer: a bucket, or the largest tensor (here the embedding, 196 kB), not the model (1.4 MB).
            capacity = part_capacity(metas, bucket_bytes)
            assert 0 < peak <= min(capacity, model_bytes), (peak, capacity)
            if bucket_bytes == SMALL_BUCKET:
                assert len(planned) > 5 and peak < model_bytes / 5, (len(planned), peak, model_bytes)
            assert glob.glob(SHM_FILES) == []  # the file lives for one push
            for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
                assert gap(logprobs, expected) < LOGPROB_TOL, (bucket_bytes, rank)
                seen.setdefault(rank, []).append(logprobs)
            assert client.health()["weight_version"] >= 2
    for rank, runs in seen.items():  # the same weights in any parts: the same engine, to the last bit
        assert all(run == runs[0] for run in runs), rank


def test_a_push_that_breaks_between_parts_is_refused_until_a_whole_one_lands(server, tiny_qwen2, probe_ids):
    good, broken = perturbed(tiny_qwen2, seed=12), perturbed(tiny_qwen2, seed=13)
    named = shuffled(broken, seed=1)
    with VLLMClient(base_url=server.base_url, bucket_bytes=SMALL_BUCKET, weight_transfer_timeout=10) as client:
        client.update_weights(good)
        with pytest.raises(WeightTransferError, match=r"part \d+ of \d+ of the push failed .*broke half-way"):
            client.update_weights(FailingWeights(named, len(named) // 2))
        # The trainer closed its group as it failed, so the server ended the push at once (not after its timeout).
        health = client.health()
        assert health["weights_consistent"] is False and health["weight_push"] == "none"
        assert "the trainer closed its group after" in health["last_push_error"]
        refused = httpx.post(server.base_url + "/generate", json={"prompts": ["x"], "max_tokens": 2}, timeout=60)
        assert refused.status_code == 503 and refused.json()["type"] == "weights_inconsistent"
        assert glob.glob(SHM_FILES) == []
        client.update_weights(shuffled(good, seed=2))
        expected = hf_logprobs(good, probe_ids)
        for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
            assert gap(logprobs, expected) < LOGPROB_TOL, rank
        assert client.health()["status"] == "ok"


def _announced(client, metas) -> str:
    return client._request("POST", "/weights/start", json={
        "names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
        "shapes": [list(m.shape) for m in metas], "group_id": client.group_id, "timeout_s": 3})["transfer_id"]


def _part(transfer_id, part, last, **fields):
    return {"transfer_id": transfer_id, "part": {"first": part.first, "tensor_sizes": list(part.sizes), "last": last,
                                                 **fields}}


def test_bad_parts_get_400s_naming_the_problem_and_a_trainer_that_stops_between_parts_fails_its_push(
        server, tiny_qwen2, probe_ids):
    good = perturbed(tiny_qwen2, seed=14)
    weights = NamedWeights(list(good.named_parameters()))
    metas = weights.metas(torch.float32)
    parts = plan_parts(metas, SMALL_BUCKET)
    url = server.base_url + "/weights/update"
    with VLLMClient(base_url=server.base_url, bucket_bytes=SMALL_BUCKET, weight_transfer_timeout=10) as client:
        client.update_weights(good)
        name = "fastgrpo-weights-" + "0" * 32

        # Refused before anything loads: the push is still announced, the weights whole.
        tid = _announced(client, metas)
        for body, says in [
            ({"transfer_id": tid}, "come in parts: send `part`"),
            (_part(tid, parts[0], False), "carries `shm_name` and no other handle; this one has none"),
            (_part(tid, parts[0], False, shm_name="../../etc/passwd"), "is not a push's file"),
            (_part(tid, parts[0], False, shm_name=name, ipc_handles_pickled="x"), "no other handle"),
            (_part(tid, parts[0], True, shm_name=name), "the last part, and only it, ends there"),
            ({"transfer_id": tid, "part": {"first": 0, "tensor_sizes": [4] + list(parts[0].sizes[1:]), "last": False,
                                           "shm_name": name}}, "tensor_sizes says 4 bytes for"),
        ]:
            answer = httpx.post(url, json=body, timeout=30)
            assert answer.status_code == 400 and says in answer.json()["error"], (says, answer.text)
        assert httpx.post(url, json=_part(tid, parts[1], False, shm_name=name), timeout=30).status_code == 409
        health = client.health()
        assert health["weight_push"] == "announced" and health["weights_consistent"] is True

        # A part out of order once parts have loaded: the push fails (it cannot end whole).
        sender = client.sender
        shared = sender.share(parts, metas, iter(weights))
        first = next(shared)
        assert httpx.post(url, json=_part(tid, parts[0], False, **first), timeout=30).json() == {
            "tensors_loaded": parts[0].stop, "tensors": len(metas)}
        answer = httpx.post(url, json=_part(tid, parts[2], False, **first), timeout=30)
        assert answer.status_code == 400 and "parts come in order" in answer.json()["error"]
        sender.release()
        health = client.health()
        assert health["weights_consistent"] is False and "parts come in order" in health["last_push_error"]
        client.close_weight_transfer()

        # A trainer that stops between parts: the push fails once its timeout (3 s) passes without a part.
        client.update_weights(good)
        tid = _announced(client, metas)
        shared = client.sender.share(parts, metas, iter(weights))
        httpx.post(url, json=_part(tid, parts[0], False, **next(shared)), timeout=30).raise_for_status()
        began = time.monotonic()
        while client.health()["weight_push"] != "none":
            assert time.monotonic() - began < 30, "the abandoned push was never failed"
            time.sleep(0.2)
        client.sender.release()
        health = client.health()
        assert health["weights_consistent"] is False and "did not arrive within 3 s" in health["last_push_error"]
        with pytest.raises(ServerError, match="group"):  # its group was closed with it
            client._request("POST", "/weights/start", json={"names": ["x"], "dtype_names": ["float32"],
                                                            "shapes": [[1]], "group_id": client.group_id})
        client.close_weight_transfer()
        client.update_weights(good)  # the next push reopens the group and restores the weights
        expected = hf_logprobs(good, probe_ids)
        for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
            assert gap(logprobs, expected) < LOGPROB_TOL, rank


def test_grpo_trainer_in_server_mode_pushes_in_parts_and_the_server_keeps_its_weights(server, tiny_qwen2,
                                                                                        tmp_path, probe_ids):
    from test_trainer import PROBE_TOL, ProbeCallback, base_config, reward_digits, reward_length, tiny_dataset

    from fastgrpo import GRPOTrainer

    port = int(server.base_url.rsplit(":", 1)[1])
    config = base_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_port=port, max_steps=2,
                         vllm_server_host="127.0.0.1", vllm_weight_sync_bucket_mb=SMALL_BUCKET / 2**20)
    trainer = GRPOTrainer(tiny_qwen2, [reward_digits, reward_length], args=config, train_dataset=tiny_dataset())
    observer = VLLMClient(base_url=server.base_url)

    def server_logprobs(ids):
        answer = observer.generate(prompt_token_ids=[ids], max_tokens=1, prompt_logprobs=True)
        return answer.results[0].prompt_logprobs[1:]

    probe = ProbeCallback(trainer, probe_ids, server_logprobs)
    trainer.add_callback(probe)  # after the weight-sync callback: sees the pushed weights
    trainer.train()
    assert trainer.backend.client.sender.backend == "shm"
    trainer.close()
    assert trainer.state.global_step == 2 and observer.health()["weight_version"] == 2
    assert len(probe.gaps) == 2 and max(probe.gaps) < PROBE_TOL, probe.gaps
    assert min(probe.changes) > 1e-4  # the model really moved
    observer.close()
