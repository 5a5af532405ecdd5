"""VLLMClient's retries and error messages against a scripted server (httpx.MockTransport): no vLLM, seconds."""

import time

import httpx
import pytest
import torch

import fastgrpo.client as client_module
from fastgrpo.client import ServerError, ServerUnavailable, VLLMClient

OK = {"status": "ok", "weight_transfer_backend": "gloo", "dtype": "float32", "instance": "i1"}


@pytest.fixture
def scripted(monkeypatch):
    """Answers each request with routes[path]: a dict (200 JSON), an httpx.Response, an exception to raise, or a
    list of those taken in turn (the last one repeats). `calls` counts requests per path."""
    routes, calls, real_client = {"/health": OK}, {}, httpx.Client

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        calls[path] = calls.get(path, 0) + 1
        answer = routes[path]
        if isinstance(answer, list):
            answer = answer[min(calls[path], len(answer)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)

    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    return routes, calls


def refused():
    return httpx.ConnectError("[Errno 111] Connection refused")


def test_a_refused_connection_is_tried_three_times_then_named(scripted):
    routes, calls = scripted
    routes["/reset_prefix_cache"] = refused()
    c = VLLMClient(port=1234, timeout=5)
    began = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"cannot connect to the fastgrpo server at http://127.0.0.1:1234"):
        c.reset_prefix_cache()
    assert calls["/reset_prefix_cache"] == 3 and time.monotonic() - began >= 1.5  # waits of 0.5 s and 1 s


def test_a_refused_connection_succeeds_on_a_later_try(scripted):
    routes, calls = scripted
    routes["/adapters"] = [refused(), {"adapters": []}]
    assert VLLMClient(timeout=5).adapters() == [] and calls["/adapters"] == 2


def test_requests_that_may_change_state_are_not_retried(scripted):
    routes, calls = scripted
    routes["/adapters/a"] = refused()
    with pytest.raises(ServerUnavailable, match="cannot connect"):
        VLLMClient(timeout=5).delete_adapter("a")
    assert calls["/adapters/a"] == 1


def test_timeouts_and_broken_connections_are_not_retried_and_say_what_to_check(scripted):
    routes, calls = scripted
    routes["/generate"] = httpx.ReadTimeout("timed out")
    c = VLLMClient(timeout=5, request_timeout=7)
    with pytest.raises(TimeoutError, match=r"POST /generate to .* got no answer within 7 s .*vllm_generation_timeout"):
        c.generate(["x"])
    routes["/generate"] = httpx.RemoteProtocolError("Server disconnected")
    with pytest.raises(ServerUnavailable, match=r"broke during POST /generate \(RemoteProtocolError.*still running"):
        c.generate(["x"])
    assert calls["/generate"] == 2


def test_waiting_polls_until_the_server_serves(scripted):
    routes, calls = scripted
    starting = httpx.Response(503, json={"status": "starting"})
    routes["/health"] = [refused(), starting, OK]
    assert VLLMClient(timeout=10).info == OK and calls["/health"] == 3


def test_a_server_that_stays_starting_fails_at_the_timeout_naming_the_last_answer(scripted):
    routes, _ = scripted
    routes["/health"] = httpx.Response(503, json={"status": "starting"})
    began = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"was not ready within 2 s \(last: status 'starting'\)"):
        VLLMClient(timeout=2)
    assert 2 <= time.monotonic() - began < 5


def test_nothing_listening_fails_sooner_with_the_hint(scripted):
    routes, _ = scripted
    routes["/health"] = refused()
    began = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"nothing listens at http://127.0.0.1:8000 \(.*refused\): start it"):
        VLLMClient(timeout=30, nothing_listening=(1.0, "start it"))
    assert time.monotonic() - began < 5


def test_a_listening_server_is_waited_for_past_the_nothing_listening_limit(scripted):
    routes, calls = scripted
    routes["/health"] = [httpx.Response(503, json={"status": "starting"})] * 3 + [OK]
    assert VLLMClient(timeout=10, nothing_listening=(0.5, "start it")).info == OK and calls["/health"] == 4


def test_degraded_is_returned_and_failed_is_an_error(scripted):
    routes, _ = scripted
    routes["/health"] = httpx.Response(503, json={**OK, "status": "degraded"})
    assert VLLMClient(timeout=5).info["status"] == "degraded"
    routes["/health"] = httpx.Response(503, json={"status": "failed"})
    with pytest.raises(ServerError, match="failed"):
        VLLMClient(timeout=5)


def test_a_stock_vllm_server_is_named(scripted):
    routes, _ = scripted
    routes["/health"] = httpx.Response(200)
    routes["/version"] = {"version": "0.32.0"}
    with pytest.raises(ServerError, match=r"is a stock `vllm serve` \(vLLM 0.32.0\)"):
        VLLMClient(timeout=5)


class FakeSender:
    backend = "gloo"

    def close(self):
        pass


def test_a_push_whose_group_the_server_closed_reopens_it_once(scripted, monkeypatch):
    routes, _ = scripted
    routes["/weights/close"] = {}
    opened, answers = [], [ServerError(409, "group_closed", "closed"), {"weight_version": 5},
                           ServerError(409, "group_closed", "closed"), ServerError(409, "group_closed", "closed")]

    def push(*args):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(client_module, "push_weights", push)
    monkeypatch.setattr(VLLMClient, "init_weight_transfer",
                        lambda self, backend: (opened.append(backend), setattr(self, "sender", FakeSender())))
    c = VLLMClient(timeout=5)
    assert c.update_weights({"w": torch.zeros(2)}, weight_version=5) == 5 and opened == ["gloo", "gloo"]
    assert c.pushed_instance == "i1"
    with pytest.raises(ServerError, match="group_closed"):  # closed again after the reopen: raised
        c.update_weights({"w": torch.zeros(2)})
    assert len(opened) == 3 and c.sender is None  # the open group failed, then the reopened one
