"""VLLMClient: the trainer's side of `fastgrpo vllm-serve` (generate, chat, weight sync).

Control messages go over HTTP (httpx); weights go over a collective (gloo for
CPU tensors, NCCL for CUDA tensors) in packed buckets, never one request per
tensor and never pickled. Only requests that cannot have changed server state
are retried (connection refused, health polling).
"""

import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx

from fastgrpo.serve.launcher import free_port
from fastgrpo.serve.protocol import GenerateResponse


class ServerError(RuntimeError):
    """The server answered with an error; `.status`, `.type` and `.message` come from its JSON body."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None):
        super().__init__(f"server error {status} ({type}): {message}")
        self.status, self.type, self.message, self.field = status, type, message, field


class ServerUnavailable(ConnectionError):
    pass


def _address_seen_by(host: str, port: int) -> str:
    """Our address on the route to `host`: what the server's workers must connect to."""
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: no packet is sent, this only picks the route
        return s.getsockname()[0]


class _GlooSender:
    """CPU tensors: fastgrpo's gloo backend (the same packing the workers unpack)."""

    backend = "gloo"

    def open(self, address: str, port: int, world_size: int, timeout_s: float) -> None:
        from fastgrpo.serve.gloo_transfer import open_group

        self.group = open_group(address, port, 0, world_size, timeout_s)
        self.buffers = [None, None]  # packing buffers, reused push after push

    def send(self, metas, tensors, bucket_bytes: int) -> None:
        from fastgrpo.serve.gloo_transfer import send_buckets

        send_buckets(self.group, metas, tensors, bucket_bytes, self.buffers)

    def close(self) -> None:
        self.group = None


class _NcclSender:
    """CUDA tensors: vLLM's NCCL endpoint and packed broadcast (needs vLLM on the trainer)."""

    backend = "nccl"

    def open(self, address: str, port: int, world_size: int, timeout_s: float) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        self.group = trainer_init(NCCLTrainerInitInfo(master_address=address, master_port=port,
                                                      world_size=world_size, rank=0))

    def send(self, metas, tensors, bucket_bytes: int) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        # Cast lazily to the wire dtype the workers were told (one tensor at a time).
        packed_nccl_broadcast_producer(iterator=((m.name, t.to(m.torch_dtype)) for m, t in zip(metas, tensors)),
                                       group=self.group, src=0, post_iter_func=lambda item: item[1])

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
        self.group = None


SENDERS = {"gloo": _GlooSender, "nccl": _NcclSender}


