"""Pure pieces of the server, tested alone: load-based dispatch, push validation, flags."""

import random

import pytest

from fastgrpo.serve.specs import ModelSpecs, check_push
from fastgrpo.serve.engines import GenerationEngine, ServerSettings, check_devices, cpu_binding, split_by_load


def test_whole_prompts_go_to_the_least_loaded_rank_when_that_balances():
    # B1's round: 4 prompts x 8 completions x 64 tokens on 2 ranks: two whole prompts each, none cut.
    assert split_by_load([(8, 64)] * 4, [0, 0]) == [[(0, 8)], [(1, 8)], [(0, 8)], [(1, 8)]]
    # Work already running counts: the idle rank takes more.
    assert split_by_load([(8, 64)] * 4, [0, 1024]) == [[(0, 8)], [(0, 8)], [(0, 8)], [(1, 8)]]


def test_a_prompt_that_asks_for_ten_times_the_tokens_is_cut_across_ranks():
    prompts = [(8, 640), (8, 64), (8, 64), (8, 64)]
    plan = split_by_load(prompts, [0, 0])
    loads = [0, 0]
    for (n, cost), chunks in zip(prompts, plan):
        assert sum(count for _, count in chunks) == n  # every completion, once
        for rank, count in chunks:
            loads[rank] += count * cost
    # Whole prompts would leave 5120 tokens against 1536. Cut: 3 of the long completions move, then 2 short ones.
    assert plan == [[(0, 5), (1, 3)], [(0, 2), (1, 6)], [(1, 8)], [(1, 8)]] and loads == [3328, 3328]


def test_split_by_load_is_near_optimal_and_keeps_every_completion():
    rng = random.Random(0)
    for _ in range(200):
        prompts = [(rng.randint(1, 16), rng.randint(1, 500)) for _ in range(rng.randint(1, 12))]
        start = [rng.randint(0, 300) for _ in range(rng.randint(1, 4))]
        plan = split_by_load(prompts, start)
        loads = list(start)
        for (n, cost), chunks in zip(prompts, plan):
            assert sum(c for _, c in chunks) == n and len({r for r, _ in chunks}) == len(chunks)
            for rank, count in chunks:
                loads[rank] += count * cost
        # No completion can move from the busiest rank to the idlest and narrow the gap.
        busy, idle = max(range(len(loads)), key=loads.__getitem__), min(range(len(loads)), key=loads.__getitem__)
        on_busy = [cost for (n, cost), chunks in zip(prompts, plan) if any(r == busy for r, _ in chunks)]
        assert all(cost >= loads[busy] - loads[idle] for cost in on_busy) or busy == idle


def test_check_push_names_the_tensor_and_the_problem():
    specs = ModelSpecs({"a.weight": ("bfloat16", (4, 4)), "b.bias": ("bfloat16", (4,))})
    assert check_push(specs, ["a.weight", "b.bias"], ["float32", "bfloat16"], [[4, 4], [4]]) == []
    problems = check_push(specs, ["a.weight", "c.weight", "b.bias", "b.bias"],
                          ["int32", "float32", "float32", "float32"], [[4, 4], [1], [5], [4]])
    text = " | ".join(problems)
    assert "'a.weight' has dtype int32" in text
    assert "unknown weight name 'c.weight'" in text
    assert "'b.bias' has shape [5], the served model expects [4]" in text
    assert "'b.bias' appears twice" in text


def test_cpu_dp_ranks_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    # vLLM gives local DP rank d the '|'-separated lists d*TP..(d+1)*TP-1.
    assert cpu_binding(ServerSettings("m", data_parallel_size=2)) == "0,1|2,3"
    assert cpu_binding(ServerSettings("m", data_parallel_size=2, tensor_parallel_size=2)) == "0|1|2|3"
    assert cpu_binding(ServerSettings("m")) == "0,1,2,3"  # every core, none kept back
    # A head that runs 1 of 2 ranks binds its own rank alone, to every core.
    assert cpu_binding(ServerSettings("m", data_parallel_size=2, data_parallel_size_local=1)) == "0,1,2,3"
    with pytest.raises(ValueError, match="needs 8 CPU cores"):
        cpu_binding(ServerSettings("m", data_parallel_size=8))


