"""The server's HTTP app: our routes (health, generate, prefix cache) and routers: weights.py (weight sync, ours
and vLLM's routes), adapters.py (LoRA), recordings.py (agents' rollouts recorded through the OpenAI chat
route), and vLLM's own API (vllm_api.py)."""

import asyncio
import contextlib
import logging
import os
import re
import shutil
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fastgrpo.serve import errors
from fastgrpo.serve.disconnects import CancelAbandoned
from fastgrpo.serve.protocol import (
    Completion,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    PromptResult,
    SamplingFields,
)
from fastgrpo.serve import DEFAULT_MAX_ROLLOUTS
from fastgrpo.serve.engines import EngineDead, EngineRejected, GenerationEngine, ServerSettings
from fastgrpo.serve.specs import model_specs
from fastgrpo.serve.admission import admit, check_not_mixed, release
from fastgrpo.serve.state import ApiError, ServerState, error_response
from fastgrpo.serve.vllm_api import (
    WeightVersionTags,
    frontend_args,
    include_vllm_routes,
    init_vllm_api,
    openai_error,
    openai_shaped,
    sync_adapters,
)

log = logging.getLogger("fastgrpo.serve")


# ---------------------------------------------------------------------------
# Building prompts and sampling parameters.


def sampling_params(fields: SamplingFields, prompt_logprobs: bool = False, seed: int | None = None,
                    max_tokens: int | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        output_kind=RequestOutputKind.FINAL_ONLY,  # one output holding all n completions
        n=fields.n, temperature=fields.temperature, top_p=fields.top_p,
        top_k=0 if fields.top_k in (-1, 0) else fields.top_k, min_p=fields.min_p,
        repetition_penalty=fields.repetition_penalty, presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty, max_tokens=max_tokens or fields.max_tokens,
        min_tokens=fields.min_tokens,
        seed=fields.seed if seed is None else seed, stop=fields.stop, stop_token_ids=fields.stop_token_ids,
        ignore_eos=fields.ignore_eos, logprobs=0, prompt_logprobs=0 if prompt_logprobs else None,
    )


def tokenize_prompts(state: ServerState, req: GenerateRequest) -> list[list[int]]:
    tok = state.tokenizer
    if req.prompt_token_ids is not None:
        check_vocabulary(state, req.prompt_token_ids, "prompt_token_ids")
        return req.prompt_token_ids
    if req.messages is not None:
        return [tok.apply_chat_template([m.model_dump() for m in conv], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"] for conv in req.messages]
    return [tok(p, add_special_tokens=False)["input_ids"] for p in req.prompts]


def field_named_in(message: str, fields) -> str | None:
    """The request field an engine's error message is about, when it names one."""
    words = set(re.findall(r"[a-z_]+", message.lower()))
    return next((f for f in fields if f in words), None)


def check_vocabulary(state: ServerState, prompts: list[list[int]], field_name: str) -> None:
    vocab = len(state.tokenizer)
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, "invalid_request", f"prompt {i} has token ids outside the vocabulary [0, {vocab}): "
                           f"{bad[:5]}", field_name)


def check_lengths(state: ServerState, prompts: list[list[int]], max_tokens: int | list[int], field_name: str) -> None:
    limit = state.max_model_len
    if limit is None:
        return
    caps = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for i, (ids, cap) in enumerate(zip(prompts, caps)):
        if len(ids) + cap > limit:
            raise ApiError(
                400, "invalid_request",
                f"prompt {i} has {len(ids)} tokens; with max_tokens={cap} that is "
                f"{len(ids) + cap} > max_model_len={limit}. Shorten the prompt, lower max_tokens, "
                f"or start the server with a larger --max_model_len.", field_name)


async def run_generation(state: ServerState, prompts: list[list[int]], fields: SamplingFields,
                         prompt_logprobs: bool = False, seeds: list[int] | None = None,
                         adapter: str | None = None,
                         max_tokens: list[int] | None = None) -> tuple[list[PromptResult], int]:
    """Generate under the admission lock; `seeds` and `max_tokens` (one per prompt) override the fields'."""
    from fastgrpo.vllm_compat import request_error_types

    try:
        if seeds is None and max_tokens is None:
            params = [sampling_params(fields, prompt_logprobs)] * len(prompts)
        else:
            params = [sampling_params(fields, prompt_logprobs, seed, cap) for seed, cap in
                      zip(seeds or [None] * len(prompts), max_tokens or [None] * len(prompts))]
    except request_error_types() as exc:  # vLLM's own limits, where ours let a value through
        raise ApiError(400, "invalid_request", f"vLLM refused the sampling parameters: {exc}",
                       getattr(exc, "parameter", None) or field_named_in(str(exc), SamplingFields.model_fields)) from exc
    ticket, running = await admit(state, adapter, lambda t: state.engine.generate(
        [{"prompt_token_ids": p, "cache_salt": t.salt} for p in prompts], params,
        t.adapter.request if t.adapter is not None else None))
    try:
        outputs = await running
    except EngineDead as exc:
        raise ApiError(503, "engine_dead", str(exc)) from exc
    except EngineRejected as exc:
        raise ApiError(400, "invalid_request", f"the engine refused the request: {exc}",
                       field_named_in(str(exc), SamplingFields.model_fields)) from exc
    finally:
        await release(state, ticket)
    check_not_mixed(ticket)
    versions = ticket.versions
    results = []
    for out, ids in zip(outputs, prompts):
        completions = [
            Completion(
                token_ids=list(c.token_ids),
                logprobs=[lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)],
                text=c.text, finish_reason=c.finish_reason, weight_versions=versions, dp_rank=rank,
            )
            for c, rank in zip(out.completions, out.dp_ranks)
        ]
        plp = None
        if prompt_logprobs and out.prompt_logprobs is not None:
            plp = [None if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, ids)]
        results.append(PromptResult(prompt_token_ids=ids, prompt_logprobs=plp, completions=completions))
    return results, ticket.versions[0]


