"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, where OpenAI clients read them:
on vLLM's routes (serve/routes/vllm.py, serve/routes/vllm_weights.py) and on the recorded chat route."""

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fastgrpo.serve.errors import ApiError, internal_error
from fastgrpo.serve.recordings import is_recorded_chat
from fastgrpo.serve.routes.vllm import VLLM_ROUTES
from fastgrpo.serve.routes.vllm_weights import router as vllm_weight_routes

OPENAI_SHAPED_PATHS = {path for _, path in VLLM_ROUTES} | {route.path for route in vllm_weight_routes.routes}


def openai_shaped(path: str) -> bool:
    """Whether errors on `path` take OpenAI's format rather than ours."""
    return path in OPENAI_SHAPED_PATHS or is_recorded_chat(path)


def openai_error(status: int, type: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": status}},
                        status_code=status)


def on_openai_paths(handler, ours=None):
    """An exception handler that is `handler` on OpenAI-shaped paths, and elsewhere `ours` (or a logged 500)."""
    async def handle(request: Request, exc: Exception):
        if openai_shaped(request.url.path):
            return await handler(request, exc)
        return await ours(request, exc) if ours is not None else internal_error(request, exc)
    return handle


def reshaped(ours):
    """An exception handler of ours, its message and type in OpenAI's shape."""
    async def handle(request: Request, exc: Exception):
        response = await ours(request, exc)
        body = json.loads(response.body)
        reply = openai_error(response.status_code, body["type"], body["error"], body.get("field"))
        reply.headers.update({k: v for k, v in response.headers.items() if k.lower() == "allow"})
        return reply
    return handle


def install_openai_errors(app: FastAPI) -> None:
    """Errors on OPENAI_SHAPED_PATHS in OpenAI's format: what vLLM raises on bad input (its VLLMError,
    ValueError, TypeError, ...) is answered as vLLM answers it (a 4xx), and ours (a body that cannot be read,
    503 while weights are mixed) take the same shape. On our routes the same exceptions are our bugs: a 500,
    logged. Wraps the handlers errors.install_error_handlers registered: install those first."""
    # Here, not at the top: vLLM's serving layer is slow to import, and the gate (gate.py) needs only the shapes.
    from vllm.entrypoints.serve.exception_handling.handlers.exception import exception_handler
    from vllm.entrypoints.serve.exception_handling.handlers.vllm_error import vllm_error_handler
    from vllm.exceptions import VLLMError

    for kind in (ApiError, RequestValidationError, HTTPException):
        ours = app.exception_handlers[kind]
        app.add_exception_handler(kind, on_openai_paths(reshaped(ours), ours))
    app.add_exception_handler(VLLMError, on_openai_paths(vllm_error_handler))
    for kind in (ValueError, TypeError, OverflowError, NotImplementedError):
        app.add_exception_handler(kind, on_openai_paths(exception_handler))
