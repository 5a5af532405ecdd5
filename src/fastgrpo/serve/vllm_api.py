"""vLLM's own API, served from our engine: built from vLLM's serving layer, not rewritten.

The routes are vLLM's, as `vllm serve` has them (serve/routes/vllm.py): the OpenAI API (streaming, logprobs
and top_logprobs, structured outputs, every tool-call and reasoning parser vLLM ships), /tokenize,
/detokenize, /version, Prometheus /metrics, the token-in-token-out /inference/v1/generate, and the RL routes
TRL's client calls (/get_world_size, /server_info, /pause, /resume, /is_paused); serve/routes/vllm_weights.py
answers vLLM's four weight routes with our push machinery. This module gives them our engine.

vLLM's serving classes talk to an engine client; they get `AdmittedEngine`: our AsyncLLM with `generate`
changed so that each generation is admitted like /generate's (serve/admission.py), ends with a 503 when the
engine dies, and reports what it ran under to its HTTP request's `Tap`. `WeightVersionTags` gives each HTTP
request a Tap and writes the weight versions into the response; serve/routes/recordings.py records
from it. vLLM's modules are imported in the functions that use them: they are slow to import.
"""

import asyncio
import contextvars
from argparse import Namespace
import json
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI

from fastgrpo.serve.admission import Ticket, admit, check_not_mixed, release
from fastgrpo.serve.engines import ServerSettings, refused_request
from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.recordings import is_recorded_chat
from fastgrpo.serve.state import ServerState

log = logging.getLogger("fastgrpo.serve")
# Generation routes: a Tap each, and weight versions in their answers.
TAPPED_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Tap:
    """What the engine requests of one HTTP request ran under, and (when recording) what they generated."""

    tickets: list[Ticket] = field(default_factory=list)
    prompt_ids: list[int] | None = None  # generate from these tokens, not vLLM's rendering (a rollout's next call)
    record: bool = False
    used_prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False

    def versions(self) -> list[int] | None:
        spans = [t.versions for t in self.tickets]
        return [min(s[0] for s in spans), max(s[1] for s in spans)] if spans else None

    def add(self, output) -> None:
        """One RequestOutput (a delta when streaming, else cumulative and final) of a recorded call (n=1)."""
        if not self.record or not output.outputs:
            return
        completion = output.outputs[0]
        if not self.used_prompt_ids:
            self.used_prompt_ids = list(output.prompt_token_ids or [])
        new = list(completion.token_ids)
        if output.finished and len(new) >= len(self.token_ids) and new[:len(self.token_ids)] == self.token_ids:
            new = new[len(self.token_ids):]  # cumulative output: only what this tap has not seen
        self.token_ids += new
        tail = (completion.logprobs or [])[-len(new):] if new else []
        self.logprobs += [position[t].logprob for position, t in zip(tail, new)]
        self.finished = self.finished or output.finished


TAP: contextvars.ContextVar[Tap | None] = contextvars.ContextVar("fastgrpo_tap", default=None)
_END = object()


class AdmittedEngine:
    """vLLM's engine client as vLLM's serving layer sees it: the AsyncLLM, with generation admitted like ours."""

    def __init__(self, state: ServerState):
        self._state = state

    def __getattr__(self, name):
        return getattr(self._state.engine.engine, name)

    def generate(self, prompt, sampling_params, request_id, **kwargs):
        # The tap is read now, in the handler's context (the generator's body may run in a streaming task).
        return self._admitted(prompt, sampling_params, request_id, TAP.get(), kwargs)

    async def _admitted(self, prompt, params, request_id, tap: Tap | None, kwargs):
        state, engine = self._state, self._state.engine
        if not engine.alive:
            raise ApiError(503, "engine_dead", str(engine.dead_error()))
        lora = kwargs.pop("lora_request", None)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt and tap is not None and tap.prompt_ids:
            prompt = {k: v for k, v in prompt.items() if k not in ("prompt", "prompt_token_offsets")}
            prompt["prompt_token_ids"] = list(tap.prompt_ids)
        if tap is not None and tap.record and params.logprobs is None:
            params = params.clone()
            params.logprobs = 0  # the sampled tokens' logprobs, for the recording; the answer shows none
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(ticket: Ticket):
            salted = prompt
            if isinstance(prompt, dict):
                theirs = prompt.get("cache_salt")
                salted = {**prompt, "cache_salt": ticket.salt if not theirs else f"{ticket.salt}-{theirs}"}
            try:
                async for output in engine.engine.generate(
                        salted, params, request_id,
                        lora_request=ticket.adapter.request if ticket.adapter is not None else None, **kwargs):
                    queue.put_nowait(output)
            except Exception as exc:
                cause = refused_request(exc)
                if cause is None or engine.error is not None:
                    raise
                # vLLM's serving layer answers a ValueError with a 400 (stock vLLM answers these with a 500).
                raise ValueError(f"the engine refused the request: {cause}") from exc
            finally:
                queue.put_nowait(_END)

        ticket, running = await admit(state, lora.lora_name if lora is not None else None, pump)
        if tap is not None:
            tap.tickets.append(ticket)
        engine.requests.add(request_id)
        dead = asyncio.ensure_future(engine.failure_event().wait())
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, dead}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    raise ApiError(503, "engine_dead", str(engine.dead_error()))
                output = getter.result()
                if output is _END:
                    break
                check_not_mixed(ticket)
                if tap is not None:
                    tap.add(output)
                yield output
            await running  # what the engine raised (vLLM's serving answers its ValueErrors with a 400)
            check_not_mixed(ticket)
        finally:
            dead.cancel()
            if not running.done():
                running.cancel()  # vLLM's generate aborts the request in the engines
            engine.requests.discard(request_id)
            await release(state, ticket)