# ---------------------------------------------------------------------------


def create_app(settings: ServerSettings, api_key: str | None = None, body_timeout_s: float = 30.0,
               weight_transfer_any_address: bool = False, max_recorded_rollouts: int = DEFAULT_MAX_ROLLOUTS) -> FastAPI:
    from fastgrpo.engine import on_cpu

    cpu = on_cpu()
    vllm_args = frontend_args(settings)  # a bad parser name or chat template fails here, before any engine starts
    state = ServerState(settings, GenerationEngine(settings, cpu, backend=settings.engine_backend(cpu)))

    def fail_start(what: str, exc: Exception) -> None:
        # A server that cannot serve should not linger looking alive: say why and exit non-zero.
        state.startup_error = f"{what} failed to start: {type(exc).__name__}: {exc}"
        log.exception("server failed to start")
        print(f"fastgrpo vllm-serve: error: {state.startup_error}", flush=True)
        state.engine.kill_processes()
        os._exit(1)

    def start_engines() -> None:
        try:
            from transformers import AutoTokenizer

            state.engine.start()
            # After the engines: vLLM has found or fetched the model by now, whatever its format.
            state.specs = model_specs(settings.model, settings.revision)
            state.tokenizer = AutoTokenizer.from_pretrained(settings.model, revision=settings.revision)
        except Exception as exc:
            fail_start("the engines", exc)

    async def start_vllm_api(app: FastAPI) -> None:
        try:
            await init_vllm_api(app, state, vllm_args)
            if settings.chat_template:
                from vllm.renderers.chat_utils import load_chat_template

                state.chat_template = load_chat_template(settings.chat_template)
            sync_adapters(app, state)
            state.vllm_api_ready = True
        except Exception as exc:
            fail_start("vLLM's API", exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Engines start in the background so /health can say "starting" meanwhile.
        thread = threading.Thread(target=start_engines, name="engine-start", daemon=True)
        thread.start()
        watchdog = asyncio.create_task(watch_engine(state, thread, lambda: start_vllm_api(app)))
        yield
        watchdog.cancel()
        state.engine.shutdown()
        shutil.rmtree(state.adapters.root, ignore_errors=True)

    app = FastAPI(title="fastgrpo generation server", lifespan=lifespan,
                  responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 405, 408, 500, 503)})
    app.state.server = state
    app.state.weight_transfer_any_address = weight_transfer_any_address

    errors.install(app, body_timeout_s)
    app.add_middleware(CancelAbandoned, on_abandoned=state.count_abandoned)
    app.add_middleware(WeightVersionTags)  # outside CancelAbandoned: its Tap is seen by the handler's task

    @app.middleware("http")
    async def _auth_and_readiness(request: Request, call_next):
        path = request.url.path
        refuse = openai_error if openai_shaped(path) else error_response
        if api_key is not None and path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return refuse(401, "unauthorized", "missing or wrong API key: send the header "
                              "'Authorization: Bearer <key>' (the server's --api-key)")
        if path not in ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect") and not state.ready:
            if state.startup_error:
                return refuse(503, "failed", f"the server failed to start: {state.startup_error}")
            return refuse(503, "not_ready", "the engines are still starting; wait for GET /health to return 200 "
                          "(VLLMClient does this)")
        try:
            return await call_next(request)
        except RuntimeError as exc:  # a client that went away: CancelAbandoned ended its handler unanswered
            if str(exc) != "No response returned.":
                raise
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.get("/health", response_model=HealthResponse)
    async def health():
        engine = state.engine
        if state.startup_error or not (engine.alive or engine.engine is None):
            status = "failed"
        elif not state.ready:
            status = "starting"
        elif not state.weights_consistent:
            status = "degraded"
        else:
            status = "ok"
        body = HealthResponse(
            status=status, model=settings.model, dp_ranks=engine.describe(),
            device_type="cpu" if engine.on_cpu else "gpu",
            tensor_parallel_size=settings.tensor_parallel_size, data_parallel_size=settings.data_parallel_size,
            world_size=settings.world_size, weight_transfer_ranks=state.weight_transfer_ranks,
            weight_version=state.weight_version, instance=state.instance,
            abandoned_generations=state.abandoned_generations,
            weights_consistent=state.weights_consistent, weight_push=state.push_phase,
            last_push_error=state.last_push_error, weight_transfer_backend=engine.backend,
            dtype=_served_dtype(state), max_model_len=state.max_model_len,
        )
        return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest):
        field_name = "prompts" if req.prompts is not None else (
            "prompt_token_ids" if req.prompt_token_ids is not None else "messages")
        prompts = tokenize_prompts(state, req)
        caps = req.max_tokens_of(len(prompts))
        check_lengths(state, prompts, caps, field_name)
        if req.stop_token_ids:
            check_vocabulary(state, [req.stop_token_ids], "stop_token_ids")
        results, version = await run_generation(state, prompts, req, req.prompt_logprobs, req.seeds, req.adapter,
                                                max_tokens=req.max_tokens_per_prompt)
        return GenerateResponse(results=results, weight_version=version, instance=state.instance)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        if not state.engine.alive:
            raise ApiError(503, "engine_dead", str(state.engine.dead_error()))
        await state.engine.each("reset_prefix_cache")  # every DP rank
        return {"ok": True}

    from fastgrpo.serve.adapters import AdapterRegistry
    from fastgrpo.serve.adapters import router as adapters_router
    from fastgrpo.serve.recordings import Recorder
    from fastgrpo.serve.recordings import router as recordings_router
    from fastgrpo.serve.vllm_weights import router as vllm_weights_router
    from fastgrpo.serve.weights import router as weights_router

    state.adapters = AdapterRegistry()
    state.recorder = Recorder(max_recorded_rollouts)
    app.include_router(weights_router)
    app.include_router(vllm_weights_router)
    app.include_router(adapters_router)
    app.include_router(recordings_router)
    include_vllm_routes(app, vllm_args)
    return app


def _served_dtype(state: ServerState) -> str:
    engine = state.engine.engine
    if engine is None:
        return state.settings.dtype
    return str(engine.model_config.dtype).removeprefix("torch.")


async def watch_engine(state: ServerState, starting, started) -> None:
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

