"""Generations whose client went away are cancelled, not run to the end for nobody.

Uvicorn does not cancel a handler when its client disconnects: a trainer that timed out,
or an agent that was killed, would leave its whole round generating. This ASGI middleware
runs each generation route's handler as a task and waits for the client's disconnect
beside it; if the client leaves before the response is sent, the handler is cancelled
(vLLM's AsyncLLM then aborts its requests in the engines) and the server counts it
(`abandoned_generations` in GET /health), then answers 499 for the layers outside (metrics).
"""

import asyncio
import contextlib
from collections.abc import Callable

from starlette.responses import Response

from fastgrpo.serve.recordings import is_recorded_chat

# POST routes that only generate: cancelling one mid-way loses nothing (a weight push is never cancelled).
GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions", "/inference/v1/generate")


def is_generation(method: str, path: str) -> bool:
    return method == "POST" and (path in GENERATION_PATHS or is_recorded_chat(path))


class CancelAbandoned:
    def __init__(self, app, on_abandoned: Callable[[], None]):
        self.app, self.on_abandoned = app, on_abandoned

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_generation(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        body_read, responded = asyncio.Event(), False

        async def tracked_receive():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def tracked_send(message):
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        async def client_gone():
            await body_read.wait()  # the handler has the whole body: from now on the channel says only "gone"
            while (await receive())["type"] != "http.disconnect":
                pass

        handler = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))
        gone = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({handler, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if handler.done() or responded:  # answered (a disconnect after the answer is the connection closing)
            return await handler
        handler.cancel()
        self.on_abandoned()
        with contextlib.suppress(asyncio.CancelledError):
            await handler
        await Response(status_code=499)(scope, receive, send)  # nginx's "client closed request"; nobody reads it
