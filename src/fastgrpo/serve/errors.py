"""Errors as data: every failure the server answers is the documented JSON, `{"error", "type", "field"}`.

Routes raise `ApiError`; `install_error_handlers(app)` registers the exception handlers that answer it,
FastAPI's validation errors, Starlette's 404/405/unreadable bodies, and whatever no one expected (a 500).
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fastgrpo.protocol import ErrorResponse

log = logging.getLogger("fastgrpo.serve")


class ApiError(Exception):
    def __init__(self, status: int, type: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field


def error_response(status: int, type: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, type=type, field=field).model_dump(), status_code=status)


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message, exc.field)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes, wrong methods, bodies that cannot be read: the same JSON as every other error."""
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


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, as a 400 naming the first field at fault."""
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


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", f"{type(exc).__name__}: {exc}. This is a bug in the server; the server "
                          "keeps serving. Please report it with the server's log.")


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return internal_error(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    # Whatever no handler above expected: the same JSON, a 500. Starlette runs this one in its outermost layer,
    # which re-raises once it has answered: uvicorn then logs the error too and closes that connection.
    app.add_exception_handler(Exception, unexpected_error)
