"""vLLM's own API on `fastgrpo vllm-serve`, for real: the `openai` client streaming, vLLM's tool-call parser,
Prometheus metrics, TRL 1.16's VLLMClient, vLLM's weight routes driven by vLLM's own trainer-side engine, and a
stock `vllm serve` with fastgrpo's gloo backend.

One server (float32, so logprobs compare tightly with transformers) on a tiny Llama whose chat template calls
tools in Llama 3's JSON format, with vLLM's llama3_json parser; the stock server comes last.
"""

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgrpo.client import VLLMClient
from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.net import free_port
from fastgrpo.serve.launcher import ServerProcess

pytestmark = pytest.mark.slow

LOGPROB_TOL = 1e-4  # float32 on both sides: kernel rounding only
LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Look a key up.", "parameters": {
    "type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}
# A random model calls no tool by itself: structured outputs make its text one Llama 3 JSON call, which vLLM's
# llama3_json parser then reads as any model's.
CALL_REGEX = r'\{"name": "lookup", "parameters": \{"key": "[a-z]{1,2}"\}\}'


@pytest.fixture(scope="module")
def server(server_factory, tiny_llama3):
    return server_factory(["--model", tiny_llama3, "--dtype", "float32", "--max-model-len", "512",
                           "--kv-cache-space", "1", "--tool-call-parser", "llama3_json"])


@pytest.fixture(scope="module")
def oa(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def model_name(oa):
    return oa.models.list().data[0].id


@pytest.fixture(scope="module")
def hf_model(tiny_llama3):
    return AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32)


