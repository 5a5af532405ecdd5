"""Errors as data: every failure the server answers is the documented JSON, `{"error", "type", "field"}`.

`install(app)` registers the handlers (our `ApiError`, FastAPI's validation errors,
Starlette's 404/405/unreadable bodies), a last-resort middleware so that nothing
answers a bare 500, and a read timeout on request bodies.
"""

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from fastgrpo.serve.state import ApiError, error_response

log = logging.getLogger("fastgrpo.serve")


class BodyReadTimeout:
    """ASGI middleware: a request body that stops arriving for `timeout_s` ends in a 408, and its connection
    closes. Uvicorn bounds idle connections but not a body sent half-way, which would hold a socket open.

    The body is read here, whole, before the app sees the request (FastAPI reads it whole anyway).
    """

    def __init__(self, app, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        messages = []
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                return await self._timed_out(scope, receive, send)
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _timed_out(self, scope, receive, send) -> None:
        response = error_response(408, "timeout", f"the request body stopped arriving for {self.timeout_s:g} s: "
                                  "send the whole body (the server's --request_body_timeout)", "body")
        response.headers["connection"] = "close"  # the rest of that body may still come: start afresh
        await response(scope, receive, send)


def internal_error(request: Request, exc: Exception):
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", f"{type(exc).__name__}: {exc}. This is a bug in the server; the server "
                          "keeps serving. Please report it with the server's log.")


def install(app: FastAPI, body_timeout_s: float) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.field)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        # Unknown routes, wrong methods, bodies that cannot be read: the same JSON as every other error.
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = str(exc.detail)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see GET /docs for the routes"
        elif exc.status_code == 404:
            message = f"no route {request.url.path}; see GET /docs for the routes"
        elif exc.status_code == 400:
            message = f"the body could not be read ({exc.detail}): send a UTF-8 JSON object"
        response = error_response(exc.status_code, kinds.get(exc.status_code, "invalid_request"), message,
                                  "body" if exc.status_code == 400 else None)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] in ("json_invalid", "json_type"):
            return error_response(400, "invalid_request", f"the body is not valid JSON: {first.get('msg')} "
                                  f"(near character {first['loc'][-1]}); send a JSON object", "body")
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            + (f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else "")
            for e in exc.errors()[:5])
        return error_response(400, "invalid_request", message, where or None)

    @app.middleware("http")
    async def _never_a_bare_500(request: Request, call_next):
        # What no handler expected still answers the documented JSON, and the connection stays usable.
        try:
            return await call_next(request)
        except Exception as exc:
            return internal_error(request, exc)

    app.add_middleware(BodyReadTimeout, timeout_s=body_timeout_s)
