"""What every router of the server shares: its state, and the dependency that hands it to a route."""

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends, Request

from fastgrpo.protocol import StartUpdateRequest
from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.serve.adapters import AdapterRegistry
from fastgrpo.serve.engines import GenerationEngine, RWLock, ServerSettings
from fastgrpo.serve.recordings import Recorder
from fastgrpo.serve.specs import ModelSpecs

if TYPE_CHECKING:  # transformers is slow to import, and only the running server holds a tokenizer
    from transformers import PreTrainedTokenizerBase


@dataclass
class WeightGroup:
    """An open weight-transfer group and its owner: the trainer that hosts its rendezvous."""

    group_id: str  # the owner's token: only requests that carry it may push to or close the group
    master_address: str
    master_port: int
    bucket_bytes: int = 0  # the trainer's bucket size (vLLM 0.26's NCCL engine wants it with every update)


@dataclass
class VllmPush:
    """A push through vLLM's weight routes, from /start_weight_update to /finish_weight_update
    (serve/routes/vllm_weights.py)."""

    was_consistent: bool  # were the weights whole before it (a push that names only some tensors keeps that)
    names: list[str] = field(default_factory=list)  # the tensors loaded so far
    touched: float = field(default_factory=time.monotonic)  # its last call
    loading: int = 0  # /update_weights or /finish_weight_update calls running: the push is not idle
    idle: asyncio.Task | None = None  # fails the push once it sees no call for a while


@dataclass
class PendingPush:
    transfer_id: str
    request: StartUpdateRequest | VllmPush | None  # ours (/weights/start) or one through vLLM's weight routes
    phase: Literal["announced", "loading"] = "announced"  # loading: from the drain of in-flight generations on
    expiry: asyncio.Task | None = None  # ends an announcement whose data never starts
    load_deadline: float | None = None  # time.monotonic() by which its load has ended or failed (cleanup aside)
    # A push in parts (ipc, shm): one /weights/update per part, the engines held between them.
    was_consistent: bool = False  # were the weights whole before its first part
    loaded: int = 0  # announced tensors loaded so far, in order
    began: float = 0.0  # time.perf_counter() at its first part
    part_loading: bool = False  # a part's request is being served
    touched: float = 0.0  # time.monotonic() when its last part loaded
    idle: asyncio.Task | None = None  # fails the push if its next part does not come


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
    adapters: AdapterRegistry  # LoRA runs' adapters
    recorder: Recorder  # agents' chat calls, by rollout id
    tokenizer: "PreTrainedTokenizerBase | None" = None  # set once the engines run
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
    chats: dict[str, ChatTokens] = field(default_factory=dict)  # per tool set, as JSON (the recorded chat route)
    chat_template: str | None = None  # --chat_template, read: what vLLM's chat renders with, and recordings too
    vllm_api_ready: bool = False  # vLLM's serving classes are on the app (serve/vllm_api.py)
    weight_transfer_any_address: bool = False  # a group's master_address need not be its requester's
    abandoned_generations: int = 0  # generations cancelled because their client went away (serve/disconnects.py)
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)  # new at every start (a restart is another)

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
    """The dependency through which routes get the state: whatever app they are mounted on holds it in
    `app.state.server` (create_app's, or a test's)."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]  # a route's `state: State` parameter
