"""What every router of the server shares: its state, and errors as data."""

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse

from fastgrpo.serve.protocol import ErrorResponse, StartUpdateRequest
from fastgrpo.serve.engines import GenerationEngine, RWLock, ServerSettings
from fastgrpo.serve.specs import ModelSpecs


class ApiError(Exception):
    def __init__(self, status: int, type: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field


def error_response(status: int, type: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, type=type, field=field).model_dump(), status_code=status)


@dataclass
class WeightGroup:
    """An open weight-transfer group and its owner: the trainer that hosts its rendezvous."""

    group_id: str  # the owner's token: only requests that carry it may push to or close the group
    master_address: str
    master_port: int
    bucket_bytes: int = 0  # the trainer's bucket size (vLLM 0.26's NCCL engine wants it with every update)


@dataclass
class PendingPush:
    transfer_id: str
    request: StartUpdateRequest
    phase: Literal["announced", "loading"] = "announced"  # loading: from the drain of in-flight generations on
    expiry: asyncio.Task | None = None  # ends an announcement whose data never starts


@dataclass
class InFlight:
    """A generation request between admission and its last output: the weight versions it ran under.

    `versions[0]` is the version at admission (a lower bound: a request still queued in the engine when a
    push pauses it runs wholly on the new weights); each push that lands while it runs appends its version."""

    versions: list[int]
    push_failed: bool = False  # a push failed half-way while it ran: its tokens may mix weights


@dataclass
class ServerState:
    settings: ServerSettings
    engine: GenerationEngine
    tokenizer: object = None
    specs: ModelSpecs = field(default_factory=ModelSpecs)
    startup_error: str | None = None
    weight_version: int = 0
    # False from the moment a push starts touching the engines until one finishes whole; generation
    # refuses to run meanwhile rather than serve a mix of old and new weights.
    weights_consistent: bool = True
    last_push_error: str | None = None  # why the last push failed, until one succeeds
    group: WeightGroup | None = None
    # Admission (not the whole generation): a push waits only for requests being handed to the engines,
    # and requests that arrive during a push wait for it; running ones are paused in the engines.
    lock: RWLock = field(default_factory=RWLock)
    pending: PendingPush | None = None
    inflight: list[InFlight] = field(default_factory=list)
    adapters: object = None  # serve.adapters.AdapterRegistry (LoRA runs), set by create_app
    recorder: object = None  # serve.recordings.Recorder (agents' chat calls by rollout id), set by create_app
    chats: dict = field(default_factory=dict)  # rollouts.chat.ChatTokens per tool set (the OpenAI chat route)
    chat_template: str | None = None  # --chat_template, read: what vLLM's chat renders with, and recordings too
    vllm_api_ready: bool = False  # vLLM's serving classes are on the app (serve/vllm_api.py)
    abandoned_generations: int = 0
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)  # new at every start (a restart is another)  # generations cancelled because their client went away (serve/disconnects.py)

    def count_abandoned(self) -> None:
        self.abandoned_generations += 1

    @property
    def push_phase(self) -> Literal["none", "announced", "loading"]:
        return "none" if self.pending is None else self.pending.phase

    @property
    def ready(self) -> bool:
        return self.engine.engine is not None and self.tokenizer is not None and self.vllm_api_ready

    @property
    def max_model_len(self) -> int | None:
        engine = self.engine.engine
        return engine.model_config.max_model_len if engine is not None else self.settings.max_model_len

    @property
    def weight_transfer_ranks(self) -> int:
        """Inference ranks of a weight-transfer group: every worker of every DP rank, on every node."""
        return self.settings.world_size


def server_state(request: Request) -> ServerState:
    return request.app.state.server