def streamed(stream) -> dict:
    """What a streamed response said, put together: text, token ids, logprobs, finish reason, extras."""
    out = {"text": "", "token_ids": [], "logprobs": [], "finish_reason": None, "usage": None, "final": None,
           "calls": {}}
    for chunk in stream:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            extra = choice.model_extra or {}
            delta = getattr(choice, "delta", None)
            out["text"] += (delta.content if delta is not None else choice.text) or ""
            out["token_ids"] += extra.get("token_ids") or []
            logprobs = choice.logprobs
            if logprobs is not None:
                out["logprobs"] += [e.logprob for e in logprobs.content] if hasattr(logprobs, "content") \
                    else logprobs.token_logprobs
            for call in (delta.tool_calls or []) if delta is not None else []:
                entry = out["calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            if choice.finish_reason is not None:
                out["finish_reason"], out["final"] = choice.finish_reason, extra
    return out


# --- the OpenAI API, streaming -----------------------------------------------------


def test_streamed_chat_and_completions_equal_unstreamed_with_usage_finish_reasons_and_versions(oa, model_name):
    messages = [{"role": "user", "content": "What is 12 + 35?"}]
    whole = oa.chat.completions.create(model=model_name, messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True, extra_body={"return_token_ids": True})
    parts = streamed(oa.chat.completions.create(
        model=model_name, messages=messages, max_tokens=12, temperature=0, logprobs=True, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
    choice = whole.choices[0]
    assert parts["text"] == choice.message.content
    assert parts["token_ids"] == choice.model_extra["token_ids"] and len(parts["token_ids"]) == 12
    assert max(abs(a - b.logprob) for a, b in zip(parts["logprobs"], choice.logprobs.content)) < 1e-6
    assert parts["finish_reason"] == choice.finish_reason == "length"
    assert parts["usage"].completion_tokens == 12 == whole.usage.completion_tokens
    assert parts["usage"].prompt_tokens == whole.usage.prompt_tokens > 0
    assert parts["final"]["weight_versions"] == choice.model_extra["weight_versions"] == [0, 0]

    prompt = "What is 3 + 4?"
    whole = oa.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0)
    parts = streamed(oa.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert parts["text"] == whole.choices[0].text and parts["finish_reason"] == "length"
    assert parts["usage"].completion_tokens == 6


def test_logprobs_and_top_logprobs_match_transformers(oa, model_name, hf_model, tiny_llama3):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    ids = tokenizer("What is 7 + 8? The answer is", add_special_tokens=False)["input_ids"]
    out = oa.completions.create(model=model_name, prompt=ids, max_tokens=4, temperature=1.0, seed=3, logprobs=3,
                                extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    choice = out.choices[0]
    sampled = choice.model_extra["token_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids + sampled])).logits[0].float(), dim=-1)
    for i, (token, value, top) in enumerate(zip(sampled, choice.logprobs.token_logprobs,
                                                choice.logprobs.top_logprobs)):
        row = logp[len(ids) - 1 + i]
        assert abs(value - row[token].item()) < LOGPROB_TOL
        # Keyed "token_id:N" (as TRL asks): texts of byte tokens collide, ids do not.
        tops = {int(key.removeprefix("token_id:")): lp for key, lp in top.items()}
        assert set(row.topk(3).indices.tolist()) <= set(tops)
        assert max(abs(lp - row[t].item()) for t, lp in tops.items()) < LOGPROB_TOL


@pytest.mark.parametrize("path,body,words", [
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, "non-empty"),
    ("/v1/completions", {"prompt": [5, 99999], "max_tokens": 2}, "out of vocabulary"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "less than or equal to"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, "max_model_len"),
    ("/v1/completions", {"prompt": "x", "temperature": 99}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ""}, "empty string"),
    # An int the engine cannot take: stock vLLM answers it with a 500.
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": 2**70}, "refused"),
    ("/v1/chat/completions", {"messages": []}, "message"),
    ("/inference/v1/generate", {"token_ids": [], "sampling_params": {}}, "at least 1 item"),
])
def test_bad_openai_requests_get_a_4xx_in_openai_format_and_the_server_keeps_serving(server, model_name, path,
                                                                                   body, words):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        response = http.post(path, json={"model": model_name, **body})
        assert 400 <= response.status_code < 500, response.text
        error = response.json()["error"]  # OpenAI's shape, which the openai client reads
        assert set(error) >= {"message", "type", "code"} and words in error["message"].lower(), error
        good = http.post("/v1/completions", json={"model": model_name, "prompt": "still serving", "max_tokens": 2})
        assert good.status_code == 200


def test_metrics_are_prometheus_and_count_what_was_generated(server, oa, model_name):
    def generated() -> float:
        text = httpx.get(server.base_url + "/metrics", timeout=30).text
        values = re.findall(r"^vllm:generation_tokens_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
        assert values, text[:2000]
        return sum(float(v) for v in values)

    response = httpx.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE vllm:num_requests_running gauge" in response.text
    before = generated()
    oa.completions.create(model=model_name, prompt="count these", max_tokens=5, temperature=0)
    for _ in range(50):  # the engines report stats between steps
        if generated() >= before + 5:
            break
        time.sleep(0.1)
    assert generated() == before + 5


# --- agents: a streamed tool call in Llama 3's JSON format, recorded exactly --------------


def tool_agent(base_url: str, seed: int | None = None) -> dict:
    """An agent as one writes it with the `openai` client, streaming: it asks, the model calls `lookup`, the agent
    answers the call and asks for the final answer."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = [{"role": "user", "content": "What is under key a?"}]
    first = streamed(client.chat.completions.create(
        model="policy", messages=messages, tools=[LOOKUP], stream=True, max_tokens=80, logprobs=True, seed=seed,
        extra_body={"structured_outputs": {"regex": CALL_REGEX}, "return_token_ids": True}))
    (call,) = first["calls"].values()
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]})
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": "forty-two"})
    second = streamed(client.chat.completions.create(
        model="policy", messages=messages, tools=[LOOKUP], stream=True, max_tokens=8, logprobs=True, seed=seed,
        extra_body={"return_token_ids": True}))
    return {"first": first, "second": second, "call": call, "messages": messages}


def test_a_streamed_tool_calling_agent_is_recorded_as_exactly_the_streamed_tokens(server, tiny_llama3):
    with VLLMClient(base_url=server.base_url, timeout=60) as client:
        client.open_rollout("tools-1", temperature=1.0)
        run = tool_agent(client.rollout_url("tools-1"), seed=5)
        (recorded,) = client.rollout("tools-1").sequences
    first, second = run["first"], run["second"]
    # vLLM's llama3_json parser read the call out of the streamed JSON.
    assert first["finish_reason"] == "tool_calls" and first["text"] == ""
    assert run["call"]["name"] == "lookup" and set(json.loads(run["call"]["arguments"])) == {"key"}
    # One sequence: the streamed call's tokens, the template's tokens of the tool's answer, the streamed reply.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    chat = ChatTokens(tokenizer, [LOOKUP])
    following = chat.continuation(first["token_ids"], run["messages"][-1:])
    assert recorded.calls == 2
    assert recorded.prompt_ids == chat.prompt(run["messages"][:1])
    assert recorded.completion_ids == first["token_ids"] + following + second["token_ids"]
    assert recorded.completion_mask == [1] * len(first["token_ids"]) + [0] * len(following) + \
        [1] * len(second["token_ids"])
    streamed_logprobs = first["logprobs"] + [0.0] * len(following) + second["logprobs"]
    assert max(abs(a - b) for a, b in zip(recorded.logprobs, streamed_logprobs)) < 1e-6
    assert "ipython" in tokenizer.decode(following) and "forty-two" in tokenizer.decode(following)


def test_an_opened_rollout_samples_with_the_runs_settings_and_an_unknown_model_is_a_404(server, oa, model_name):
    import openai

    with VLLMClient(base_url=server.base_url, timeout=60) as client:
        client.open_rollout("policy-1", temperature=1.0, top_p=1.0)
        agent = openai.OpenAI(base_url=client.rollout_url("policy-1"), api_key="unused")
        # The agent asks for greedy decoding under a placeholder name: it gets the run's policy and temperature.
        agent.chat.completions.create(model="policy", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                      temperature=0.0, seed=7)
        recording = client.rollout("policy-1")
        (sequence,) = recording.sequences
        assert recording.overridden == {"temperature": 0.0} and recording.policy.temperature == 1.0
        direct = client.generate(prompt_token_ids=[sequence.prompt_ids], max_tokens=6, temperature=1.0, seed=7)
        completion = direct.results[0].completions[0]
        assert sequence.completion_ids == completion.token_ids
        assert max(abs(a - b) for a, b in zip(sequence.logprobs, completion.logprobs)) < 1e-6
        # Not opened by a trainer, a name the server does not serve is vLLM's 404, never the base model.
        stray = openai.OpenAI(base_url=client.rollout_url("policy-2"), api_key="unused")
        for c in (stray, oa):
            with pytest.raises(openai.NotFoundError, match="policy"):
                c.chat.completions.create(model="policy", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        with pytest.raises(Exception, match="no adapter named 'ghost'"):
            client.open_rollout("policy-3", "ghost")


def test_a_stream_cut_short_is_not_recorded(server, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 400,
            "stream": True, "temperature": 1.0, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        with http.stream("POST", "/rollouts/cut-1/v1/chat/completions", json=body) as response:
            for _ in response.iter_lines():
                break  # the agent died after its first chunk
        time.sleep(1.0)
        assert http.get("/rollouts/cut-1").status_code == 404
        assert http.post("/rollouts/cut-1/v1/chat/completions", json={**body, "stream": False,
                                                                      "max_tokens": 4}).status_code == 200
        assert http.get("/rollouts/cut-1").json()["sequences"][0]["calls"] == 1


def test_the_trainer_trains_on_streamed_tool_calling_agents(server, tiny_llama3, tmp_path):
    from datasets import Dataset

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.rollouts.agent import agent_rollout_func

    seen, versions = [], []

    def called_lookup(completions, agent_output, **kwargs):
        seen.extend(agent_output)
        return [float(i % 2) for i in range(len(agent_output))]

    def recording_versions(rollout_func):
        def run(prompts, trainer):
            out = rollout_func(prompts, trainer)
            versions.append((trainer._synced_version, out["weight_versions"]))
            return out
        return run

    port = int(server.base_url.rsplit(":", 1)[1])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=160, learning_rate=5e-3, max_steps=2, logging_steps=1,
                      save_strategy="no", report_to=[], seed=0, use_cpu=True, bf16=False, disable_tqdm=True,
                      use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is under key a?"}]] * 4})
    trainer = GRPOTrainer(tiny_llama3, [called_lookup], args=args, train_dataset=data,
                          rollout_func=recording_versions(agent_rollout_func(
                              lambda prompt, url: tool_agent(url)["call"]["name"])))
    trainer.train()
    trainer.close()
    assert trainer.state.global_step == 2 and seen == ["lookup"] * 8
    # Each step's agents ran on the weights the trainer had pushed for it (and the trainer checked so).
    assert [pushed for pushed, _ in versions] == [versions[0][0], versions[0][0] + 1]
    assert all(rows == [[pushed, pushed]] * 4 for pushed, rows in versions)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(h["completions/env_tokens_mean"] > 0 for h in logs)
    health = httpx.get(server.base_url + "/health", timeout=30).json()
    assert health["weight_version"] >= 2  # the server generated the second step from the first step's weights


def test_episodes_on_weights_the_trainer_never_pushed_stop_the_run_naming_the_version(server, tiny_llama3, tmp_path):
    from datasets import Dataset

    from fastgrpo import GRPOConfig, GRPOTrainer
    from fastgrpo.trainer.round_generation import StaleGenerationError

    def from_another_run(prompts, trainer):  # say, a second trainer pushing to the same server
        n = len(prompts)
        return {"prompt_ids": [[1, 2]] * n, "completion_ids": [[5, 6]] * n, "logprobs": [[-1.0, -1.0]] * n,
                "weight_versions": [[99, 99]] * n}

    port = int(server.base_url.rsplit(":", 1)[1])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, max_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                      bf16=False, disable_tqdm=True, use_vllm=True, vllm_mode="server",
                      vllm_server_host="127.0.0.1", vllm_server_port=port)
    trainer = GRPOTrainer(tiny_llama3, [lambda completions, **kw: [0.0] * len(completions)], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["hi"] * 2}), rollout_func=from_another_run)
    with pytest.raises(StaleGenerationError, match="version 99"):
        trainer.train()
    trainer.close()


# --- TRL 1.16's client ---------------------------------------------------------------


def test_trls_vllm_client_generates_what_generate_does(server, tiny_llama3):
    trl_client = pytest.importorskip("trl.generation.vllm_client")
    client = trl_client.VLLMClient(base_url=server.base_url)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("What is 2 + 2?", "Sum of 40 and 2")]
    theirs = client.generate(prompts, n=1, temperature=0.0, max_tokens=8, logprobs=0)
    with VLLMClient(base_url=server.base_url, timeout=60) as ours:
        mine = ours.generate(prompt_token_ids=prompts, max_tokens=8, temperature=0.0).results
    assert theirs["prompt_ids"] == prompts
    assert theirs["completion_ids"] == [r.completions[0].token_ids for r in mine]
    for lps, result in zip(theirs["logprobs"], mine):
        assert max(abs(a[0] - b) for a, b in zip(lps, result.completions[0].logprobs)) < 1e-6
    chat = client.chat([[{"role": "user", "content": "What is 2 + 2?"}]], temperature=0.0, max_tokens=5,
                       logprobs=0)
    expected = ChatTokens(tokenizer).prompt([{"role": "user", "content": "What is 2 + 2?"}])
    assert chat["prompt_ids"] == [expected] and len(chat["completion_ids"][0]) <= 5
    assert client.get_world_size() == 1
    # Its weight sync is NCCL's, for CUDA devices: on a CPU it says so at once, before touching the server.
    began = time.monotonic()
    with pytest.raises(NotImplementedError, match="CUDA"):
        client.init_communicator(device="cpu")
    assert time.monotonic() - began < 10


# --- vLLM's weight routes, driven by vLLM's own trainer-side engine --------------------------


def push_through_vllm_routes(base_url: str, model, world_size: int) -> None:
    """Push `model` as any trainer written for stock vLLM does: vLLM's HTTP client, the gloo trainer engine
    (fastgrpo's plugin registers it with vLLM's factory), a source over the module's parameters. The engine
    calls the four routes: init, then start, update and finish per push."""
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from fastgrpo.transfer.gloo import GlooTrainerInitInfo
    from fastgrpo.transfer.plugin import register

    register()
    client = HTTPVLLMWeightSyncClient(base_url, timeout=120)
    info = GlooTrainerInitInfo(rank=0, master_address="127.0.0.1", master_port=free_port(), world_size=world_size,
                               timeout_s=60)
    engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=ModuleSource(model))
    try:
        engine.send_weights()
    finally:
        engine.shutdown()


def logprobs_of(base_url: str, model_name: str, ids: list[int]) -> list[float]:
    body = {"model": model_name, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}
    choice = httpx.post(base_url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    return [next(iter(d.values()))["logprob"] for d in choice["prompt_logprobs"][1:]]


def hf_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_vllm_weight_routes_load_exactly_and_report_versions(server, model_name, tiny_llama3):
    ids = AutoTokenizer.from_pretrained(tiny_llama3)("What is 12 + 35? It is 47.")["input_ids"]
    model = perturbed(AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32), seed=11)
    assert max(abs(a - b) for a, b in zip(logprobs_of(server.base_url, model_name, ids), hf_logprobs(model, ids))) > 0.01
    version = httpx.get(server.base_url + "/health", timeout=30).json()["weight_version"]
    push_through_vllm_routes(server.base_url, model, world_size=2)
    gap = max(abs(a - b) for a, b in zip(logprobs_of(server.base_url, model_name, ids), hf_logprobs(model, ids)))
    assert gap < LOGPROB_TOL
    health = httpx.get(server.base_url + "/health", timeout=30).json()
    assert health["weight_version"] == version + 1 and health["status"] == "ok"
    # vLLM's own version follows ours, so /inference/v1/generate's spans name it.
    out = httpx.post(server.base_url + "/inference/v1/generate", timeout=60, json={
        "model": model_name, "token_ids": ids, "sampling_params": {"max_tokens": 2, "output_kind": 2}}).json()
    assert out["choices"][0]["weight_versions"] == [{"version": str(version + 1), "start": 0, "end": 2}]


def test_vllm_weight_routes_refuse_what_does_not_fit_before_any_collective(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        # TRL's NCCL init_info on a CPU server: named, at once.
        trl_info = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
                    "packed": True}
        response = http.post("/init_weight_transfer_engine", json={"init_info": trl_info})
        assert response.status_code == 400 and "GlooWeightTransferInitInfo" in response.json()["error"]["message"]
        wrong_size = {**trl_info, "world_size": 5}
        wrong_size.pop("packed")
        response = http.post("/init_weight_transfer_engine", json={"init_info": wrong_size})
        assert response.status_code == 400 and "world_size=5" in response.json()["error"]["message"]
        # A push without a group, or an update without a push.
        assert http.post("/update_weights", json={"update_info": {"names": []}}).status_code == 409
        assert http.get("/health").json()["status"] == "ok"


# --- a stock `vllm serve`, with fastgrpo's gloo backend ------------------------------------


@pytest.fixture(scope="module")
def stock_server(tiny_llama3, tmp_path_factory):
    """`vllm serve` itself (its console script needs a `vllm` distribution, so its module), dev routes on."""
    port = free_port()
    log = tmp_path_factory.mktemp("stock") / "vllm.log"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llama3, "--port", str(port),
             "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
             "--weight-transfer-config", '{"backend": "gloo"}'], stdout=out, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None, log.read_text()[-4000:]
        time.sleep(1)
    yield base_url
    process.terminate()
    process.wait(60)


def test_a_stock_vllm_serve_takes_pushes_through_fastgrpos_gloo_backend(stock_server, tiny_llama3):
    ids = AutoTokenizer.from_pretrained(tiny_llama3)("What is 12 + 35? It is 47.")["input_ids"]
    name = httpx.get(stock_server + "/v1/models", timeout=30).json()["data"][0]["id"]
    model = perturbed(AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32), seed=12)
    push_through_vllm_routes(stock_server, model, world_size=2)
    gap = max(abs(a - b) for a, b in zip(logprobs_of(stock_server, name, ids), hf_logprobs(model, ids)))
    assert gap < LOGPROB_TOL


def test_fastgrpos_trainer_refuses_a_stock_server_at_start_naming_why(stock_server, tiny_llama3, tmp_path):
    from fastgrpo.client import ServerError

    began = time.monotonic()
    with pytest.raises(ServerError, match="stock `vllm serve`") as error:
        VLLMClient(base_url=stock_server, timeout=30).wait_for_server(60)
    assert "fastgrpo vllm-serve" in str(error.value) and "/generate" in str(error.value)
    assert time.monotonic() - began < 15
