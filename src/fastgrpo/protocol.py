"""Typed requests and responses of the generation server (FastAPI validates them, 422 -> 400)."""

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from fastgrpo.transfer.base import DEFAULT_BUCKET_BYTES
from fastgrpo.transfer.packing import ALIGN, MIN_BUCKET_BYTES


class ErrorResponse(BaseModel):
    error: str  # what went wrong and what to do about it
    type: str  # "invalid_request", "not_ready", "engine_dead", "weight_transfer", ...
    field: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


# The limits of /generate's sampling fields (vLLM's OpenAI routes validate with vLLM's own models).
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]  # the vocabulary's upper bound is checked against the served tokenizer
Completions = Annotated[int, Field(ge=1, le=1024, description="completions per prompt")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="vLLM's own limit")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1, le=2**31 - 1, description="-1 or 0: no top-k; the engine keeps it as int32")]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
# Logits are divided by it: a penalty near 0 overflows them, and the logprobs come out NaN (the fuzzer's case).
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=100.0)]
MaxTokens = Annotated[int, Field(ge=1, description="new tokens per completion")]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, description="what the engine's 64-bit generators accept")]
StopStrings = Annotated[list[NonEmptyStr], Field(max_length=64)]


class SamplerFields(BaseModel):
    """The sampler's settings, with vLLM's meanings."""

    n: Completions = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    seed: Seed | None = None


Penalty = Annotated[float, Field(ge=-2.0, le=2.0, description="vLLM's own limit")]


class SamplingFields(SamplerFields):
    """Everything a generation needs besides its prompts."""

    max_tokens: MaxTokens = 16
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop: StopStrings | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    ignore_eos: bool = False
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0

    @model_validator(mode="after")
    def _min_within_max(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is more than max_tokens={self.max_tokens}")
        return self


# The fields a trainer may set through GRPOConfig.generation_kwargs: those GRPOConfig has no field of its own for.
GENERATION_KWARGS = ("min_tokens", "stop", "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty")


class GenerateRequest(SamplingFields):
    """Exactly one of `prompts` (text), `prompt_token_ids` or `messages` (chat, template applied)."""

    prompts: list[NonEmptyStr] | None = None
    prompt_token_ids: list[list[TokenId]] | None = None
    messages: list[Annotated[list[ChatMessage], Field(min_length=1)]] | None = None
    prompt_logprobs: bool = Field(False, description="also return each prompt token's logprob")
    seeds: list[Seed] | None = Field(None, description="one seed per prompt (completion j of prompt i samples with "
                                     "seeds[i] + j); instead of `seed`, which seeds every prompt alike")
    adapter: str | None = Field(None, description="a LoRA adapter pushed to this server (PUT /adapters/{name}); "
                                "none: the base model. weight_versions then count the adapter's versions")
    max_tokens_per_prompt: list[MaxTokens] | None = Field(
        None, description="one max_tokens per prompt, instead of max_tokens for all (multi-turn episodes: what "
                          "each has left of its budget)")

    @model_validator(mode="after")
    def _one_prompt_kind(self):
        given = [k for k in ("prompts", "prompt_token_ids", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'prompts' (text), 'prompt_token_ids' or 'messages' (chat); "
                f"got {given or 'none'}"
            )
        batch = getattr(self, given[0])
        if len(batch) == 0:
            raise ValueError(f"'{given[0]}' is empty: send at least one prompt")
        if self.prompt_token_ids is not None and any(len(ids) == 0 for ids in self.prompt_token_ids):
            raise ValueError("'prompt_token_ids' holds an empty prompt: every prompt needs at least one token")
        if self.seeds is not None:
            if self.seed is not None:
                raise ValueError("give 'seed' (one for every prompt) or 'seeds' (one per prompt), not both")
            if len(self.seeds) != len(batch):
                raise ValueError(f"'seeds' has {len(self.seeds)} entries for {len(batch)} prompts: give one per prompt")
        if self.max_tokens_per_prompt is not None:
            if len(self.max_tokens_per_prompt) != len(batch):
                raise ValueError(f"'max_tokens_per_prompt' has {len(self.max_tokens_per_prompt)} entries for "
                                 f"{len(batch)} prompts: give one per prompt")
            if self.min_tokens > min(self.max_tokens_per_prompt):
                raise ValueError(f"min_tokens={self.min_tokens} is more than the smallest max_tokens_per_prompt")
        return self

    def max_tokens_of(self, count: int) -> list[int]:
        return list(self.max_tokens_per_prompt) if self.max_tokens_per_prompt is not None else [self.max_tokens] * count


class Completion(BaseModel):
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, under the sampling distribution
    text: str
    finish_reason: str | None  # "stop", "length", or None when aborted
    # The weight versions it ran under: [first, last]. first is the version when the request was admitted,
    # last the newest one a push loaded while it ran; equal unless a push landed in flight.
    weight_versions: list[int]
    dp_rank: int | None = None  # the vLLM DP rank that generated it; None where vLLM chose (--load_balance vllm)


class PromptResult(BaseModel):
    prompt_token_ids: list[int]
    prompt_logprobs: list[float | None] | None = None  # first token has none
    completions: list[Completion]  # a prompt's completions may come from several DP ranks (see dp_rank)


class GenerateResponse(BaseModel):
    results: list[PromptResult]
    weight_version: int
    instance: str = ""  # this server process's id: another one (a restart) holds none of the weights pushed here


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "degraded", "failed"]
    model: str
    # one per vLLM DP rank: rank, node (local / remote), devices, state, load_tokens (ours), waiting and running
    # (vLLM's, DP > 1), error
    dp_ranks: list[dict]
    device_type: Literal["cpu", "gpu"]  # what each rank's "devices" name: CPU cores, or GPU indices
    tensor_parallel_size: int
    data_parallel_size: int
    world_size: int  # TP x DP, every node's
    weight_transfer_ranks: int  # TP x DP: the inference ranks of a weight-transfer group (the trainer is one more)
    weight_version: int
    instance: str  # this server process's id, new at every start: a trainer tells a restarted server by it
    abandoned_generations: int  # generations cancelled (and aborted in the engines) because their client went away
    weights_consistent: bool
    weight_push: Literal["none", "announced", "loading"]  # announced: validated, its data not started yet
    last_push_error: str | None  # why the last push failed, until one succeeds
    weight_transfer_backend: str
    dtype: str
    max_model_len: int | None


class InitTransferRequest(BaseModel):
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=2)
    backend: Literal["gloo", "nccl", "ipc", "shm"] | None = None  # default: the server's (gloo on CPU, nccl on GPU)
    bucket_bytes: int = Field(DEFAULT_BUCKET_BYTES, ge=MIN_BUCKET_BYTES, multiple_of=ALIGN,
                              description="bytes per broadcast; the trainer packs and the workers unpack by it")
    timeout_s: float = Field(120.0, gt=0, le=3600)


