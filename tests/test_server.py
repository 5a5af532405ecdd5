"""The generation server, for real: `fastgrpo vllm-serve` (vLLM CPU build) as a subprocess, over HTTP.

One DP=2 server (float32, so logprobs compare tightly with transformers) serves
most tests; tests that break things (timeouts, a killed DP rank) come last.
"""

import concurrent.futures
import os
import signal
import time

import httpx
import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastgrpo.client import ServerError, VLLMClient
from fastgrpo.transfer import WeightTransferError
from generating import LongGeneration

pytestmark = pytest.mark.slow

# bf16 would need ~0.05; both sides compute in float32 here, so differences are
# kernel rounding only.
LOGPROB_TOL = 2e-3


@pytest.fixture(scope="module")
def server(server_factory, tiny_qwen2):
    return server_factory(["--model", tiny_qwen2, "--data-parallel-size", "2", "--dtype", "float32",
                           "--max-model-len", "256", "--kv-cache-space", "1"])


@pytest.fixture(scope="module")
def client(server):
    c = VLLMClient(base_url=server.base_url, timeout=60, weight_transfer_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)


PROBE = "What is 12 + 35? The answer is 47."


def server_probe_logprobs(client, ids) -> list[float]:
    result = client.generate(prompt_token_ids=[ids], max_tokens=1, prompt_logprobs=True, temperature=1.0)
    return result.results[0].prompt_logprobs[1:]


def hf_probe_logprobs(model, ids) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def post(server, path, body) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=120)


# --- routes --------------------------------------------------------------------


def test_health_reports_dp_ranks_pinned_apart_and_world_size(client):
    health = client.health()
    assert health["status"] == "ok"
    assert health["data_parallel_size"] == 2 and health["tensor_parallel_size"] == 1
    assert health["world_size"] == 2 and health["weight_transfer_ranks"] == 2
    assert [r["state"] for r in health["dp_ranks"]] == ["ready", "ready"]
    devices = [r["devices"] for r in health["dp_ranks"]]
    assert health["device_type"] == "cpu"  # so "devices" name cores
    assert devices[0] != devices[1]  # disjoint cores
    assert health["weight_transfer_backend"] == "gloo"
    assert health["dtype"] == "float32"


def test_generate_text_returns_tokens_logprobs_finish_reason_and_version(client):
    response = client.generate(["What is 3 + 4?", "hello"], n=3, max_tokens=8, temperature=1.0, seed=1)
    assert response.weight_version == client.health()["weight_version"]
    assert len(response.results) == 2
    for result in response.results:
        assert len(result.completions) == 3
        for completion in result.completions:
            assert 1 <= len(completion.token_ids) <= 8
            assert len(completion.logprobs) == len(completion.token_ids)
            assert all(lp <= 0.0 for lp in completion.logprobs)
            assert completion.finish_reason in ("stop", "length")


