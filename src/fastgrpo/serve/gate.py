"""What a request must pass before any route sees it: the API key, and a server that is ready."""

from starlette.datastructures import Headers

from fastgrpo.serve.errors import error_response
from fastgrpo.serve.openai_errors import openai_error, openai_shaped
from fastgrpo.serve.state import ServerState

OPEN_WHILE_STARTING = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")


class AuthAndReadiness:
    """ASGI middleware: 401 without the server's API key (but on /health), 503 until the server is ready (but
    on /health and the docs), in the error shape of the path (serve/openai_errors.py)."""

    def __init__(self, app, state: ServerState, api_key: str | None):
        self.app, self.state, self.api_key = app, state, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope["path"], Headers(scope=scope).get("authorization"))
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, path: str, authorization: str | None):
        """The answer that refuses a request to `path`, or None to let it through."""
        refuse = openai_error if openai_shaped(path) else error_response
        if self.api_key is not None and path != "/health" and authorization != f"Bearer {self.api_key}":
            return refuse(401, "unauthorized", "missing or wrong API key: send the header "
                          "'Authorization: Bearer <key>' (the server's --api-key)")
        if path not in OPEN_WHILE_STARTING and not self.state.ready:
            if self.state.startup_error:
                return refuse(503, "failed", f"the server failed to start: {self.state.startup_error}")
            return refuse(503, "not_ready", "the engines are still starting; wait for GET /health to return 200 "
                          "(VLLMClient does this)")
        return None
