"""The server's lifespan: the engines start in the background (so /health can say "starting" meanwhile),
then vLLM's API over them; a start that fails or hangs ends the process, saying why."""

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
from argparse import Namespace
from collections.abc import Awaitable, Callable
from typing import NoReturn

from fastapi import FastAPI

from fastgrpo.serve.specs import model_specs
from fastgrpo.serve.state import ServerState
from fastgrpo.serve.vllm_api import init_vllm_api, sync_adapters

log = logging.getLogger("fastgrpo.serve")


def fail_start(state: ServerState, what: str, exc: Exception) -> NoReturn:
    """A server that cannot serve should not linger looking alive: say why and exit non-zero."""
    state.startup_error = f"{what} failed to start: {type(exc).__name__}: {exc}"
    log.exception("server failed to start")
    print(f"fastgrpo vllm-serve: error: {state.startup_error}", flush=True)
    state.engine.kill_processes()
    os._exit(1)


def start_engines(state: ServerState) -> None:
    settings = state.settings
    try:
        from transformers import AutoTokenizer  # here: slow to import, and only the server needs it

        state.engine.start()
        # After the engines: vLLM has found or fetched the model by now, whatever its format.
        state.specs = model_specs(settings.model, settings.revision)
        state.tokenizer = AutoTokenizer.from_pretrained(settings.model, revision=settings.revision)
    except Exception as exc:
        fail_start(state, "the engines", exc)


async def start_vllm_api(app: FastAPI, state: ServerState, vllm_args: Namespace) -> None:
    try:
        await init_vllm_api(app, state, vllm_args)
        if state.settings.chat_template:
            from vllm.renderers.chat_utils import load_chat_template  # here: vLLM is slow to import

            state.chat_template = load_chat_template(state.settings.chat_template)
        sync_adapters(app, state)
        state.vllm_api_ready = True
    except Exception as exc:
        fail_start(state, "vLLM's API", exc)


async def watch_engine(state: ServerState, starting: threading.Thread, started: Callable[[], Awaitable]) -> None:
    """Fail a start that other nodes never join, then watch the DP ranks for good (engines.watch).

    vLLM's head waits for remote engines without a limit: a node that never starts would leave the server
    "starting" forever."""
    engine, s = state.engine, state.settings
    deadline = time.monotonic() + s.join_timeout_s
    while starting.is_alive():
        if engine.engine is None and time.monotonic() > deadline and s.local_ranks < s.data_parallel_size:
            state.startup_error = (
                f"{engine.describe_remote_ranks()} did not join within {s.join_timeout_s:.0f} s (--join_timeout): "
                f"start `fastgrpo vllm-serve --headless` on the other node(s) with the same model and DP flags, "
                f"--data_parallel_start_rank at their first rank, and --data_parallel_address "
                f"{s.data_parallel_address}:{s.data_parallel_rpc_port} reachable from there")
            print(f"fastgrpo vllm-serve: error: {state.startup_error}", flush=True)
            log.error(state.startup_error)
            engine.kill_processes()
            os._exit(1)
        await asyncio.sleep(0.25 if engine.engine is not None else 1)
    if engine.engine is not None and state.tokenizer is not None:
        await started()
        await engine.watch()


def lifespan(vllm_args: Namespace):
    """FastAPI's lifespan for an app whose `app.state.server` is the ServerState; `vllm_args`: vLLM's server
    arguments (vllm_api.frontend_args)."""

    @contextlib.asynccontextmanager
    async def serving(app: FastAPI):
        state: ServerState = app.state.server
        thread = threading.Thread(target=start_engines, args=(state,), name="engine-start", daemon=True)
        thread.start()
        watchdog = asyncio.create_task(watch_engine(state, thread, lambda: start_vllm_api(app, state, vllm_args)))
        yield
        watchdog.cancel()
        state.engine.shutdown()
        shutil.rmtree(state.adapters.root, ignore_errors=True)

    return serving