class VLLMClient:
    def __init__(self, base_url: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 timeout: float = 240.0, request_timeout: float = 600.0, api_key: str | None = None,
                 weight_transfer_timeout: float = 120.0, bucket_bytes: int | None = None):
        self.base_url = (base_url or f"http://{host}:{port}").rstrip("/")
        parsed = urlparse(self.base_url)
        self.host, self.port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(request_timeout, connect=10.0))
        self.weight_transfer_timeout = weight_transfer_timeout
        self.bucket_bytes = bucket_bytes
        self.sender = None
        self.info = self.wait_for_server(timeout)

    # --- plumbing -------------------------------------------------------------

    def _request(self, method: str, path: str, retry_connect: bool = True, **kwargs) -> dict:
        attempts = 3 if retry_connect else 1
        for attempt in range(attempts):
            try:
                response = self.http.request(method, path, **kwargs)
                break
            except httpx.ConnectError as exc:  # nothing reached the server: safe to retry
                if attempt == attempts - 1:
                    raise ServerUnavailable(
                        f"cannot connect to the fastgrpo server at {self.base_url}: {exc}. Check that "
                        "`fastgrpo vllm-serve` is running, the host and port, and any firewall between here "
                        "and there."
                    ) from exc
                time.sleep(0.5 * (attempt + 1))
            except httpx.TimeoutException as exc:
                raise TimeoutError(f"{method} {path} to {self.base_url} got no answer in time ({exc}); the "
                                   "server may be overloaded, or raise request_timeout") from exc
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500], "type": "http"}
        if response.status_code >= 400:
            raise ServerError(response.status_code, body.get("type", "http"), body.get("error", str(body)),
                              body.get("field"))
        return body

    def wait_for_server(self, timeout: float) -> dict:
        """Poll /health until every replica is ready; errors say what to check."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                response = self.http.get("/health", timeout=10.0)
                body = response.json()
                if response.status_code == 200:
                    return body
                last = f"status {body.get('status')!r}"
                if body.get("status") == "failed":
                    raise ServerError(503, "failed", f"the server at {self.base_url} failed: {body}")
            except (httpx.ConnectError, httpx.TimeoutException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"the fastgrpo server at {self.base_url} was not ready within {timeout:.0f} s (last: {last}). "
                    "Check that `fastgrpo vllm-serve` is running there, the host/port, firewalls, and its log; "
                    "the client and server should run the same fastgrpo version."
                )
            time.sleep(1.0)

    def health(self) -> dict:
        response = self.http.get("/health")
        return response.json()

    # --- generation -----------------------------------------------------------

    def generate(self, prompts: list[str] | None = None, *, prompt_token_ids: list[list[int]] | None = None,
                 n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, max_tokens: int = 16, seed: int | None = None,
                 stop: list[str] | None = None, ignore_eos: bool = False, prompt_logprobs: bool = False,
                 messages: list[list[dict]] | None = None) -> GenerateResponse:
        payload = dict(prompts=prompts, prompt_token_ids=prompt_token_ids, messages=messages, n=n,
                       temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                       repetition_penalty=repetition_penalty, max_tokens=max_tokens, seed=seed, stop=stop,
                       ignore_eos=ignore_eos, prompt_logprobs=prompt_logprobs)
        payload = {k: v for k, v in payload.items() if v is not None}
        return GenerateResponse.model_validate(self._request("POST", "/generate", json=payload))

    def chat(self, messages: list[list[dict]], **kwargs) -> GenerateResponse:
        """Chat conversations (a list of message lists); the server applies the chat template."""
        return self.generate(messages=messages, **kwargs)

    def reset_prefix_cache(self) -> None:
        self._request("POST", "/reset_prefix_cache")

    # --- weight sync ----------------------------------------------------------

    def init_weight_transfer(self, backend: str) -> None:
        """Open the group: this process is rank 0, the server's TP x DP workers the rest."""
        if backend != self.info["weight_transfer_backend"]:
            raise ValueError(
                f"the tensors call for {backend!r} but the server's engines use "
                f"{self.info['weight_transfer_backend']!r}: send CPU tensors to a CPU server and CUDA tensors "
                "to a GPU server"
            )
        world_size = self.info["world_size"] + 1
        address, port = _address_seen_by(self.host, self.port), free_port()
        sender = SENDERS[backend]()
        payload = {"master_address": address, "master_port": port, "world_size": world_size, "backend": backend,
                   "timeout_s": self.weight_transfer_timeout}
        if self.bucket_bytes:
            payload["bucket_bytes"] = self.bucket_bytes
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(self._request, "POST", "/weights/init", retry_connect=False, json=payload)
            try:
                sender.open(address, port, world_size, self.weight_transfer_timeout)
            except Exception as exc:
                server_said = f" The server said: {joined.exception()}" if joined.done() else ""
                raise TimeoutError(
                    f"the server's {world_size - 1} workers did not join the weight-transfer group at "
                    f"{address}:{port} ({exc}).{server_said} Check that the server can reach this machine at "
                    f"{address} (firewall) and that both sides run the same torch version."
                ) from exc
            joined.result()
        self.sender = sender

    def update_weights(self, weights, weight_version: int | None = None) -> int:
        """Push a model's parameters, or (name, tensor) pairs / a dict, to every replica.

        Floating tensors are cast to the server's dtype first (half the bytes of
        float32 for bfloat16). Returns the server's new weight version.
        """
        import torch

        from fastgrpo.serve.gloo_transfer import DEFAULT_BUCKET_BYTES, wire_tensors

        named = _named_tensors(weights)
        if not named:
            raise ValueError("update_weights got no tensors")
        tensors, metas, info = wire_tensors(named, getattr(torch, self.info["dtype"]))
        backend = "nccl" if tensors[0].is_cuda else "gloo"
        if self.sender is None:
            self.init_weight_transfer(backend)
        start = self._request("POST", "/weights/start", retry_connect=False, json={
            **info, "weight_version": weight_version, "timeout_s": self.weight_transfer_timeout})
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            done = pool.submit(self._request, "POST", "/weights/update", retry_connect=False,
                               json={"transfer_id": start["transfer_id"]})
            try:
                self.sender.send(metas, tensors, self.bucket_bytes or DEFAULT_BUCKET_BYTES)
            except Exception as exc:
                self.close_weight_transfer()
                server_said = f" The server said: {done.exception()}" if done.done() else ""
                raise TimeoutError(f"sending weights failed: the server's workers did not receive ({exc})."
                                   f"{server_said} The group is closed; the next update_weights reopens it.") from exc
            try:
                result = done.result()
            except ServerError:
                self.close_weight_transfer()
                raise
        finally:
            pool.shutdown(wait=False)  # never join a request stuck behind a failed collective
        return result["weight_version"]

    def close_weight_transfer(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
            try:
                self._request("POST", "/weights/close", retry_connect=False)
            except (ServerError, ServerUnavailable, TimeoutError):
                pass  # the server may already have closed it after a failure

    def close(self) -> None:
        self.close_weight_transfer()
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _named_tensors(weights) -> list:
    if hasattr(weights, "named_parameters"):
        return list(weights.named_parameters())  # deduplicates tied weights
    if isinstance(weights, dict):
        return list(weights.items())
    if isinstance(weights, Iterable):
        return list(weights)
    raise TypeError(f"update_weights takes a torch module, a dict or (name, tensor) pairs, not {type(weights)}")
