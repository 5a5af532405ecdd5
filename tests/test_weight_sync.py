"""Weight sync is exact at every bucket size, in every order, on every DP rank, and after every failure;
a push lands while generations run, which go on under the new weights.

The tiny model's decoder layer is 590 kB in float32 and its largest tensor (the embedding) 196 kB, so
the 48 KiB buckets used here cut every layer into about a dozen buckets and split tensors across them.
The server runs float32 with DP=2, so after a push its prompt logprobs must equal a transformers float32
forward of the same weights up to kernel rounding: measured here at about 1e-6 nats; LOGPROB_TOL
leaves room for other CPUs' kernels. A single wrong tensor moves them by 0.1 to several nats.
"""

import random
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo.client import ServerError, VLLMClient
from fastgrpo.transfer import ModelWeights, NamedWeights, WeightTransferError

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-4
SMALL_BUCKET = 48 << 10
PROBE = "What is 12 + 35? The answer is 47."


@pytest.fixture(scope="module")
def server(server_factory, tiny_qwen2):
    return server_factory(["--model", tiny_qwen2, "--data-parallel-size", "2", "--dtype", "float32",
                           "--max-model-len", "256", "--kv-cache-space", "1"])


@pytest.fixture(scope="module")
def probe_ids(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)(PROBE)["input_ids"]


def perturbed(path: str, seed: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def hf_logprobs(model, ids) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def server_logprobs_by_rank(client, ids) -> dict[int, list[float]]:
    """The probe's prompt logprobs from every DP rank (a batch of copies spreads over both)."""
    response = client.generate(prompt_token_ids=[ids] * 4, max_tokens=1, prompt_logprobs=True)
    by_rank = {r.completions[0].dp_rank: r.prompt_logprobs[1:] for r in response.results}
    assert set(by_rank) == {0, 1}
    return by_rank


def gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def shuffled(model, seed: int) -> list:
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    random.Random(seed).shuffle(named)
    return named


def test_the_test_model_has_layers_and_tensors_larger_than_a_bucket(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    layer = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    largest = max(p.numel() * 4 for p in model.parameters())
    assert layer > 8 * SMALL_BUCKET and largest > 3 * SMALL_BUCKET


def test_push_is_exact_at_every_bucket_size_and_in_any_order(server, tiny_qwen2, probe_ids):
    model = perturbed(tiny_qwen2, seed=1)
    expected = hf_logprobs(model, probe_ids)
    original = hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32), probe_ids)
    assert gap(expected, original) > 0.1  # the perturbation is visible in the probe
    seen = {}
    for bucket_bytes, order in [(SMALL_BUCKET, "shuffled"), (SMALL_BUCKET + 320, "model"), (1 << 30, "model"),
                                (4096, "shuffled")]:
        with VLLMClient(base_url=server.base_url, bucket_bytes=bucket_bytes, weight_transfer_timeout=30) as client:
            client.update_weights(shuffled(model, seed=bucket_bytes) if order == "shuffled" else model)
            for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
                assert gap(logprobs, expected) < LOGPROB_TOL, (bucket_bytes, order, rank)
                seen.setdefault(rank, []).append(logprobs)
    # The same weights through any bucket size give the same engine: the same numbers to the last bit.
    for rank, runs in seen.items():
        assert all(run == runs[0] for run in runs), rank


class FailingWeights(NamedWeights):
    """Yields the first `fail_after` tensors, then breaks, as a trainer that dies mid-push would (once
    `wait_for` is set, if given: the push stays half-way until then)."""

    def __init__(self, pairs, fail_after: int, wait_for: threading.Event | None = None):
        super().__init__(pairs)
        self.fail_after, self.wait_for = fail_after, wait_for

    def __iter__(self):
        for i, tensor in enumerate(super().__iter__()):
            if i == self.fail_after:
                if self.wait_for is not None:
                    self.wait_for.wait(30)
                raise RuntimeError("the trainer broke half-way through the push")
            yield tensor


