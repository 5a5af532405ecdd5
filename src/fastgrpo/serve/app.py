"""The server's HTTP app: its state, routers (serve/routes/), exception handlers, middleware and lifespan."""

from fastapi import FastAPI

from fastgrpo.engine import on_cpu
from fastgrpo.protocol import ErrorResponse
from fastgrpo.serve import DEFAULT_MAX_ROLLOUTS
from fastgrpo.serve.adapters import AdapterRegistry
from fastgrpo.serve.body_timeout import BodyReadTimeout
from fastgrpo.serve.disconnects import CancelAbandoned
from fastgrpo.serve.engines import GenerationEngine, ServerSettings
from fastgrpo.serve.errors import install_error_handlers
from fastgrpo.serve.gate import AuthAndReadiness
from fastgrpo.serve.openai_errors import install_openai_errors
from fastgrpo.serve.recordings import Recorder
from fastgrpo.serve.routes import adapters, cache, generate, health, recordings, vllm_weights, weights
from fastgrpo.serve.routes.vllm import attach_metrics, vllm_router
from fastgrpo.serve.startup import lifespan
from fastgrpo.serve.state import ServerState
from fastgrpo.serve.vllm_api import WeightVersionTags, frontend_args

ROUTERS = (health, generate, cache, weights, vllm_weights, adapters, recordings)  # in /docs' order


def create_app(settings: ServerSettings, api_key: str | None = None, body_timeout_s: float = 30.0,
               weight_transfer_any_address: bool = False, max_recorded_rollouts: int = DEFAULT_MAX_ROLLOUTS) -> FastAPI:
    cpu = on_cpu()
    vllm_args = frontend_args(settings)  # a bad parser name or chat template fails here, before any engine starts
    state = ServerState(settings, GenerationEngine(settings, cpu, backend=settings.engine_backend(cpu)),
                        AdapterRegistry(), Recorder(max_recorded_rollouts),
                        weight_transfer_any_address=weight_transfer_any_address)
    app = FastAPI(title="fastgrpo generation server", lifespan=lifespan(vllm_args),
                  responses={code: {"model": ErrorResponse} for code in (400, 401, 404, 405, 408, 500, 503)})
    app.state.server = state  # what the routes' `State` dependency reads

    for module in ROUTERS:
        app.include_router(module.router)
    # vLLM's routes as they are: include_router would rebuild them, adding our error responses to their docs.
    app.router.routes.extend(vllm_router(vllm_args).routes)

    install_error_handlers(app)
    install_openai_errors(app)  # after ours: it wraps them on vLLM's routes

    # Middleware, innermost first.
    app.add_middleware(BodyReadTimeout, timeout_s=body_timeout_s)
    app.add_middleware(CancelAbandoned, on_abandoned=state.count_abandoned)
    app.add_middleware(WeightVersionTags)  # outside CancelAbandoned: its Tap is seen by the handler's task
    app.add_middleware(AuthAndReadiness, state=state, api_key=api_key)
    attach_metrics(app)  # outermost: Prometheus sees every answer, refusals too; and /metrics
    return app