def test_dp_ranks_say_where_they_run(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    engine = GenerationEngine(ServerSettings("m", data_parallel_size=3, data_parallel_size_local=2), True, "gloo")
    assert [(r.index, r.node, r.devices) for r in engine.ranks] == [(0, "local", "0"), (1, "local", "1"),
                                                                   (2, "remote", None)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    engine = GenerationEngine(ServerSettings("m", data_parallel_size=2, tensor_parallel_size=2), False, "nccl")
    assert [r.devices for r in engine.ranks] == ["4,5", "6,7"]
    with pytest.raises(ValueError, match="needs 8 GPUs, 4 are visible"):
        check_devices(ServerSettings("m", data_parallel_size=4, tensor_parallel_size=2), on_cpu=False)


def test_multi_node_flags_fail_at_start_naming_the_fix():
    from fastgrpo.cli import build_parser
    from fastgrpo.serve.cli import validate

    parser = build_parser()

    def refused(*flags):
        with pytest.raises(SystemExit) as error:
            validate(parser.parse_args(["vllm-serve", "--model", "m", *flags]))
        return str(error.value)

    assert "--data_parallel_address" in refused("--data-parallel-size", "2", "--data-parallel-size-local", "1")
    assert "below --data_parallel_size" in refused("--headless", "--data-parallel-size", "2")
    assert "--data_parallel_start_rank in 1..1" in refused(
        "--headless", "--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "h")
    assert "for --headless nodes" in refused("--data-parallel-start-rank", "1", "--data-parallel-size", "2")
    assert "in 1..--data_parallel_size (2)" in refused("--data-parallel-size", "2", "--data-parallel-size-local", "3")
    # CUDA IPC pushes are unpickled in the engines: never without an API key.
    assert "--api_key KEY" in refused("--weight-transfer-backend", "ipc")
    validate(parser.parse_args(["vllm-serve", "--model", "m", "--weight-transfer-backend", "ipc", "--api-key", "k"]))
    # ipc and shm have the engines read the trainer's memory: every DP rank on the trainer's machine.
    assert "every DP rank must run on the trainer's machine" in refused(
        "--weight-transfer-backend", "shm", "--data-parallel-size", "2", "--data-parallel-size-local", "1",
        "--data-parallel-address", "h")
    validate(parser.parse_args(["vllm-serve", "--model", "m", "--weight-transfer-backend", "shm",
                                "--data-parallel-size", "2"]))
    ok = parser.parse_args(["vllm-serve", "--model", "m", "--headless", "--data-parallel-size", "2",
                            "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1",
                            "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", "13400"])
    validate(ok)
    assert (ok.data_parallel_rpc_port, ok.join_timeout, ok.rank_timeout, ok.load_balance) == (13400, 600.0, 120.0,
                                                                                              "tokens")


def test_serve_flags_both_spellings_defaults_and_bad_values(capsys):
    from fastgrpo.cli import build_parser
    from fastgrpo.serve.cli import validate

    parser = build_parser()
    args = parser.parse_args(["vllm-serve", "--model", "m"])
    assert (args.tensor_parallel_size, args.data_parallel_size, args.host, args.port) == (1, 1, "0.0.0.0", 8000)
    assert (args.gpu_memory_utilization, args.dtype, args.max_model_len, args.enable_prefix_caching) == (0.9, "auto", None, None)
    assert args.revision is None
    for snake, dash, value, attr in [
        ("--tensor_parallel_size", "--tensor-parallel-size", "2", "tensor_parallel_size"),
        ("--data_parallel_size", "--data-parallel-size", "3", "data_parallel_size"),
        ("--gpu_memory_utilization", "--gpu-memory-utilization", "0.5", "gpu_memory_utilization"),
        ("--max_model_len", "--max-model-len", "1024", "max_model_len"),
        ("--enable_prefix_caching", "--enable-prefix-caching", "true", "enable_prefix_caching"),
        ("--max_num_seqs", "--max-num-seqs", "64", "max_num_seqs"),
        ("--kv_cache_space", "--kv-cache-space", "2", "kv_cache_space"),
        ("--api_key", "--api-key", "k", "api_key"),
        ("--log_level", "--log-level", "debug", "log_level"),
        ("--enforce_eager", "--enforce-eager", "false", "enforce_eager"),
    ]:
        a = parser.parse_args(["vllm-serve", "--model", "m", snake, value])
        b = parser.parse_args(["vllm-serve", "--model", "m", dash, value])
        assert getattr(a, attr) == getattr(b, attr) is not None
    help_text = parser._subparsers._group_actions[0].choices["vllm-serve"].format_help()
    for flag in ["--revision", "--host", "--port", "--dtype", "--enforce-eager", "--api-key", "--kv-cache-space"]:
        assert flag in help_text
    bad = parser.parse_args(["vllm-serve", "--model", "m", "--gpu-memory-utilization", "1.5"])
    with pytest.raises(SystemExit, match="--gpu_memory_utilization must be in"):
        validate(bad)


@pytest.mark.parametrize("address,peer,ok", [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "::1", True),  # both loopback
    ("10.0.0.5", "10.0.0.5", True),
    ("10.0.0.5", "::ffff:10.0.0.5", True),  # an IPv4 peer seen through a dual-stack socket
    ("10.0.0.6", "10.0.0.5", False),
    ("127.0.0.1", "10.0.0.5", False),  # a remote client naming the server's own loopback
    ("trainer.example", "10.0.0.5", False),  # a name would need a DNS lookup: refused before any
    ("not an address", "127.0.0.1", False),
])
def test_the_group_address_must_be_the_requesters_own(address, peer, ok):
    from fastgrpo.serve.errors import ApiError
    from fastgrpo.serve.weights import check_group_address

    if ok:
        check_group_address(address, peer, any_address=False)
    else:
        with pytest.raises(ApiError) as error:
            check_group_address(address, peer, any_address=False)
        assert error.value.status == 400 and error.value.field == "master_address"
        assert "--weight_transfer_any_address" in error.value.message
    check_group_address(address, peer, any_address=True)  # the escape hatch accepts anything


def test_weight_transfer_backend_auto_follows_the_build_and_ipc_needs_a_gpu():
    assert ServerSettings("m").engine_backend(on_cpu=True) == "gloo"
    assert ServerSettings("m").engine_backend(on_cpu=False) == "nccl"
    assert ServerSettings("m", weight_transfer_backend="ipc").engine_backend(on_cpu=False) == "ipc"
    assert ServerSettings("m", weight_transfer_backend="shm").engine_backend(on_cpu=True) == "shm"
    with pytest.raises(ValueError, match="needs GPUs.*gloo \\(auto\\), or shm"):
        ServerSettings("m", weight_transfer_backend="ipc").engine_backend(on_cpu=True)


@pytest.mark.parametrize("peer, loopback", [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
                                            ("10.0.0.5", False), (None, False), ("testclient", False)])
def test_ipc_pushes_are_taken_from_loopback_only(peer, loopback):
    from fastgrpo.serve.weights import is_loopback

    assert is_loopback(peer) is loopback


# --- weight versions in vLLM's answers (serve/vllm_api.py) ---------------------------------


def test_weight_versions_go_on_every_choice_and_on_the_stream_chunk_that_finishes_one():
    import json

    from fastgrpo.serve.vllm_api import tag_json, tag_stream_chunk

    body = json.dumps({"id": "x", "choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]}).encode()
    assert [c["weight_versions"] for c in json.loads(tag_json(body, [3, 4]))["choices"]] == [[3, 4], [3, 4]]
    assert tag_json(body, None) == body  # nothing generated (an error before admission): untouched
    assert tag_json(b"not json", [1, 1]) == b"not json"
    going = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    assert tag_stream_chunk(going, [3, 3]) == going
    done = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
            b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\ndata: [DONE]\n\n')
    lines = tag_stream_chunk(done, [3, 5]).split(b"\n")
    assert json.loads(lines[0][6:])["choices"][0]["weight_versions"] == [3, 5]
    assert lines[2:] == done.split(b"\n")[2:]  # the usage chunk and [DONE] as they were


# --- routers alone, on a bare app: their state through the `State` dependency, no engine started ----------


@pytest.fixture
def unstarted_state():
    """A server's state before its engines start (GenerationEngine.start never runs)."""
    import shutil

    from fastgrpo.serve.adapters import AdapterRegistry
    from fastgrpo.serve.recordings import Recorder
    from fastgrpo.serve.state import ServerState

    settings = ServerSettings("m")
    state = ServerState(settings, GenerationEngine(settings, True, "gloo"), AdapterRegistry(), Recorder())
    yield state
    shutil.rmtree(state.adapters.root, ignore_errors=True)


def bare_app(state, *routers, middleware=()):
    from fastapi import FastAPI

    from fastgrpo.serve.errors import install_error_handlers

    app = FastAPI()
    app.state.server = state
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    for cls, kwargs in middleware:
        app.add_middleware(cls, **kwargs)
    return app


def test_health_alone_says_starting_then_failed_and_never_200(unstarted_state):
    from fastapi.testclient import TestClient

    from fastgrpo.serve.routes import health

    with TestClient(bare_app(unstarted_state, health.router)) as http:
        response = http.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert (body["status"], body["model"], body["device_type"], body["weight_transfer_backend"]) == (
            "starting", "m", "cpu", "gloo")
        assert [r["state"] for r in body["dp_ranks"]] == ["starting"] and body["weight_version"] == 0
        unstarted_state.startup_error = "the engines failed to start: no such model"
        response = http.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "failed"


def test_errors_are_the_documented_json_and_a_bug_answers_500_and_the_server_keeps_serving(unstarted_state):
    from fastapi import APIRouter
    from fastapi.testclient import TestClient

    from fastgrpo.serve.routes import cache, generate

    buggy = APIRouter()

    @buggy.get("/bug")
    async def bug():
        raise RuntimeError("boom")

    unstarted_state.engine.error = "EngineCore_DP0 (exit code -9) died"
    # Starlette re-raises an unexpected error once its handler has answered (uvicorn then logs it); not here.
    app = bare_app(unstarted_state, generate.router, cache.router, buggy)
    with TestClient(app, raise_server_exceptions=False) as http:
        cases = [
            (http.post("/generate", json={"prompts": ["x"], "n": 0}), 400, "invalid_request", "n"),  # a 422 before
            (http.post("/generate", content=b"{", headers={"content-type": "application/json"}), 400,
             "invalid_request", "body"),
            (http.get("/generate"), 405, "method_not_allowed", None),
            (http.get("/no/such/route"), 404, "not_found", None),
            (http.post("/reset_prefix_cache"), 503, "engine_dead", None),  # an ApiError
            (http.get("/bug"), 500, "internal", None),
        ]
        for response, status, kind, field in cases:
            assert response.status_code == status, response.text
            assert response.json().keys() == {"error", "type", "field"}
            assert (response.json()["type"], response.json()["field"]) == (kind, field), response.text
        assert "RuntimeError: boom. This is a bug in the server" in cases[-1][0].json()["error"]
        assert "EngineCore_DP0 (exit code -9) died" in cases[-2][0].json()["error"]
        assert "greater than or equal to 1" in cases[0][0].json()["error"]
        assert http.post("/generate", json={"prompts": ["x"], "n": 0}).status_code == 400  # still serving


def test_the_gate_wants_the_key_then_a_ready_server_in_each_paths_error_shape(unstarted_state):
    from fastapi.testclient import TestClient

    from fastgrpo.serve.gate import AuthAndReadiness
    from fastgrpo.serve.routes import health

    app = bare_app(unstarted_state, health.router,
                   middleware=[(AuthAndReadiness, {"state": unstarted_state, "api_key": "k"})])
    key = {"authorization": "Bearer k"}
    with TestClient(app) as http:
        assert http.get("/health").json()["status"] == "starting"  # no key needed, never refused as not ready
        ours, openai = http.post("/generate", json={}), http.post("/v1/completions", json={})
        assert ours.status_code == openai.status_code == 401
        assert ours.json()["type"] == "unauthorized" and "Authorization: Bearer" in ours.json()["error"]
        assert openai.json()["error"]["type"] == "unauthorized" and openai.json()["error"]["code"] == 401
        refused = http.post("/generate", json={}, headers=key)
        assert refused.status_code == 503 and refused.json()["type"] == "not_ready"
        assert http.get("/openapi.json", headers=key).status_code == 200  # the docs are open while starting
        unstarted_state.startup_error = "vLLM's API failed to start: ValueError: x"
        refused = http.post("/v1/completions", json={}, headers=key)
        assert refused.status_code == 503 and "vLLM's API failed to start" in refused.json()["error"]["message"]
