"""A read timeout on request bodies (uvicorn bounds idle connections, but not a body sent half-way)."""

import asyncio

from fastgrpo.serve.errors import error_response


class BodyReadTimeout:
    """ASGI middleware: a request body that stops arriving for `timeout_s` ends in a 408, and its connection
    closes; a body sent half-way would otherwise hold a socket open.

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
