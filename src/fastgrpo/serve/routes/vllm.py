"""vLLM's own routes, as `vllm serve` has them, taken from vLLM's routers: the OpenAI API, /tokenize,
/detokenize, /version, the token-in-token-out /inference/v1/generate, the RL routes TRL's client calls, and
Prometheus /metrics (serve/vllm_api.py: what they run on)."""

from argparse import Namespace

from fastapi import APIRouter, FastAPI

# (method, path) of vLLM's routes that this server serves as they are; everything else of vLLM's stays out
# (/collective_rpc, /sleep, LoRA loading from paths, ...: they would bypass admission or reach the workers).
VLLM_ROUTES = {
    ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/metrics"),
    ("POST", "/inference/v1/generate"),
    ("GET", "/get_world_size"), ("GET", "/server_info"), ("POST", "/pause"), ("POST", "/resume"),
    ("GET", "/is_paused"),
}


def vllm_router(args: Namespace) -> APIRouter:
    """vLLM's routes of VLLM_ROUTES but /metrics (attach_metrics), from vLLM's own routers, for `args` (vLLM's
    server arguments, serve/vllm_api.frontend_args)."""
    # Here, not at the top: vLLM's API modules are slow to import, and VLLM_ROUTES is read wherever errors are
    # shaped (serve/openai_errors.py).
    from vllm.entrypoints.generate.api_router import register_generate_api_routers
    from vllm.entrypoints.openai.models.api_router import attach_router as models_router
    from vllm.entrypoints.rl.online.api_router import router as rl_router
    from vllm.entrypoints.scale_out.token_in_token_out.api_router import router as tokens_router
    from vllm.entrypoints.serve.dev.server_info.api_router import attach_router as server_info_router
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse as VllmErrorResponse
    from vllm.entrypoints.serve.instrumentator.basic import router as basic_router
    from vllm.entrypoints.serve.tokenize.api_router import attach_router as tokenize_router

    scratch = FastAPI()  # vLLM's routers attach to an app: this one, which only lends its routes
    scratch.state.args = args
    register_generate_api_routers(scratch)
    models_router(scratch)
    tokenize_router(scratch)
    server_info_router(scratch)
    scratch.include_router(rl_router)
    scratch.include_router(tokens_router)
    scratch.include_router(basic_router)
    router, taken = APIRouter(), set()
    for route in scratch.routes:
        for method in getattr(route, "methods", None) or ():
            if (method, route.path) in VLLM_ROUTES:
                # What our admission, auth and readiness may answer, in the shape they answer it on these routes.
                for code in (400, 401, 503):
                    route.responses.setdefault(code, {"model": VllmErrorResponse})
                router.routes.append(route)
                taken.add((method, route.path))
                break
    missing = VLLM_ROUTES - taken - {("GET", "/metrics")}
    if missing:  # a vLLM release that moved a route: say so at start, not with a 404 later
        raise RuntimeError(f"vLLM's routes {sorted(missing)} were not found in this vLLM ({_vllm_version()})")
    return router


def attach_metrics(app: FastAPI) -> None:
    """vLLM's Prometheus instrumentation: a middleware on `app` (added now, so outside those added before), and
    /metrics."""
    from vllm.entrypoints.serve.instrumentator.metrics import attach_router

    attach_router(app)


def _vllm_version() -> str:
    import vllm

    return vllm.__version__