# ---------------------------------------------------------------------------
# Building vLLM's API into our app.


def frontend_args(settings: ServerSettings) -> Namespace:
    """vLLM's server arguments, as `vllm serve` would parse them for this server's flags."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", settings.model, "--disable-uvicorn-access-log"]
    if settings.tool_call_parser:
        argv += ["--tool-call-parser", settings.tool_call_parser, "--enable-auto-tool-choice"]
    if settings.chat_template:
        argv += ["--chat-template", settings.chat_template]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    if settings.reasoning_parser:
        args.structured_outputs_config.reasoning_parser = settings.reasoning_parser
    validate_parsed_serve_args(args)
    return args


async def init_vllm_api(app: FastAPI, state: ServerState, args: Namespace) -> None:
    """vLLM's serving classes on `app.state`, over our engine (once the engines run)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    await init_app_state(AdmittedEngine(state), app.state, args, ("generate",))


def sync_adapters(app: FastAPI, state: ServerState) -> None:
    """vLLM's routes resolve `model` names through its model registry: list our adapters' current versions."""
    models = getattr(app.state, "openai_serving_models", None)
    if models is not None:
        models.lora_requests = {name: a.request for name, a in state.adapters.current.items()}


# ---------------------------------------------------------------------------
# Weight versions in vLLM's answers.


class WeightVersionTags:
    """ASGI middleware on TAPPED_PATHS: each request gets a Tap; its answer says the weight versions it ran under,
    `weight_versions: [first, last]` on each choice (in a stream, on the chunk that finishes the choice)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not (scope["path"] in TAPPED_PATHS or is_recorded_chat(scope["path"])):
            return await self.app(scope, receive, send)
        tap = Tap()
        token = TAP.set(tap)
        start, body, streaming = None, [], False

        async def tagging_send(message):
            nonlocal start, streaming
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                if streaming:
                    return await send(message)
                start = message  # held until the body is whole: its length changes
                return None
            if message["type"] != "http.response.body":
                return await send(message)
            if streaming:
                return await send({**message, "body": tag_stream_chunk(message.get("body", b""), tap.versions())})
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            whole = tag_json(b"".join(body), tap.versions())
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(whole)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": whole})

        try:
            await self.app(scope, receive, tagging_send)
        finally:
            TAP.reset(token)


def tag_json(body: bytes, versions: list[int] | None) -> bytes:
    if versions is None:
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict) and isinstance(data.get("choices"), list):
        for choice in data["choices"]:
            if isinstance(choice, dict):
                choice["weight_versions"] = versions
        return json.dumps(data, separators=(",", ":")).encode()
    return body


def tag_stream_chunk(chunk: bytes, versions: list[int] | None) -> bytes:
    """Server-sent events: `data: {json}` lines; a chunk whose choice finishes gets the versions."""
    if versions is None or b'"finish_reason":"' not in chunk.replace(b'": "', b'":"'):
        return chunk
    lines = chunk.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data: {"):
            tagged = tag_finished_choices(line[6:], versions)
            if tagged is not None:
                lines[i] = b"data: " + tagged
    return b"\n".join(lines)


def tag_finished_choices(data: bytes, versions: list[int]) -> bytes | None:
    try:
        event = json.loads(data)
    except ValueError:
        return None
    finished = [c for c in event.get("choices") or [] if isinstance(c, dict) and c.get("finish_reason")]
    if not finished:
        return None
    for choice in finished:
        choice["weight_versions"] = versions
    return json.dumps(event, separators=(",", ":")).encode()
