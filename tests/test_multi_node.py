"""Two "nodes" on one machine: a head (HTTP, DP rank 0) and a headless node (DP rank 1) over loopback.

This is how `fastgrpo vllm-serve` spans machines (docs/multi-node.md): the head runs with
`--data-parallel-size 2 --data-parallel-size-local 1 --data-parallel-address A --data-parallel-rpc-port P`,
the other node with `--headless --data-parallel-start-rank 1` and the same address and port. Each
"node" has its own core. The remote rank's workers join the trainer's weight group themselves (gloo
here, rank 1 + dp_rank x TP), so a push must be exact there: its prompt logprobs are compared with a
transformers float32 forward of the pushed weights, as in test_weight_sync.py (tolerance: see there).
"""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo.client import ServerError, VLLMClient
from fastgrpo.hardware import usable_cores
from fastgrpo.net import free_port
from fastgrpo.serve.launcher import ServerProcess
from generating import LongGeneration
from test_weight_sync import LOGPROB_TOL, PROBE, SMALL_BUCKET, gap, hf_logprobs, perturbed, server_logprobs_by_rank

pytestmark = pytest.mark.slow

# How long the head lets a rank stay silent before it declares it dead (the default, 120 s, suits real models).
RANK_TIMEOUT_S = 10


def node_flags(model: str, port: int) -> list[str]:
    return ["--model", model, "--data-parallel-size", "2", "--data-parallel-size-local", "1",
            "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(port), "--dtype", "float32",
            "--max-model-len", "256", "--kv-cache-space", "1"]


def one_core_each() -> tuple[list[int], list[int]]:
    cores = usable_cores()
    return cores[:1], cores[1:2] or cores[:1]


@pytest.fixture(scope="module")
def nodes(tiny_qwen2, tmp_path_factory):
    port = free_port()
    head_cores, node_cores = one_core_each()
    logs = tmp_path_factory.mktemp("nodes")
    head = ServerProcess([*node_flags(tiny_qwen2, port), "--rank-timeout", str(RANK_TIMEOUT_S)],
                         logs / "head.log", cpu_cores=head_cores)
    node = ServerProcess([*node_flags(tiny_qwen2, port), "--headless", "--data-parallel-start-rank", "1"],
                         logs / "node.log", cpu_cores=node_cores)
    try:
        head.wait_ready()
        yield head, node
    finally:
        node.stop()
        head.stop()


@pytest.fixture(scope="module")
def probe_ids(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)(PROBE)["input_ids"]


def test_the_head_lists_the_remote_rank_and_counts_its_workers(nodes):
    head, _ = nodes
    health = httpx.get(head.base_url + "/health", timeout=10).json()
    assert health["status"] == "ok"
    assert [(r["rank"], r["node"], r["state"]) for r in health["dp_ranks"]] == [(0, "local", "ready"),
                                                                               (1, "remote", "ready")]
    assert health["weight_transfer_ranks"] == 2  # the remote rank's worker is in the trainer's group


def test_a_push_is_exact_on_the_remote_rank_at_every_bucket_size(nodes, tiny_qwen2, probe_ids):
    head, _ = nodes
    original = hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_qwen2), probe_ids)
    for seed, bucket_bytes in [(21, SMALL_BUCKET), (22, 1 << 30)]:
        model = perturbed(tiny_qwen2, seed=seed)
        expected = hf_logprobs(model, probe_ids)
        assert gap(expected, original) > 0.1
        with VLLMClient(base_url=head.base_url, bucket_bytes=bucket_bytes, weight_transfer_timeout=30) as client:
            client.update_weights(model)
            by_rank = server_logprobs_by_rank(client, probe_ids)
        assert set(by_rank) == {0, 1}
        for rank, logprobs in by_rank.items():
            assert gap(logprobs, expected) < LOGPROB_TOL, (bucket_bytes, rank)


def test_a_remote_node_killed_mid_generation_fails_it_in_bounded_time_naming_the_rank(nodes):
    """Last: it kills the headless node."""
    head, node = nodes
    thread = LongGeneration(head.base_url, max_tokens=240)
    thread.start()
    os.killpg(node.proc.pid, signal.SIGKILL)  # the whole node: its process, engine core and worker
    killed = time.monotonic()
    thread.join(RANK_TIMEOUT_S + 30)
    waited = time.monotonic() - killed
    assert not thread.is_alive(), "the generation hung after the remote node died"
    response = thread.response
    assert response.status_code == 503, response.text[:300]
    body = response.json()
    assert body["type"] == "engine_dead" and "DP rank 1" in body["error"] and "headless node" in body["error"]
    assert waited < RANK_TIMEOUT_S + 15  # the silence timeout and one heartbeat period, not vLLM's forever

    health = httpx.get(head.base_url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "DP rank 1" in health.json()["dp_ranks"][1]["error"]
    assert health.json()["dp_ranks"][0]["state"] == "stopped"  # vLLM's DP client is one engine: it stops too
    began = time.monotonic()
    after = httpx.post(head.base_url + "/generate", json={"prompts": ["after"], "max_tokens": 2}, timeout=10)
    assert after.status_code == 503 and "DP rank 1" in after.json()["error"]
    with pytest.raises(ServerError, match="DP rank 1"):  # a trainer (re)starting now is told at once
        VLLMClient(base_url=head.base_url, timeout=10)
    assert time.monotonic() - began < 5


def test_a_node_that_never_joins_fails_the_start_naming_the_ranks(tiny_qwen2, tmp_path):
    join_timeout = 30  # the head's own rank starts in about 20 s here; the check comes after that
    command = [sys.executable, "-m", "fastgrpo.cli", "vllm-serve", "--port", str(free_port()),
               *node_flags(tiny_qwen2, free_port()), "--join-timeout", str(join_timeout)]
    began = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=join_timeout + 120,
                            start_new_session=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "DP rank(s) [1] did not join within 30 s" in output and "--headless" in output, output[-2000:]
    assert time.monotonic() - began < join_timeout + 60