def generate_in_background(server) -> tuple[threading.Thread, dict]:
    out = {}

    def run():
        out["response"] = httpx.post(server.base_url + "/generate", json={"prompts": ["x"], "max_tokens": 2},
                                     timeout=60)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_push_that_fails_half_way_blocks_generation_until_a_full_push_restores_exactness(
        server, tiny_qwen2, probe_ids):
    from fastgrpo.client import _ServerControl
    from fastgrpo.transfer import push_weights

    good, broken = perturbed(tiny_qwen2, seed=2), perturbed(tiny_qwen2, seed=3)
    named = shuffled(broken, seed=0)
    expected = hf_logprobs(good, probe_ids)
    queued = {"ready": threading.Event()}

    class GenerateQueuedBehindThePush(_ServerControl):
        def receive(self, info):
            def queue_once_loading():
                # An announcement holds nothing; a request waits once the push's data has started to load.
                while httpx.get(server.base_url + "/health", timeout=10).json()["weight_push"] != "loading":
                    time.sleep(0.01)
                queued["thread"], queued["out"] = generate_in_background(server)
                time.sleep(0.5)  # the request is queued behind the loading push
                queued["ready"].set()  # now the trainer breaks

            threading.Thread(target=queue_once_loading, daemon=True).start()
            return super().receive(info)

    with VLLMClient(base_url=server.base_url, bucket_bytes=SMALL_BUCKET, weight_transfer_timeout=10) as client:
        client.update_weights(good)
        weights = FailingWeights(named, len(named) * 2 // 3, wait_for=queued["ready"])
        with pytest.raises(WeightTransferError, match="broke half-way"):
            push_weights(GenerateQueuedBehindThePush(client, None), client.sender, weights.metas(torch.float32),
                         iter(weights), timeout_s=10)
        client.close_weight_transfer()
        queued["thread"].join(60)
        assert queued["out"]["response"].status_code == 503, queued["out"]["response"].text
        assert queued["out"]["response"].json()["type"] == "weights_inconsistent"
        health = client.health()
        assert health["weights_consistent"] is False and health["status"] == "degraded"
        with VLLMClient(base_url=server.base_url, timeout=10) as late:  # a trainer (re)starting now connects
            assert late.info["status"] == "degraded"

        # The next full push, straight after: exact on every DP rank, though layers were left half-loaded.
        client.update_weights(shuffled(good, seed=5))
        for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
            assert gap(logprobs, expected) < LOGPROB_TOL, rank
        assert client.health()["status"] == "ok"

        # Fail again; a partial push does not make the engines whole, the next full one does.
        with pytest.raises(WeightTransferError, match="broke half-way"):
            client.update_weights(FailingWeights(named, len(named) // 3))
        client.update_weights({"model.norm.weight": good.model.norm.weight.detach()})
        refused = httpx.post(server.base_url + "/generate", json={"prompts": ["x"], "max_tokens": 2}, timeout=60)
        assert refused.status_code == 503 and "push the whole model" in refused.json()["error"]
        client.update_weights(good)
        for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
            assert gap(logprobs, expected) < LOGPROB_TOL, rank


def test_a_push_that_fails_before_its_first_byte_is_recovered_by_the_next(server, tiny_qwen2, probe_ids):
    """Announced, then nothing sent: every layer waits for weights that never come; the next push is exact."""
    good = perturbed(tiny_qwen2, seed=4)
    with VLLMClient(base_url=server.base_url, bucket_bytes=SMALL_BUCKET, weight_transfer_timeout=4) as client:
        with pytest.raises(WeightTransferError, match="broke half-way"):
            client.update_weights(FailingWeights(list(good.named_parameters()), 0))
        client.update_weights(good)
        expected = hf_logprobs(good, probe_ids)
        for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
            assert gap(logprobs, expected) < LOGPROB_TOL, rank


# --- colocate mode: the same sender, push and receiver, into an in-process engine ----------------


def test_colocate_push_is_exact_and_recovers_from_a_failed_push(tiny_qwen2, probe_ids):
    from vllm import SamplingParams

    from fastgrpo.trainer.generation import ColocateBackend, Sampling

    backend = ColocateBackend(tiny_qwen2, 0.3, 1, 256, seed=0, bucket_bytes=SMALL_BUCKET, timeout_s=4,
                              dtype="float32")

    def engine_logprobs():
        out = backend.llm.generate([{"prompt_token_ids": probe_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                   use_tqdm=False)[0]
        return [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], probe_ids[1:])]

    try:
        first, second = perturbed(tiny_qwen2, seed=9), perturbed(tiny_qwen2, seed=10)
        backend.sync_weights(NamedWeights(shuffled(first, seed=2)), version=1)
        assert gap(engine_logprobs(), hf_logprobs(first, probe_ids)) < LOGPROB_TOL
        named = shuffled(second, seed=3)
        with pytest.raises(WeightTransferError, match="broke half-way"):
            backend.sync_weights(FailingWeights(named, len(named) // 2), version=2)
        with pytest.raises(RuntimeError, match="failed half-way"):
            backend.generate([probe_ids], Sampling(1, 1.0, 1.0, 0, 0.0, 1.0, 2), seeds=[0])
        backend.sync_weights(ModelWeights(second), version=2)
        assert gap(engine_logprobs(), hf_logprobs(second, probe_ids)) < LOGPROB_TOL
        assert backend.generate([probe_ids], Sampling(1, 1.0, 1.0, 0, 0.0, 1.0, 2), seeds=[0]).weight_version == 2
    finally:
        backend.close()


# --- tensor parallelism: each rank receives the whole stream and loads its shard ---------------------


def test_push_to_two_tensor_parallel_ranks_is_exact(transient_server_factory, tiny_qwen2, probe_ids):
    tp = transient_server_factory(["--model", tiny_qwen2, "--tensor-parallel-size", "2", "--dtype", "float32",
                         "--max-model-len", "256", "--kv-cache-space", "1"])
    with VLLMClient(base_url=tp.base_url, bucket_bytes=SMALL_BUCKET, weight_transfer_timeout=30) as client:
        assert client.info["weight_transfer_ranks"] == 2
        good = perturbed(tiny_qwen2, seed=13)
        client.update_weights(shuffled(good, seed=6))
        response = client.generate(prompt_token_ids=[probe_ids], max_tokens=1, prompt_logprobs=True)
        assert gap(response.results[0].prompt_logprobs[1:], hf_logprobs(good, probe_ids)) < LOGPROB_TOL
    tp.stop()  # an idle server still takes CPU from the tests after it (gloo's polling threads)


# --- checkpoints that are not a local safetensors folder ---------------------------------------------


def _hub_cache(tmp_path, folder: str) -> tuple[str, dict]:
    """`folder` laid out as the hub cache does it, and the environment that makes the hub offline."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fastgrpo--tiny-qwen2"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return "fastgrpo/tiny-qwen2", {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}


def _bin_only(tmp_path, folder: str) -> tuple[str, dict]:
    """The same model with its weights in `pytorch_model.bin` and no safetensors file."""
    import shutil

    target = tmp_path / "bin-only"
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors*"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    return str(target), {}


@pytest.mark.parametrize("layout", [_hub_cache, _bin_only], ids=["hub-cache-by-id", "pytorch-model-bin"])
def test_server_starts_validates_and_syncs_without_a_local_safetensors_file(
        transient_server_factory, tiny_qwen2, probe_ids, tmp_path, layout):
    model, env = layout(tmp_path, tiny_qwen2)
    server = transient_server_factory(["--model", model, "--dtype", "float32", "--max-model-len", "256",
                             "--kv-cache-space", "1"], env=env)
    with VLLMClient(base_url=server.base_url, bucket_bytes=SMALL_BUCKET, weight_transfer_timeout=30) as client:
        with pytest.raises(ServerError) as refused:  # names and shapes are known: a bad push is refused
            client.update_weights({"model.norm.weight": torch.ones(7)})
        assert refused.value.status == 400 and "expects [128]" in refused.value.message
        good = perturbed(tiny_qwen2, seed=11)
        client.update_weights(shuffled(good, seed=4))
        response = client.generate(prompt_token_ids=[probe_ids], max_tokens=1, prompt_logprobs=True)
        assert gap(response.results[0].prompt_logprobs[1:], hf_logprobs(good, probe_ids)) < LOGPROB_TOL
    server.stop()  # an idle server still takes CPU from the tests after it (gloo's polling threads)


# --- a sharded trainer: parameters gathered one at a time, straight into the push ----------------------


def test_an_fsdp2_sharded_model_streams_into_an_exact_push(server, tiny_qwen2, probe_ids, tmp_path):
    import subprocess
    import sys

    from fastgrpo.net import free_port

    script = Path(__file__).parent / "scripts" / "push_from_fsdp2.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                             tiny_qwen2, server.base_url, str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    rank0 = [line for line in result.stderr.splitlines() if line.startswith("[rank0]")]  # the pusher's words
    assert result.returncode == 0, "\n".join(rank0[-40:]) or result.stderr[-4000:]
    pushed = torch.load(tmp_path / "fsdp2_weights.pt")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    model.load_state_dict(pushed, strict=False)  # the tied head follows the embedding
    expected = hf_logprobs(model, probe_ids)
    with VLLMClient(base_url=server.base_url) as client:
        for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
            assert gap(logprobs, expected) < LOGPROB_TOL, rank


# --- pushes that land while generations run ----------------------------------------------------------
# Sampled tokens' logprobs come from vLLM's sampler, not its prompt-logprob path: they agree with the float32
# forward to about 1e-5 here too, and two perturbations of the weights differ by 0.1 nats and more, so
# INFLIGHT_TOL tells under which weights each token was sampled.
INFLIGHT_TOL = 1e-3
# Generations that a push must land in the middle of run this many sequences at once (each decode step, and
# the generation, longer): one sequence of the tiny model finished 240 tokens in 0.33 s on a Zen 4 core pair.
BATCH = 32


def decode_step_seconds(client, prompt, batch: int = BATCH) -> float:
    """How long a decode step of BATCH sequences takes on this machine (an upper bound: the prefill counts
    too), so that a push can land about 20 tokens into a generation on a fast CPU and a slow one alike."""
    began = time.monotonic()
    client.generate(prompt_token_ids=[prompt] * batch, max_tokens=32, ignore_eos=True, seed=4)
    return (time.monotonic() - began) / 32


def set_when_loading(server, event: threading.Event, timeout_s: float = 30.0) -> None:
    """Set `event` once the server's push is loading (GET /health's weight_push), at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(server.base_url + "/health", timeout=10).json()["weight_push"] == "loading":
            event.set()
            return
        time.sleep(0.01)


def wait_until_generating(thread: threading.Thread, step_s: float, steps: int = 20) -> None:
    """About `steps` decode steps into the thread's generation. Not by polling /health: on 2 cores busy with
    decoding, a poll sent as the generation began was answered only once it had ended (0.86 s later)."""
    time.sleep(steps * step_s)
    assert thread.is_alive(), "the generation ended before the push could start"


def test_a_generation_runs_across_a_push_and_its_later_tokens_come_from_the_new_weights(server, tiny_qwen2,
                                                                                         probe_ids):
    old, new = perturbed(tiny_qwen2, seed=11), perturbed(tiny_qwen2, seed=12)
    prompt = probe_ids[:12]
    with VLLMClient(base_url=server.base_url, weight_transfer_timeout=30) as client:
        client.generate(prompt_token_ids=[prompt] * 2, max_tokens=8)  # both ranks past their slow first steps
        step_s = decode_step_seconds(client, prompt)
        out = {}

        def generate():
            out["response"] = client.generate(prompt_token_ids=[prompt] * BATCH, max_tokens=240, ignore_eos=True,
                                              seed=3)

        # As in the failing-push test below: under CI's load a push started 20 steps in once landed after all
        # 240 steps had ended. A try where the two did not overlap (one weight version) does not count.
        tries = []
        for steps in (20, 8, 40):
            client.update_weights(old)
            version = client.health()["weight_version"]
            thread = threading.Thread(target=generate)
            thread.start()
            wait_until_generating(thread, step_s, steps=steps)
            client.update_weights(new)
            thread.join(120)
            completion = out["response"].results[0].completions[0]
            tries.append((steps, completion.weight_versions))
            if completion.weight_versions != [version]:
                break
        else:
            raise AssertionError(f"the push never landed during the generation: {tries}")
    assert completion.weight_versions == [version, version + 1], tries
    tokens, served = completion.token_ids, completion.logprobs
    assert len(tokens) == 240
    under_old = hf_logprobs(old, prompt + tokens)[len(prompt) - 1 :]
    under_new = hf_logprobs(new, prompt + tokens)[len(prompt) - 1 :]
    matches_old = [abs(s - o) < INFLIGHT_TOL for s, o in zip(served, under_old)]
    matches_new = [abs(s - n) < INFLIGHT_TOL for s, n in zip(served, under_new)]
    # Every token was sampled under one of the two: the old weights first, then the new ones to the end
    # (--kv_after_push recompute: the earlier tokens' keys and values were computed again).
    switch = matches_new.index(True)
    assert 3 < switch < len(tokens) - 50, f"the push landed at token {switch}, not during the generation"
    assert all(matches_old[:switch]) and all(matches_new[switch:]), (switch, matches_old[switch - 3 : switch + 3])


def test_a_push_that_fails_during_a_generation_stops_it_rather_than_finish_it_on_mixed_weights(
        server, tiny_qwen2, probe_ids):
    good = perturbed(tiny_qwen2, seed=13)
    with VLLMClient(base_url=server.base_url, weight_transfer_timeout=10) as client:
        client.update_weights(good)
        # Three times B1's batch: a failing push takes a second or two to reach the engines (the group, the
        # announcement, the first buckets), and 240 steps of 16 sequences per DP rank were sometimes over by then.
        batch = 3 * BATCH
        step_s = decode_step_seconds(client, probe_ids[:12], batch)
        out = {}

        def generate():
            out["response"] = httpx.post(server.base_url + "/generate", timeout=120, json={
                "prompt_token_ids": [probe_ids[:12]] * batch, "max_tokens": 240, "ignore_eos": True})

        # The push must reach the engines while the generation runs. How far into it that is depends on the
        # machine's load (under CI's, 240 steps once ended before a push started 20 steps in got there, and a
        # push started 2 steps in once came before the request): tried at 10, 4 and 20 steps, and a try where
        # the two did not overlap (the request finished whole, or came after the failed push) does not count.
        outcomes = []
        for steps in (10, 4, 20):
            thread = threading.Thread(target=generate)
            thread.start()
            wait_until_generating(thread, step_s, steps=steps)
            # The trainer breaks only once the server is loading: a client that failed sooner would withdraw the
            # announced push before the server touched the engines, and nothing would fail there.
            loading = threading.Event()
            threading.Thread(target=set_when_loading, args=(server, loading), daemon=True).start()
            with pytest.raises(WeightTransferError, match="broke half-way"):
                client.update_weights(FailingWeights(list(good.named_parameters()), 10, wait_for=loading))
            assert loading.is_set()
            thread.join(120)
            response = out["response"]
            outcomes.append((steps, response.status_code, response.text[:200]))
            if response.status_code == 503 and "while this request was generating" in response.json()["error"]:
                break  # stopped mid-generation, as it must be
            assert response.status_code == 200 or "the last weight push failed" in response.json()["error"], outcomes
            client.update_weights(good)
        else:
            raise AssertionError(f"the push never landed during the generation: {outcomes}")
        client.update_weights(good)  # the next whole push serves exactly again
        for rank, logprobs in server_logprobs_by_rank(client, probe_ids).items():
            assert gap(logprobs, hf_logprobs(good, probe_ids)) < LOGPROB_TOL, rank


def test_an_idle_server_polls_with_one_gloo_thread_per_engine_process(server):
    """vLLM's worker makes 13 gloo groups; with torch's device for each it polled 1,300 times a second."""
    import psutil

    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "Worker" in p.name()]
    assert len(workers) == 2  # DP=2
    for worker in workers:
        loops = [t for t in Path(f"/proc/{worker.pid}/task").iterdir()
                 if (t / "comm").read_text().strip() == "gloo_tcp_loop"]
        assert len(loops) == 1, (worker.pid, len(loops))


def test_the_engines_go_quiet_within_a_fraction_of_a_second_after_a_generation(server, probe_ids):
    """vLLM's worker spins on sched_yield 1 s after each message; on cores it shares with the trainer that
    second was taken from the training micro-step that follows a round. fastgrpo's plugin cuts it to 20 ms
    (quiet_gloo.SPIN_S). Measured here (DP=2, 2 cores): in the second after a generation the four engine
    processes took 1.53 CPU s with vLLM's 1 s (FASTGRPO_ENGINE_SPIN_S=1), 0.02 with 20 ms."""
    import psutil

    engines = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "Worker" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(engines) == 4  # DP=2: an engine core and a worker each

    def cpu_s() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in engines)

    with VLLMClient(base_url=server.base_url) as client:
        client.generate(prompt_token_ids=[probe_ids] * 8, max_tokens=16)
    time.sleep(0.1)
    before = cpu_s()
    time.sleep(1.0)
    # Four processes' gloo loops (100 wake-ups a second each) and the 20 ms spins.
    assert cpu_s() - before < 0.3, cpu_s() - before


# Last: it kills one of the module server's two DP ranks.
def test_a_push_after_a_dp_rank_died_fails_at_once_naming_it(server, tiny_qwen2):
    """Last in this module: it kills DP rank 1. vLLM's DP client runs its ranks as one engine, so a push can no
    longer reach every rank: it must fail at once with the rank's name, not wait out a collective's timeout."""
    import os
    import signal

    import psutil

    client = VLLMClient(base_url=server.base_url, bucket_bytes=SMALL_BUCKET, weight_transfer_timeout=30)
    client.update_weights(perturbed(tiny_qwen2, seed=6))  # the group holds both ranks
    engine_1 = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if "EngineCore_DP1" in " ".join(p.cmdline())]
    assert len(engine_1) == 1
    for proc in [engine_1[0], *engine_1[0].children(recursive=True)]:
        os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while client.health()["dp_ranks"][1]["state"] != "failed":
        assert time.monotonic() < deadline, "the dead rank never showed in /health"
        time.sleep(0.5)
    began = time.monotonic()
    with pytest.raises(ServerError, match="EngineCore_DP1") as error:
        client.update_weights(perturbed(tiny_qwen2, seed=7))
    assert error.value.status == 503 and time.monotonic() - began < 10
    client.close()