class InitTransferResponse(BaseModel):
    group_id: str  # the owner's token: send it with every /weights/start and /weights/close
    world_size: int
    backend: str


class GroupRequest(BaseModel):
    group_id: str = Field(description="from /weights/init: only the group's owner may push to or close it")


class StartUpdateRequest(GroupRequest):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    weight_version: int | None = Field(None, ge=0, description="version to assign; default: current + 1")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="how long to wait for the trainer's data")

    @model_validator(mode="after")
    def _same_lengths(self):
        if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
            raise ValueError(
                f"names, dtype_names and shapes need one entry per tensor; got "
                f"{len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)}"
            )
        if not self.names:
            raise ValueError("'names' is empty: push at least one tensor")
        return self


class StartUpdateResponse(BaseModel):
    transfer_id: str
    num_tensors: int
    bytes: int


class AdapterInfo(BaseModel):
    name: str
    weight_version: int
    lora_id: int  # vLLM's id of this version
    rank: int
    bytes: int  # the pushed payload
    seconds: float | None = None  # a push's time on the server (write + load on every DP rank)


class AdapterListResponse(BaseModel):
    adapters: list[AdapterInfo]


class PushPart(BaseModel):
    """One part of a push whose workers read the trainer's memory (--weight_transfer_backend ipc or shm):
    announced tensors [first, first + len(tensor_sizes)), packed back to back in the trainer's buffer. Parts come
    in order, one request each; the last one ends the push."""

    first: int = Field(ge=0, description="index of the part's first tensor among the announced ones")
    tensor_sizes: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="bytes of each tensor")
    last: bool
    # ipc: the buffer's CUDA IPC handle, pickled and base64-encoded as vLLM's HTTP weight-sync client sends it.
    ipc_handles_pickled: str | None = None
    shm_name: str | None = None  # shm: the buffer's file in /dev/shm (fastgrpo-weights-<32 hex>)


# Which field of a part carries the buffer's handle, by backend.
PART_HANDLE_FIELDS = {"ipc": "ipc_handles_pickled", "shm": "shm_name"}


class FinishUpdateRequest(BaseModel):
    transfer_id: str
    part: PushPart | None = None  # ipc and shm pushes; gloo and nccl send everything in one request


class OkResponse(BaseModel):
    ok: bool = True


class WeightVersionResponse(BaseModel):
    weight_version: int
    seconds: float | None = None


class PushPartResponse(BaseModel):
    """A part of a push loaded; the push goes on (the last part answers with the new weight version)."""

    tensors_loaded: int
    tensors: int


class RecordedSequence(BaseModel):
    """One token sequence of a recorded rollout: its first prompt, then everything after it. completion_mask is 1
    on the tokens the model generated (logprobs: the sampler's there, 0.0 elsewhere)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]
    logprobs: list[float]
    calls: int  # chat calls it holds
    weight_versions: list[int]  # [oldest, newest] its calls ran under


class RolloutPolicy(BaseModel):
    """What a rollout samples from, fixed by the trainer that opens it (`PUT /rollouts/{id}`): the run's policy
    (an adapter it pushed, or the base model) and its sampling settings, whatever its agent asks for."""

    model: NonEmptyStr | None = Field(None, description="a LoRA adapter on this server; None: the base model")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0


class RolloutRecording(BaseModel):
    rollout_id: str
    sequences: list[RecordedSequence]  # one, unless a call did not continue the previous one
    policy: RolloutPolicy | None = None  # the trainer's, when it opened the rollout
    # Sampling fields the agent asked for that the policy overrode, with the values it asked for.
    overridden: dict[str, float] = Field(default_factory=dict)