def test_generate_token_ids_and_chat_messages(client, tiny_qwen2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    ids = tokenizer("What is 3 + 4?")["input_ids"]
    by_ids = client.generate(prompt_token_ids=[ids], max_tokens=4, temperature=0.0)
    assert by_ids.results[0].prompt_token_ids == ids
    conversation = [{"role": "user", "content": "What is 3 + 4?"}]
    by_chat = client.chat([conversation], max_tokens=4, temperature=0.0)
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert by_chat.results[0].prompt_token_ids == list(expected)
    # Greedy decoding is deterministic: the same prompt gives the same tokens.
    again = client.generate(prompt_token_ids=[ids], max_tokens=4, temperature=0.0)
    assert again.results[0].completions[0].token_ids == by_ids.results[0].completions[0].token_ids


def test_stop_strings_and_sampling_fields_are_honoured(client):
    response = client.generate(["one two three"], n=2, max_tokens=12, temperature=0.7, top_p=0.9, top_k=20,
                               min_p=0.01, repetition_penalty=1.1, seed=3)
    assert len(response.results[0].completions) == 2
    seeded = [client.generate(["one two"], max_tokens=6, seed=7).results[0].completions[0].token_ids
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_per_prompt_seeds_stop_token_ids_and_min_tokens(client):
    """`seeds`: completion j of prompt i samples with seeds[i] + j, so a prompt's group depends on its own
    seed only; stop_token_ids end completions with finish reason "stop"; min_tokens holds them off."""
    alone = client.generate(["one two"], n=2, max_tokens=8, seeds=[11]).results[0]
    pair = client.generate(["three", "one two"], n=2, max_tokens=8, seeds=[5, 11]).results
    assert [c.token_ids for c in pair[1].completions] == [c.token_ids for c in alone.completions]
    stops = list(range(100, 164))  # a sixth of the tiny vocabulary, at the field's limit of 64
    stopped = client.generate(["one two"], n=8, max_tokens=24, seeds=[3], stop_token_ids=stops).results[0]
    ended = [c for c in stopped.completions if c.finish_reason == "stop"]
    assert ended and all(c.token_ids[-1] in stops for c in ended)
    held = client.generate(["one two"], n=8, max_tokens=24, seeds=[3], stop_token_ids=stops, min_tokens=20)
    assert all(len(c.token_ids) >= 20 for c in held.results[0].completions)


def test_seeded_requests_with_chunked_size_prefills_do_not_kill_the_engine(client):
    """vLLM 0.32's CPU worker dies on a seeded request whose prefill is chunked; the server avoids that."""
    prompts = [[(7 * i + j) % 300 + 10 for j in range(200)] for i in range(48)]  # ~9600 prompt tokens
    response = client.generate(prompt_token_ids=prompts, n=2, max_tokens=4, seed=1)
    assert all(len(r.completions) == 2 for r in response.results)
    assert client.health()["status"] == "ok"


def test_work_is_split_across_dp_ranks(client):
    response = client.generate([f"prompt number {i}" for i in range(8)], n=2, max_tokens=4)
    assert {c.dp_rank for r in response.results for c in r.completions} == {0, 1}


def test_a_seeded_prompt_gets_the_same_completions_whether_its_n_is_cut_across_ranks_or_not(client):
    # Alone, a prompt's 8 completions are cut 4 + 4 over the two ranks (split_by_load); beside another prompt
    # of the same size it stays whole on one rank. Each chunk carries seed + its first index, as vLLM seeds
    # the children of one request, so both give the same 8 completions in the same order.
    alone = client.generate(["seeded prompt"], n=8, seed=5, max_tokens=16, ignore_eos=True).results[0]
    beside = client.generate(["seeded prompt", "another one"], n=8, seeds=[5, 9], max_tokens=16,
                             ignore_eos=True).results[0]
    assert sorted({c.dp_rank for c in alone.completions}) == [0, 1]
    assert len({c.dp_rank for c in beside.completions}) == 1
    assert [c.token_ids for c in alone.completions] == [c.token_ids for c in beside.completions]
    assert len({tuple(c.token_ids) for c in alone.completions}) == 8  # and they differ from one another


def test_concurrent_requests_are_served_concurrently(client):
    """A short request sent while a long one is generating finishes first, on a rank the long one also
    occupies: requests join the running batch instead of queueing behind each other."""

    def race() -> list[str]:
        finished = []

        def run(name, prompts, max_tokens):
            # ignore_eos: the long request really is long (16 x 8 x 200 tokens, seconds), whatever the model samples.
            client.generate(prompts, n=8, max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
            finished.append(name)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = pool.submit(run, "long", ["count with me"] * 16, 200)
            deadline = time.monotonic() + 60
            # Send the short one once the long one is in the server's hands (both ranks carry its load).
            while not all(r["load_tokens"] for r in client.health()["dp_ranks"]):
                assert not long.done(), "the long request finished before it was seen in flight"
                assert time.monotonic() < deadline, "the long request never showed up in the ranks' load"
                time.sleep(0.01)
            short = pool.submit(run, "short", ["count with me"], 2)
            long.result(), short.result()
        return finished

    # Up to 3 races: on a loaded machine the poll above can see the long request late, near its end (seen once
    # in a full suite run). A server that queued requests behind each other loses all three.
    outcomes = []
    for _ in range(3):
        outcomes.append(race())
        if outcomes[-1] == ["short", "long"]:
            break
    assert outcomes[-1] == ["short", "long"], outcomes


def test_a_generation_whose_client_went_away_is_aborted_in_the_engines_and_counted(server, client):
    before = client.health()["abandoned_generations"]
    # 256 prompts x 240 tokens: several seconds of work for the tiny model here; the client gives up after 1 s.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/generate", timeout=1.0, json={
            "prompts": [f"abandoned {i}" for i in range(256)], "max_tokens": 240, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while True:  # vLLM's own counts (its DP coordinator's, every 100 ms), not only ours, drop to nothing
        health = client.health()
        if health["abandoned_generations"] == before + 1 and not any(
                r["load_tokens"] or r["waiting"] or r["running"] for r in health["dp_ranks"]):
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    began = time.monotonic()  # and the engines are free: a short request runs alone
    client.generate(["after"], max_tokens=4)
    assert time.monotonic() - began < 2


def test_reset_prefix_cache(client):
    client.reset_prefix_cache()
    assert client.generate(["after reset"], max_tokens=2).results


def test_openai_client_completions_and_chat(server):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    models = oa.models.list()
    assert len(models.data) == 1
    completion = oa.completions.create(model=models.data[0].id, prompt="What is 3 + 4?", max_tokens=5, n=2)
    assert len(completion.choices) == 2 and completion.usage.completion_tokens > 0
    chat = oa.chat.completions.create(model=models.data[0].id, max_tokens=5,
                                      messages=[{"role": "user", "content": "What is 3 + 4?"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model=models.data[0].id, prompt="x", max_tokens=-1)


# --- bad input: 4xx JSON naming the field, then the server keeps serving -----------


@pytest.mark.parametrize("body,field,words", [
    ({"prompts": ["x"], "n": 0}, "n", "greater than or equal to 1"),
    ({"prompts": ["x"], "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
    ({"prompts": ["x " * 300], "max_tokens": 4}, "prompts", "max_model_len=256"),
    ({"prompt_token_ids": [[1, 2]], "max_tokens": 255}, "prompt_token_ids", "max_model_len=256"),
    ({"prompt_token_ids": [[1, 99999]]}, "prompt_token_ids", "outside the vocabulary"),
    ({"max_tokens": 4}, None, "exactly one of"),
    ({"prompts": [], "max_tokens": 4}, None, "is empty"),
    ({"prompts": ["x"], "temperature": -1}, "temperature", "greater than or equal to 0"),
    # Found by the fuzzer: a 500 (vLLM refuses it), NaN logprobs served as null, an int the engine cannot take.
    ({"prompts": ["x"], "temperature": 99}, "temperature", "less than or equal to 2"),
    ({"prompts": ["x"], "repetition_penalty": 5e-324}, "repetition_penalty", "greater than or equal to 0.01"),
    ({"prompts": ["x"], "top_k": 2**70}, "top_k", "less than or equal to 2147483647"),
    # These answered 500 before (vLLM refused them inside the engine):
    ({"prompts": ["x"], "stop": [""]}, "stop.0", "at least 1 character"),
    ({"prompts": [""]}, "prompts.0", "at least 1 character"),
    ({"prompts": ["x"], "seed": 2**64}, "seed", "less than or equal to"),
    ({"messages": [[]]}, "messages.0", "at least 1 item"),
    ({"prompt_token_ids": [[5, -1]]}, "prompt_token_ids.0.1", "greater than or equal to 0"),
    # Per-prompt seeds and the sampling fields a trainer's generation_kwargs may set.
    ({"prompts": ["x", "y"], "seeds": [1]}, None, "one per prompt"),
    ({"prompts": ["x"], "seeds": [1], "seed": 2}, None, "not both"),
    ({"prompts": ["x"], "seeds": [2**64]}, "seeds.0", "less than or equal to"),
    ({"prompts": ["x"], "stop_token_ids": [99999]}, "stop_token_ids", "outside the vocabulary"),
    ({"prompts": ["x"], "min_tokens": 9, "max_tokens": 4}, None, "more than max_tokens"),
    ({"prompts": ["x"], "presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
])
def test_bad_generate_requests_get_400_and_server_keeps_serving(server, body, field, words):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:  # one keep-alive connection throughout
        response = http.post("/generate", json=body)
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["type"] == "invalid_request"
        assert words in error["error"]
        if field is not None:
            assert error["field"] == field
        good = http.post("/generate", json={"prompts": ["still serving"], "max_tokens": 2})
        assert good.status_code == 200 and good.json()["results"][0]["completions"]


def test_malformed_requests_get_the_documented_json(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        cases = [
            (http.post("/generate", content=b'{"prompts": ["\xff"', headers={"content-type": "application/json"}),
             400, "body"),
            (http.post("/generate", content=b"\xff\xfe{}", headers={"content-type": "application/json"}), 400, "body"),
            (http.post("/generate", content=b'{"prompts": ["x"], "max_tokens": }',
                       headers={"content-type": "application/json"}), 400, "body"),
            (http.get("/generate"), 405, None),
            (http.get("/no/such/route"), 404, None),
        ]
        for response, status, field in cases:
            assert response.status_code == status, response.text
            error = response.json()
            assert set(error) == {"error", "type", "field"} and error["error"], error
            assert error["field"] == field
        assert http.post("/generate", json={"prompts": ["x"], "max_tokens": 2}).status_code == 200


# --- weight sync, proven by numbers ----------------------------------------------


def test_weight_push_changes_server_logprobs_to_match_transformers(client, hf_model, tiny_qwen2):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_qwen2)(PROBE)["input_ids"]
    original_state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    before = server_probe_logprobs(client, ids)
    assert max(abs(a - b) for a, b in zip(before, hf_probe_logprobs(hf_model, ids))) < LOGPROB_TOL

    torch.manual_seed(0)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    version_before = client.health()["weight_version"]
    version = client.update_weights(hf_model)
    assert version == version_before + 1
    after = server_probe_logprobs(client, ids)
    expected = hf_probe_logprobs(hf_model, ids)
    assert max(abs(a - b) for a, b in zip(after, expected)) < LOGPROB_TOL
    assert max(abs(a - b) for a, b in zip(after, before)) > 0.05  # the push really changed the model
    # Every DP rank got the push: a batch spread over both agrees on the probe.
    spread = client.generate(prompt_token_ids=[ids] * 4, max_tokens=1, prompt_logprobs=True)
    assert {c.dp_rank for r in spread.results for c in r.completions} == {0, 1}
    for result in spread.results:
        assert max(abs(a - b) for a, b in zip(result.prompt_logprobs[1:], expected)) < LOGPROB_TOL
    assert spread.weight_version == version

    hf_model.load_state_dict(original_state)
    assert client.update_weights(hf_model, weight_version=100) == 100
    restored = server_probe_logprobs(client, ids)
    assert max(abs(a - b) for a, b in zip(restored, before)) < LOGPROB_TOL


def test_bad_pushes_are_refused_and_weights_stay_intact(client, hf_model, tiny_qwen2):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_qwen2)(PROBE)["input_ids"]
    before = server_probe_logprobs(client, ids)
    version = client.health()["weight_version"]
    state = dict(hf_model.named_parameters())
    bad_pushes = {
        "unknown weight name": {"model.layers.0.not_a_weight": torch.zeros(3)},
        "has shape": {"model.norm.weight": torch.zeros(5)},
        "has dtype int64": {"model.norm.weight": torch.zeros(state["model.norm.weight"].shape, dtype=torch.int64)},
    }
    for words, push in bad_pushes.items():
        with pytest.raises(ServerError) as error:
            client.update_weights(push)
        assert error.value.status == 400 and words in error.value.message
        after = server_probe_logprobs(client, ids)
        assert max(abs(a - b) for a, b in zip(after, before)) == 0.0
        assert client.health()["weight_version"] == version
    # And a good push still works afterwards.
    assert client.update_weights(hf_model) == version + 1


def test_a_push_the_trainer_never_sends_times_out_naming_the_trainer(server, client, tiny_qwen2, hf_model):
    """/weights/update waits for the trainer's data; it never comes: 504 that says so, then recovery."""
    client.close_weight_transfer()  # the group is one trainer's at a time: this test is another trainer
    c = VLLMClient(base_url=server.base_url, timeout=30, weight_transfer_timeout=4)
    try:
        c.init_weight_transfer("gloo")
        named = [(n, p.detach()) for n, p in hf_model.named_parameters()]
        start = c._request("POST", "/weights/start", json={
            "group_id": c.group_id, "names": [n for n, _ in named], "dtype_names": ["float32"] * len(named),
            "shapes": [list(t.shape) for _, t in named], "timeout_s": 4})
        response = post(server, "/weights/update", {"transfer_id": start["transfer_id"]})
        assert response.status_code == 504
        assert "trainer" in response.json()["error"] and "did not arrive" in response.json()["error"]
        # Half-loaded weights are never served: generation says why until a full push lands.
        refused = post(server, "/generate", {"prompts": ["x"], "max_tokens": 2})
        assert refused.status_code == 503 and "push the whole model again" in refused.json()["error"]
        assert c.health()["last_push_error"].startswith("the trainer's weights did not arrive")
        c.sender = None  # the server closed the group; the next push reopens it
        c.update_weights(hf_model)
        assert c.generate(["back"], max_tokens=2).results[0].completions
    finally:
        c.close()


def test_workers_that_never_join_fail_the_trainer_with_a_message(server):
    """The trainer opens a group the server refuses to join: the error names the server side."""
    c = VLLMClient(base_url=server.base_url, timeout=30, weight_transfer_timeout=3)
    real_health = c.health
    c.health = lambda: dict(real_health(), weight_transfer_ranks=3)  # a wrong world size: the server says no
    try:
        with pytest.raises(WeightTransferError) as error:
            c.update_weights({"model.norm.weight": torch.ones(128)})
        message = str(error.value)
        assert "did not join the weight-transfer group" in message and "world_size" in message
    finally:
        c.close()


# --- an API key, and a bad config ---------------------------------------------------


def test_api_key_guards_every_route_but_health(transient_server_factory, tiny_llama):
    keyed = transient_server_factory(["--model", tiny_llama, "--api-key", "s3cret", "--max-model-len", "128",
                            "--kv-cache-space", "1"])
    assert httpx.get(keyed.base_url + "/health").status_code == 200
    key = {"authorization": "Bearer s3cret"}
    schema = httpx.get(keyed.base_url + "/openapi.json", headers=key, timeout=30).json()
    routes = [(m.upper(), p) for p, methods in schema["paths"].items() for m in methods if p != "/health"]
    assert len(routes) > 25  # ours and vLLM's
    for method, path in routes + [("GET", "/metrics"), ("GET", "/openapi.json")]:
        url = keyed.base_url + path.replace("{rollout_id}", "r1").replace("{name}", "a")
        response = httpx.request(method, url, json={}, timeout=30)
        assert response.status_code == 401, (method, path, response.text)
        assert "Authorization: Bearer" in response.text  # ours: {"error": ...}; vLLM's routes: OpenAI's shape
    with VLLMClient(base_url=keyed.base_url, api_key="s3cret", timeout=30) as c:
        assert c.generate(["with the key"], max_tokens=2).results[0].completions
        assert c.health()["data_parallel_size"] == 1
    # Without the key a push fails at once, not after the weight-transfer timeout (30 s) as it did.
    with VLLMClient(base_url=keyed.base_url, timeout=30, weight_transfer_timeout=30) as c:
        began = time.perf_counter()
        with pytest.raises(ServerError, match="refused the API key") as error:
            c.update_weights({"model.norm.weight": torch.ones(128)})
        assert time.perf_counter() - began < 10 and error.value.status == 401
        assert "vllm_server_api_key" in str(error.value)


def test_a_layout_the_machine_cannot_hold_fails_at_start(tiny_qwen2, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", "vllm-serve", "--model", tiny_qwen2,
                             "--port", "8999", "--data-parallel-size", "64"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "needs 64 CPU cores" in result.stdout + result.stderr


# --- a DP rank dies (last: it breaks the server) ------------------------------------


def test_a_dead_dp_rank_ends_generations_in_flight_and_after_with_its_name(server, client):
    engine_1 = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if "EngineCore_DP1" in " ".join(p.cmdline())]
    assert len(engine_1) == 1, [p.cmdline() for p in psutil.Process(server.proc.pid).children(recursive=True)]
    thread = LongGeneration(server.base_url)
    thread.start()
    for proc in [engine_1[0], *engine_1[0].children(recursive=True)]:
        os.kill(proc.pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the generation hung after a DP rank died"
    response = thread.response
    assert response.status_code == 503 and response.json()["type"] == "engine_dead", response.text[:300]
    assert "EngineCore_DP1" in response.json()["error"] and "restart" in response.json()["error"]

    health = httpx.get(server.base_url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert [r["state"] for r in health.json()["dp_ranks"]] == ["stopped", "failed"]
    assert "EngineCore_DP1 died" in health.json()["dp_ranks"][1]["error"]
    for path, body in [("/generate", {"prompts": ["after"], "max_tokens": 2}), ("/reset_prefix_cache", None)]:
        after = httpx.post(server.base_url + path, json=body, timeout=10)
        assert after.status_code == 503 and after.json()["type"] == "engine_dead", (path, after.text[:300])
