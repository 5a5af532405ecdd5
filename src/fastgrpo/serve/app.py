"""The server's HTTP routes: health, generate, prefix cache, weight sync. OpenAI routes: openai_routes.py."""

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fastgrpo.serve.checkpoint import check_push, checkpoint_specs
from fastgrpo.serve.gloo_transfer import TRAINER_DID_NOT_SEND, TensorMeta
from fastgrpo.serve.protocol import (
    Completion,
    ErrorResponse,
    FinishUpdateRequest,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    InitTransferRequest,
    PromptResult,
    SamplingFields,
    StartUpdateRequest,
    StartUpdateResponse,
    WeightVersionResponse,
)
from fastgrpo.serve.replicas import ReplicaDead, ReplicaPool, RWLock, ServerSettings

log = logging.getLogger("fastgrpo.serve")


class ApiError(Exception):
    def __init__(self, status: int, type: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field


@dataclass
class PendingPush:
    transfer_id: str
    request: StartUpdateRequest
    watchdog: asyncio.Task | None = None


@dataclass
class ServerState:
    settings: ServerSettings
    pool: ReplicaPool
    tokenizer: object = None
    specs: dict = field(default_factory=dict)
    startup_error: str | None = None
    weight_version: int = 0
    weights_consistent: bool = True
    transfer_open: bool = False
    lock: RWLock = field(default_factory=RWLock)
    pending: PendingPush | None = None

    @property
    def ready(self) -> bool:
        return bool(self.pool.replicas) and all(r.engine is not None for r in self.pool.replicas) \
            and self.tokenizer is not None

    @property
    def max_model_len(self) -> int | None:
        live = self.pool.live
        return live[0].engine.model_config.max_model_len if live else self.settings.max_model_len


def error_response(status: int, type: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, type=type, field=field).model_dump(), status_code=status)


# ---------------------------------------------------------------------------
# Building prompts and sampling parameters.


def sampling_params(fields: SamplingFields, prompt_logprobs: bool = False):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        output_kind=RequestOutputKind.FINAL_ONLY,  # one output holding all n completions
        n=fields.n, temperature=fields.temperature, top_p=fields.top_p,
        top_k=0 if fields.top_k in (-1, 0) else fields.top_k, min_p=fields.min_p,
        repetition_penalty=fields.repetition_penalty, max_tokens=fields.max_tokens, seed=fields.seed,
        stop=fields.stop, ignore_eos=fields.ignore_eos, logprobs=0,
        prompt_logprobs=0 if prompt_logprobs else None,
    )


def tokenize_prompts(state: ServerState, req: GenerateRequest) -> list[list[int]]:
    tok = state.tokenizer
    if req.prompt_token_ids is not None:
        vocab = len(tok)
        for i, ids in enumerate(req.prompt_token_ids):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, "invalid_request", f"prompt {i} has token ids outside the vocabulary "
                               f"[0, {vocab}): {bad[:5]}", "prompt_token_ids")
        return req.prompt_token_ids
    if req.messages is not None:
        return [tok.apply_chat_template([m.model_dump() for m in conv], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"] for conv in req.messages]
    return [tok(p, add_special_tokens=False)["input_ids"] for p in req.prompts]


def check_lengths(state: ServerState, prompts: list[list[int]], max_tokens: int, field_name: str) -> None:
    limit = state.max_model_len
    if limit is None:
        return
    for i, ids in enumerate(prompts):
        if len(ids) + max_tokens > limit:
            raise ApiError(
                400, "invalid_request",
                f"prompt {i} has {len(ids)} tokens; with max_tokens={max_tokens} that is "
                f"{len(ids) + max_tokens} > max_model_len={limit}. Shorten the prompt, lower max_tokens, "
                f"or start the server with a larger --max_model_len.", field_name)


async def run_generation(state: ServerState, prompts: list[list[int]], fields: SamplingFields,
                         prompt_logprobs: bool = False) -> tuple[list[PromptResult], int]:
    if not state.weights_consistent:
        raise ApiError(503, "weights_inconsistent", "the last weight push failed half-way, so the engines hold a "
                       "mix of old and new weights; push the weights again (VLLMClient.update_weights).")
    params = sampling_params(fields, prompt_logprobs)
    costs = [len(p) + fields.n * fields.max_tokens for p in prompts]
    async with state.lock.read():
        version = state.weight_version
        try:
            outputs = await state.pool.generate([{"prompt_token_ids": p} for p in prompts], params, costs)
        except ReplicaDead as exc:
            raise ApiError(503, "replica_dead", str(exc)) from exc
    results = []
    for (out, replica), ids in zip(outputs, prompts):
        completions = [
            Completion(
                token_ids=list(c.token_ids),
                logprobs=[lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)],
                text=c.text, finish_reason=c.finish_reason,
            )
            for c in out.outputs
        ]
        plp = None
        if prompt_logprobs and out.prompt_logprobs is not None:
            plp = [None if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, ids)]
        results.append(PromptResult(prompt_token_ids=ids, prompt_logprobs=plp, completions=completions,
                                    replica=replica))
    return results, version


