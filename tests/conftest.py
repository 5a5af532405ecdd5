import os

import pytest

from fastgrpo.models import build_tiny_model
from fastgrpo.serve.launcher import ServerProcess

# Keep vLLM's CPU KV cache small in every engine the tests start.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    """A tiny random Qwen2 model folder (a few MB) with a trained tokenizer and chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> str:
    """A tiny Llama with Llama 3's chat markers and JSON tool calls (vLLM's llama3_json tool parser)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), arch="llama", chat_format="llama3")


def _serve(tmp_path_factory):
    started = []

    def start(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log", env=env)
        started.append(server)
        server.wait_ready()
        return server

    return start, started


# Servers stop as soon as their users are done: an idle vLLM CPU server is not free (its workers' gloo
# threads wake about 1,300 times a second), and a suite that kept them all slowed every later test.
@pytest.fixture(scope="module")
def server_factory(tmp_path_factory):
    """Start servers that live until the module's last test (for module fixtures that share one)."""
    start, started = _serve(tmp_path_factory)
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def transient_server_factory(tmp_path_factory):
    """Start servers for one test; they stop when it ends."""
    start, started = _serve(tmp_path_factory)
    yield start
    for server in started:
        server.stop()
