"""VLLMClient: the trainer's side of `fastgrpo vllm-serve` (generate, chat, weight sync).

Control messages go over HTTP (httpx); weights go over a collective (gloo for
CPU tensors, NCCL for CUDA tensors) in packed buckets, never one request per
tensor and never pickled; or, for a server on the trainer's own GPU, as CUDA IPC
handles in the update request (transfer/ipc.py). Only requests that cannot have
changed server state are retried (connection refused, health polling), with tenacity.
"""

import logging
import socket
from urllib.parse import urlparse

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_fixed,
    wait_incrementing,
)

from fastgrpo.net import free_port
from fastgrpo.protocol import PART_HANDLE_FIELDS, GenerateResponse, RolloutRecording
from fastgrpo.transfer import (
    DEFAULT_BUCKET_BYTES,
    WeightControl,
    WeightTransferError,
    as_weights,
    open_sender,
    push_weights,
    sender_class,
)
from fastgrpo.transfer.adapters import ADAPTER_OWNER_HEADER
from fastgrpo.transfer.packing import check_bucket_bytes

log = logging.getLogger("fastgrpo.client")

CONNECT_ATTEMPTS = 3  # a refused connection: tried again after 0.5 s, then 1 s
HEALTH_POLL_S = 1.0


class ServerError(RuntimeError):
    """The server answered with an error; `.status`, `.type` and `.message` come from its JSON body."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None):
        super().__init__(f"server error {status} ({type}): {message}")
        self.status, self.type, self.message, self.field = status, type, message, field


class ServerUnavailable(ConnectionError):
    pass


class ServerRestarted(RuntimeError):
    """The server that answered is not the process this client pushed its weights to (it restarted): its
    weights are its checkpoint's, so the trainer pushes again before generating."""


class _NotReady(Exception):
    """A /health poll that found no serving server; `listening`: something accepted the connection."""

    def __init__(self, last: str, listening: bool):
        super().__init__(last)
        self.listening = listening


def _group_closed(exc: BaseException) -> bool:
    return isinstance(exc, ServerError) and exc.type == "group_closed"


def _address_seen_by(host: str, port: int) -> str:
    """Our address on the route to `host`: what the server's workers must connect to."""
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: no packet is sent, this only picks the route
        return s.getsockname()[0]


class _ServerControl(WeightControl):
    """The server's weight routes: /weights/start announces (validated, in-flight generations drained),
    /weights/update receives, loads and answers with the new weight version."""

    def __init__(self, client: "VLLMClient", weight_version: int | None):
        self.client, self.weight_version, self.transfer_id = client, weight_version, None

    def start(self, info: dict) -> None:
        started = self.client._request("POST", "/weights/start", retry_connect=False, json={
            **info, "group_id": self.client.group_id, "weight_version": self.weight_version,
            "timeout_s": self.client.weight_transfer_timeout})
        self.transfer_id = started["transfer_id"]

    def receive(self, info: dict) -> dict:
        return self.client._request("POST", "/weights/update", retry_connect=False,
                                    json={"transfer_id": self.transfer_id})

    def receive_part(self, info: dict, part, last: bool) -> dict:
        # The server knows the part's names, dtypes and shapes from the announcement: only the handle travels.
        handles = {k: info[k] for k in PART_HANDLE_FIELDS.values() if k in info}
        return self.client._request("POST", "/weights/update", retry_connect=False, json={
            "transfer_id": self.transfer_id,
            "part": {"first": part.first, "tensor_sizes": list(part.sizes), "last": last, **handles}})