# ---------------------------------------------------------------------------


def create_app(settings: ServerSettings, api_key: str | None = None) -> FastAPI:
    from fastgrpo.engine import on_cpu

    cpu = on_cpu()
    state = ServerState(settings, ReplicaPool(settings, cpu, backend="gloo" if cpu else "nccl"))

    def start_engines() -> None:
        try:
            from transformers import AutoTokenizer

            state.specs = checkpoint_specs(settings.model, settings.revision)
            state.pool.start()
            state.tokenizer = AutoTokenizer.from_pretrained(settings.model, revision=settings.revision)
        except Exception as exc:
            # A server that cannot serve should not linger looking alive: say why and exit non-zero.
            state.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("server failed to start")
            print(f"fastgrpo vllm-serve: error: the engines failed to start: {state.startup_error}", flush=True)
            state.pool.shutdown()
            os._exit(1)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Engines start in the background so /health can say "starting" meanwhile.
        thread = threading.Thread(target=start_engines, name="engine-start", daemon=True)
        thread.start()
        yield
        state.pool.shutdown()

    app = FastAPI(title="fastgrpo generation server", lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    app.state.server = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            + (f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else "")
            for e in exc.errors()[:5])
        return error_response(400, "invalid_request", message, where or None)

    @app.middleware("http")
    async def _auth_and_readiness(request: Request, call_next):
        path = request.url.path
        if api_key is not None and path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error_response(401, "unauthorized", "missing or wrong API key: send the header "
                                      "'Authorization: Bearer <key>' (the server's --api-key)")
        if path not in ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect") and not state.ready:
            if state.startup_error:
                return error_response(503, "failed", f"the server failed to start: {state.startup_error}")
            return error_response(503, "not_ready", "the engines are still starting; wait for GET /health to "
                                  "return 200 (VLLMClient does this)")
        return await call_next(request)

    @app.get("/health", response_model=HealthResponse)
    async def health():
        state.pool.check_dead()
        if state.startup_error:
            status = "failed"
        elif not state.ready:
            status = "starting"
        elif len(state.pool.live) < len(state.pool.replicas) or not state.weights_consistent:
            status = "degraded"
        else:
            status = "ok"
        body = HealthResponse(
            status=status, model=settings.model, replicas=[r.describe() for r in state.pool.replicas],
            tensor_parallel_size=settings.tensor_parallel_size, data_parallel_size=settings.data_parallel_size,
            world_size=settings.world_size, weight_version=state.weight_version,
            weights_consistent=state.weights_consistent, weight_transfer_backend=state.pool.backend,
            dtype=_served_dtype(state), max_model_len=state.max_model_len,
        )
        return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest):
        field_name = "prompts" if req.prompts is not None else (
            "prompt_token_ids" if req.prompt_token_ids is not None else "messages")
        prompts = tokenize_prompts(state, req)
        check_lengths(state, prompts, req.max_tokens, field_name)
        results, version = await run_generation(state, prompts, req, req.prompt_logprobs)
        return GenerateResponse(results=results, weight_version=version)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        await state.pool.each("reset_prefix_cache")
        return {"ok": True}

    # --- weight sync ------------------------------------------------------

    @app.post("/weights/init")
    async def weights_init(req: InitTransferRequest):
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        expected = settings.world_size + 1
        if req.world_size != expected:
            raise ApiError(400, "invalid_request", f"world_size={req.world_size}, but this server has "
                           f"TP x DP = {settings.world_size} inference ranks, so the group is {expected} "
                           "(they + the trainer)", "world_size")
        if req.backend is not None and req.backend != state.pool.backend:
            raise ApiError(400, "invalid_request", f"backend {req.backend!r} requested, but the engines were "
                           f"built with {state.pool.backend!r} (gloo on the CPU build, nccl on GPUs); send "
                           "tensors from the matching device", "backend")
        tp = settings.tensor_parallel_size
        infos = []
        for r in range(settings.data_parallel_size):
            info = {"master_address": req.master_address, "master_port": req.master_port,
                    "rank_offset": 1 + r * tp, "world_size": req.world_size}
            if state.pool.backend == "gloo":
                info["timeout_s"] = req.timeout_s
                if req.bucket_bytes:
                    info["bucket_bytes"] = req.bucket_bytes
            else:
                info["packed"] = True
            infos.append(WeightTransferInitRequest(init_info=info))
        try:
            await state.pool.each_with("init_weight_transfer_engine", infos, timeout=req.timeout_s + 10)
        except TimeoutError:
            raise ApiError(504, "weight_transfer", f"the trainer did not join the weight-transfer group at "
                           f"{req.master_address}:{req.master_port} within {req.timeout_s:.0f} s: check that it "
                           "opened its endpoint, and that this server can reach that address (firewall)") from None
        except Exception as exc:
            raise ApiError(502, "weight_transfer", f"joining the weight-transfer group failed on the server: "
                           f"{exc}. Check master_address/master_port and that both sides run the same "
                           "torch and vLLM versions.") from exc
        state.transfer_open = True
        return {"ok": True, "world_size": req.world_size, "backend": state.pool.backend}

    @app.post("/weights/start", response_model=StartUpdateResponse)
    async def weights_start(req: StartUpdateRequest):
        if not state.transfer_open:
            raise ApiError(409, "weight_transfer", "no weight-transfer group is open: POST /weights/init first "
                           "(VLLMClient.update_weights does this on first use)")
        problems = check_push(state.specs, req.names, req.dtype_names, req.shapes)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ApiError(400, "invalid_request", "; ".join(problems[:5]) + more, "names")
        if state.pending is not None:
            raise ApiError(409, "weight_transfer", "another weight push is in progress: one push at a time")
        transfer_id = uuid.uuid4().hex
        state.pending = PendingPush(transfer_id, req)  # claim first: concurrent starts get 409
        try:
            # Drain in-flight generations: a batch never mixes weights.
            await asyncio.wait_for(state.lock.acquire_write(), req.timeout_s)
        except TimeoutError:
            state.pending = None
            raise ApiError(503, "busy", f"in-flight generations did not finish within {req.timeout_s:.0f} s; "
                           "retry the push") from None

        async def expire():
            await asyncio.sleep(req.timeout_s)
            if state.pending is not None and state.pending.transfer_id == transfer_id:
                log.warning("weight push %s expired: the trainer never sent its data", transfer_id)
                state.pending = None
                await state.lock.release_write()

        state.pending.watchdog = asyncio.create_task(expire())
        nbytes = sum(TensorMeta(n, d, tuple(s)).nbytes for n, d, s in zip(req.names, req.dtype_names, req.shapes))
        return StartUpdateResponse(transfer_id=transfer_id, num_tensors=len(req.names), bytes=nbytes)

    @app.post("/weights/update", response_model=WeightVersionResponse)
    async def weights_update(req: FinishUpdateRequest):
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        pending = state.pending
        if pending is None or pending.transfer_id != req.transfer_id:
            raise ApiError(409, "weight_transfer", f"transfer {req.transfer_id!r} is unknown or expired: call "
                           "/weights/start again", "transfer_id")
        pending.watchdog.cancel()
        push = pending.request
        began = time.perf_counter()
        info = {"names": push.names, "dtype_names": push.dtype_names, "shapes": push.shapes}
        try:
            await state.pool.each("start_weight_update")
            state.weights_consistent = False  # until every replica finished
            await state.pool.each_with("update_weights", [WeightTransferUpdateRequest(update_info=info)] *
                                       settings.data_parallel_size, timeout=push.timeout_s + 10)
            await state.pool.each("finish_weight_update")
            await state.pool.each("reset_prefix_cache")
            state.weights_consistent = True
            state.weight_version = push.weight_version if push.weight_version is not None \
                else state.weight_version + 1
        except TimeoutError:
            state.transfer_open = False
            raise ApiError(504, "weight_transfer", f"{TRAINER_DID_NOT_SEND} within {push.timeout_s:.0f} s "
                           "(the trainer side did not send): the group is closed; open it again and push "
                           "again") from None
        except Exception as exc:
            state.transfer_open = False
            if TRAINER_DID_NOT_SEND in str(exc):
                raise ApiError(504, "weight_transfer", f"{TRAINER_DID_NOT_SEND} within {push.timeout_s:.0f} s "
                               "(the trainer side did not send): the group is closed; open it again and push "
                               "again") from None
            raise ApiError(500, "weight_transfer", f"the weight push failed on the server: {exc}. The group "
                           "is closed: open it again and push again.") from exc
        finally:
            state.pending = None
            await state.lock.release_write()
        return WeightVersionResponse(weight_version=state.weight_version,
                                     seconds=round(time.perf_counter() - began, 4))

    @app.post("/weights/close")
    async def weights_close():
        if state.transfer_open:
            await state.pool.each("shutdown_weight_transfer_engine")
        state.transfer_open = False
        return {"ok": True}

    from fastgrpo.serve.openai_routes import add_openai_routes

    add_openai_routes(app, state)
    return app


def _served_dtype(state: ServerState) -> str:
    live = state.pool.live
    if not live:
        return state.settings.dtype
    return str(live[0].engine.model_config.dtype).removeprefix("torch.")

