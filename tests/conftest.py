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
def server_factory(tmp_path_factory):
    started = []

    def start(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(args, tmp_path_factory.mktemp("server") / "server.log", env=env)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