class VLLMClient:
    def __init__(self, base_url: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 timeout: float = 240.0, request_timeout: float = 600.0, api_key: str | None = None,
                 weight_transfer_timeout: float = 120.0, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 nothing_listening: tuple[float, str] | None = None):
        self.base_url = (base_url or f"http://{host}:{port}").rstrip("/")
        parsed = urlparse(self.base_url)
        self.host, self.port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(request_timeout, connect=10.0))
        self.weight_transfer_timeout = weight_transfer_timeout
        self.bucket_bytes = check_bucket_bytes(bucket_bytes)
        self.sender, self.group_id = None, None
        self.pushed_instance: str | None = None  # the server process that received our last push
        self.info = self.wait_for_server(timeout, nothing_listening)

    # --- plumbing -------------------------------------------------------------

    def _send(self, method: str, path: str, retry_connect: bool = True, **kwargs) -> httpx.Response:
        """One request; every network failure becomes an error that names the server and what to check. A refused
        connection (nothing reached the server) is tried again where `retry_connect`."""
        retrying = Retrying(retry=retry_if_exception_type(httpx.ConnectError), reraise=True,
                            stop=stop_after_attempt(CONNECT_ATTEMPTS if retry_connect else 1),
                            wait=wait_incrementing(start=0.5, increment=0.5))
        try:
            return retrying(self.http.request, method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ServerUnavailable(
                f"cannot connect to the fastgrpo server at {self.base_url}: {exc}. Check that "
                "`fastgrpo vllm-serve` is running, the host and port, and any firewall between here "
                "and there."
            ) from exc
        except httpx.TimeoutException as exc:
            waited = kwargs.get("timeout") or self.http.timeout.read
            raise TimeoutError(f"{method} {path} to {self.base_url} got no answer within "
                               f"{waited:g} s ({exc}): the server may be overloaded or frozen, or the "
                               "request too large for that; raise GRPOConfig.vllm_generation_timeout "
                               "(VLLMClient's request_timeout)") from exc
        except httpx.TransportError as exc:  # the connection broke mid-request: the server may have died
            raise ServerUnavailable(
                f"the connection to the fastgrpo server at {self.base_url} broke during {method} {path} "
                f"({type(exc).__name__}: {exc}). Check that `fastgrpo vllm-serve` is still running and read "
                "its log: a crashed or killed server ends connections this way."
            ) from exc

    def _request(self, method: str, path: str, retry_connect: bool = True, **kwargs) -> dict:
        response = self._send(method, path, retry_connect, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500], "type": "http"}
        if response.status_code in (401, 403):
            raise ServerError(response.status_code, body.get("type", "unauthorized"),
                              f"the server at {self.base_url} refused the API key ({body.get('error', body)}); pass "
                              "the server's --api_key as VLLMClient(api_key=...) or GRPOConfig(vllm_server_api_key=...)")
        if response.status_code >= 400:
            raise ServerError(response.status_code, body.get("type", "http"), body.get("error", str(body)),
                              body.get("field"))
        return body

    def wait_for_server(self, timeout: float, nothing_listening: tuple[float, str] | None = None) -> dict:
        """Poll /health until the server serves; errors say what to check. `nothing_listening` (seconds, hint):
        fail sooner, with the hint, when nothing has accepted a connection for that long.

        A `degraded` server (weights left mixed by a failed push) is usable: a push is what makes mixed
        weights whole again, so it is returned with a warning rather than waited out.
        """
        listening, gave_up_early = False, False

        def nothing_listens(state) -> bool:
            nonlocal listening, gave_up_early
            listening = listening or state.outcome.exception().listening
            gave_up_early = (nothing_listening is not None and not listening
                             and state.seconds_since_start > nothing_listening[0])
            return gave_up_early

        retrying = Retrying(retry=retry_if_exception_type(_NotReady), wait=wait_fixed(HEALTH_POLL_S),
                            stop=stop_after_delay(timeout) | nothing_listens)
        try:
            return retrying(self._poll_health)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            if gave_up_early:
                hint = nothing_listening[1]
                raise ServerUnavailable(f"nothing listens at {self.base_url} ({last}): {hint}") from last
            raise ServerUnavailable(
                f"the fastgrpo server at {self.base_url} was not ready within {timeout:.0f} s (last: {last}). "
                "Check that `fastgrpo vllm-serve` is running there, the host/port, firewalls, and its log; "
                "the client and server should run the same fastgrpo version."
            ) from last

    def _poll_health(self) -> dict:
        """One /health poll: the body of a serving (or degraded) server; _NotReady while none serves yet."""
        try:
            response = self.http.get("/health", timeout=10.0)
        except (httpx.ConnectError, httpx.TimeoutException) as exc:
            raise _NotReady(f"{type(exc).__name__}: {exc}", not isinstance(exc, httpx.ConnectError)) from exc
        if response.status_code == 200 and "weight_transfer_backend" not in response.text:
            self._refuse_stock_vllm()
        try:
            body = response.json()
        except ValueError as exc:
            raise _NotReady(f"{type(exc).__name__}: {exc}", True) from exc
        if response.status_code == 200:
            return body
        if body.get("status") == "degraded":
            log.warning("the server at %s is degraded: weights left mixed by a failed push (push the whole "
                        "model)", self.base_url)
            return body
        if body.get("status") == "failed":
            raise ServerError(503, "failed", f"the server at {self.base_url} failed: {body}")
        raise _NotReady(f"status {body.get('status')!r}", True)

    def _refuse_stock_vllm(self) -> None:
        """A server whose /health is not ours: a stock `vllm serve` (it answers 200 with no body) is named."""
        try:
            version = self.http.get("/version", timeout=10.0).json().get("version")
        except (httpx.HTTPError, ValueError, AttributeError):
            version = None
        what = f"a stock `vllm serve` (vLLM {version})" if version else "not `fastgrpo vllm-serve`"
        raise ServerError(400, "not_fastgrpo", (
            f"the server at {self.base_url} is {what}. fastgrpo's trainer needs the routes only `fastgrpo "
            "vllm-serve` has: /generate (a round's prompts, per-prompt seeds and n in one call, with token ids, the "
            "sampler's logprobs and the weight versions each completion ran under, which async rounds and the "
            "importance-sampling correction need) and /weights/* (a push checked before any collective, owned by "
            "one trainer, never mixing weights into a generation). Start the server with `fastgrpo vllm-serve "
            "--model <model>` instead: it serves vLLM's own API too (OpenAI routes, /metrics, vLLM's weight "
            "routes), so other clients of that server keep working."))

    def health(self) -> dict:
        """GET /health's body, also when it answers 503 (starting, degraded)."""
        return self._send("GET", "/health").json()

    # --- generation -----------------------------------------------------------

    def generate(self, prompts: list[str] | None = None, *, prompt_token_ids: list[list[int]] | None = None,
                 n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, max_tokens: int = 16, seed: int | None = None,
                 seeds: list[int] | None = None, stop: list[str] | None = None, ignore_eos: bool = False,
                 prompt_logprobs: bool = False, messages: list[list[dict]] | None = None,
                 max_tokens_per_prompt: list[int] | None = None, **sampling) -> GenerateResponse:
        """`seed` seeds every prompt alike; `seeds` gives one per prompt; `max_tokens_per_prompt` caps each prompt's
        completion on its own. `sampling`: the server's other sampling fields (min_tokens, stop_token_ids,
        presence_penalty, frequency_penalty)."""
        payload = dict(prompts=prompts, prompt_token_ids=prompt_token_ids, messages=messages, n=n,
                       temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                       repetition_penalty=repetition_penalty, max_tokens=max_tokens, seed=seed, seeds=seeds,
                       stop=stop, ignore_eos=ignore_eos, prompt_logprobs=prompt_logprobs,
                       max_tokens_per_prompt=max_tokens_per_prompt, **sampling)
        payload = {k: v for k, v in payload.items() if v is not None}
        return GenerateResponse.model_validate(self._request("POST", "/generate", json=payload))

    def chat(self, messages: list[list[dict]], **kwargs) -> GenerateResponse:
        """Chat conversations (a list of message lists); the server applies the chat template."""
        return self.generate(messages=messages, **kwargs)

    # --- LoRA adapters (a server started with --enable_lora) ----------------------

    def push_adapter(self, name: str, tensors: dict, config: dict, weight_version: int, owner: str | None = None) -> dict:
        """Load or replace adapter `name` (peft's tensor names and config) at `weight_version`; one request, the
        adapter's tensors only. Generations that name it (`generate(adapter=name)`) use the new version. `owner`:
        the run's token; the server keeps the name for the run that first pushed it (GRPOTrainer sends one)."""
        from fastgrpo.transfer.adapters import pack_adapter

        payload = pack_adapter(tensors, config, weight_version)
        headers = {"content-type": "application/octet-stream", **({ADAPTER_OWNER_HEADER: owner} if owner else {})}
        answer = self._request("PUT", f"/adapters/{name}", retry_connect=False, content=payload, headers=headers)
        self.pushed_instance = self.health()["instance"]
        return answer

    def delete_adapter(self, name: str, owner: str | None = None) -> None:
        self._request("DELETE", f"/adapters/{name}", retry_connect=False,
                      headers={ADAPTER_OWNER_HEADER: owner} if owner else None)

    def adapters(self) -> list[dict]:
        return self._request("GET", "/adapters")["adapters"]

    # --- agents recorded through the OpenAI chat route -----------------------------

    def rollout_url(self, rollout_id: str) -> str:
        """The OpenAI base URL that records an agent's chat calls under `rollout_id`."""
        return f"{self.base_url}/rollouts/{rollout_id}/v1"

    def open_rollout(self, rollout_id: str, model: str | None = None, **sampling) -> None:
        """Open `rollout_id` for an agent: its calls sample from `model` (an adapter pushed to the server; None: the
        base model) with `sampling` (temperature, top_p, top_k, min_p, repetition_penalty), whatever it asks for."""
        self._request("PUT", f"/rollouts/{rollout_id}", json={"model": model, **sampling})

    def rollout(self, rollout_id: str) -> RolloutRecording:
        """What the server recorded under `rollout_id`: its token sequences (usually one)."""
        return RolloutRecording.model_validate(self._request("GET", f"/rollouts/{rollout_id}"))

    def delete_rollout(self, rollout_id: str) -> None:
        self._request("DELETE", f"/rollouts/{rollout_id}")

    def reset_prefix_cache(self) -> None:
        self._request("POST", "/reset_prefix_cache")

    # --- weight sync ----------------------------------------------------------

    def init_weight_transfer(self, backend: str) -> None:
        """Open the group: this process is rank 0, the server's workers (TP x DP, every node's) the rest."""
        self.info = self.health()
        if backend != self.info["weight_transfer_backend"]:
            raise ValueError(
                f"the tensors call for {backend!r} but the server's engines use "
                f"{self.info['weight_transfer_backend']!r}: send CPU tensors to a CPU server and CUDA tensors "
                "to a GPU server (nccl; ipc where the server runs on the trainer's own GPU; shm takes CPU tensors "
                "from its own machine)"
            )
        self._request("GET", "/v1/models")  # a wrong API key fails here at once, whatever the backend
        world_size = self.info["weight_transfer_ranks"] + 1
        address, port = _address_seen_by(self.host, self.port), free_port()
        sender = sender_class(backend)(self.bucket_bytes)
        payload = {"master_address": address, "master_port": port, "world_size": world_size, "backend": backend,
                   "timeout_s": self.weight_transfer_timeout, "bucket_bytes": self.bucket_bytes}
        joined = open_sender(sender, lambda: self._request("POST", "/weights/init", retry_connect=False, json=payload),
                             address, port, world_size, self.weight_transfer_timeout,
                             peer=f"the server at {self.base_url}")
        self.sender, self.group_id = sender, joined["group_id"]

    def update_weights(self, weights, weight_version: int | None = None) -> int:
        """Push a model's parameters (gathered one at a time from ZeRO-3/FSDP shards), a dict, or
        (name, tensor) pairs to every DP rank. Returns the server's new weight version.

        Floating tensors travel in the server's dtype (half the bytes of float32 for bfloat16).
        """
        weights = as_weights(weights)
        if not len(weights):
            raise ValueError("update_weights got no tensors")
        backend = self._backend_for(weights.device.type)
        # The server closed our group (a restart, a failed push it cleaned up after): reopen it and push again.
        retrying = Retrying(retry=retry_if_exception(_group_closed), stop=stop_after_attempt(2), reraise=True)
        return retrying(self._push, weights, backend, weight_version)

    def _push(self, weights, backend: str, weight_version: int | None) -> int:
        import torch

        if self.sender is None or self.sender.backend != backend:
            self.close_weight_transfer()
            self.init_weight_transfer(backend)
        metas = weights.metas(getattr(torch, self.info["dtype"]))
        try:
            result = push_weights(_ServerControl(self, weight_version), self.sender, metas, iter(weights),
                                  self.weight_transfer_timeout)
        except (ServerError, WeightTransferError):
            self.close_weight_transfer()
            raise
        self.pushed_instance = self.info["instance"]  # the server process that holds these weights
        return result["weight_version"]

    def _backend_for(self, device_type: str) -> str:
        """For CPU tensors gloo, or shm where the server takes it; for CUDA tensors the server's GPU backend
        (nccl, or ipc on our own GPU)."""
        local, network = ("ipc", "nccl") if device_type == "cuda" else ("shm", "gloo")
        if self.sender is not None and self.sender.backend in (local, network):
            return self.sender.backend
        return local if self.health()["weight_transfer_backend"] == local else network

    def close_weight_transfer(self) -> None:
        if self.sender is not None:
            self.sender.close()
            group_id, self.sender, self.group_id = self.group_id, None, None
            try:
                self._request("POST", "/weights/close", retry_connect=False, json={"group_id": group_id})
            except (ServerError, ServerUnavailable, TimeoutError):
                pass  # the server may already have closed it after a failure

    def close(self) -> None:
        self.close_weight_transfer()
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
