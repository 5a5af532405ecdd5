"""GRPOConfig: TRL's GRPO fields (same names, same meanings) on top of transformers' TrainingArguments."""

import logging
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from fastgrpo.rollouts.episode import DEFAULT_CONCURRENCY, DEFAULT_STEP_TIMEOUT_S
from fastgrpo.rollouts.tools import DEFAULT_MAX_TOOL_RESULT_CHARS, DEFAULT_TOOL_TIMEOUT_S
from fastgrpo.protocol import GENERATION_KWARGS
from fastgrpo.trainer.loss import (
    GLOBALLY_NORMALISED,
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    SCALE_REWARDS_MODES,
    VLLM_IS_MODES,
)
from fastgrpo.transfer.packing import ALIGN, MIN_BUCKET_BYTES

logger = logging.getLogger(__name__)

VLLM_MODES = ("server", "colocate")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")

# TRL GRPOConfig fields that fastgrpo does not implement: (TRL's default, what to do instead). Each is a
# field here too, so a TRL config constructs, and setting one to anything but TRL's default fails at once.
UNSUPPORTED_TRL_FIELDS = {
    "cache_implementation": (None, "generation without vLLM uses the model's default cache"),
    "vllm_model_impl": ("vllm", "start `fastgrpo vllm-serve` with the implementation you want"),
    "vllm_structured_outputs_regex": (None, "score the format with a reward function"),
    "vllm_group_port": (51216, "fastgrpo picks a free port for the weight group itself"),
    "log_unique_prompts": (False, "the completions table has every row"),
    "log_completions_hub_repo": (None, "completions are logged to report_to's table integrations"),
    "use_transformers_continuous_batching": (False, "use vLLM (use_vllm=True) for fast generation"),
    "transformers_continuous_batching_config": (None, "use vLLM (use_vllm=True) for fast generation"),
    "use_transformers_paged": (False, "use vLLM (use_vllm=True) for fast generation"),
}


def _positive(value) -> bool:
    return value > 0


def _at_least(low):
    return lambda value: value >= low


def _optional(valid):
    return lambda value: value is None or valid(value)


def _one_of(choices):
    return lambda value: value in choices


# Single-field checks: (field, valid(value), what to do; the error reads "field=value: what to do").
FIELD_BOUNDS = (
    ("num_generations", _at_least(2), "GRPO compares completions within a group, so it needs at least 2 (8 is common)"),
    ("pad_to_multiple_of", _optional(_at_least(1)), "use a positive int, 'auto' or None"),
    ("multi_objective_aggregation", _one_of(AGGREGATIONS), f"use one of {AGGREGATIONS}"),
    ("entropy_coef_delta", _at_least(0), "must be >= 0"),
    ("min_p", _optional(lambda p: 0.0 <= p <= 1.0), "use a probability in [0, 1] (None: off)"),
    ("loss_type", _one_of(LOSS_TYPES), f"use one of {LOSS_TYPES}"),
    ("scale_rewards", _one_of(SCALE_REWARDS_MODES), f"use one of {SCALE_REWARDS_MODES}"),
    ("importance_sampling_level", _one_of(IMPORTANCE_SAMPLING_LEVELS), "use 'token' or 'sequence' (GSPO)"),
    ("vllm_importance_sampling_mode", _one_of(VLLM_IS_MODES), f"use one of {VLLM_IS_MODES}"),
    ("top_entropy_quantile", lambda q: 0.0 <= q <= 1.0, "use a fraction in [0, 1] (1.0: every token)"),
    ("num_generations_eval", _optional(_at_least(1)),
     "must be >= 1 (1: one completion per eval prompt, advantages 0)"),
    ("vllm_mode", _one_of(VLLM_MODES), "use 'server' (a `fastgrpo vllm-serve` process) or 'colocate'"),
    ("max_tool_calling_iterations", _optional(_at_least(0)), "must be >= 0 (None: no limit)"),
    ("ddp_timeout", _positive,
     "must be > 0 seconds (the longest a collective between the training processes may wait)"),
    ("vllm_generation_timeout", _positive, "must be > 0 seconds"),
    ("environment_step_timeout", _positive, "must be > 0 seconds"),
    ("environment_concurrency", _at_least(1), "must be >= 1 (1: one step at a time)"),
    ("tool_timeout", _positive, "must be > 0 seconds"),
    ("max_tool_result_length", _at_least(1), "must be >= 1 character"),
    ("max_completion_length", _at_least(1), "must be >= 1"),
    ("num_iterations", _at_least(1), "must be >= 1"),
    ("temperature", _positive, "GRPO samples, so it must be > 0 (1.0 is common)"),
    ("repetition_penalty", lambda r: 0.01 <= r <= 100, "use a value in [0.01, 100] (1.0: no penalty)"),
)


class ConfigError(ValueError):
    """A GRPOConfig that cannot work; the message says how to fix it."""


@dataclass
class GRPOConfig(TrainingArguments):
    # Given as JSON text (a command-line flag, as TRL takes them), TrainingArguments reads these into dicts.
    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + [
        "model_init_kwargs", "transformers_continuous_batching_config", "generation_kwargs", "chat_template_kwargs"]

    # --- data and model ---------------------------------------------------------
    model_init_kwargs: dict | str | None = field(default=None, metadata={"help": "kwargs for from_pretrained of the policy"})
    trust_remote_code: bool = False
    disable_dropout: bool = field(default=False, metadata={"help": "set every dropout of the policy (and reference) "
                                                           "to 0"})
    shuffle_dataset: bool = True
    chat_template_kwargs: dict | str | None = field(default=None, metadata={"help": "passed to apply_chat_template"})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "ours (TRL removed it in 0.28): a prompt longer than this many tokens stops the run with an error "
                "naming it, never a silent cut; filter the dataset first (None: no limit)"})
    remove_unused_columns: bool = False  # reward functions receive every dataset column

    # --- generation ---------------------------------------------------------------
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (the group size)"})
    num_generations_eval: int | None = field(default=None, metadata={"help": "completions per eval prompt "
                                                                     "(default: num_generations)"})
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | str | None = field(default=None, metadata={"help": "more sampling fields: " +
                                                                   ", ".join(GENERATION_KWARGS)})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "completions per generation round, all processes together"})
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "optimizer micro-steps served by one generation round (default: GA steps)"})

    # --- vLLM -------------------------------------------------------------------------
    use_vllm: bool = False
    vllm_mode: str | None = field(default=None, metadata={
        "help": "'server' (a `fastgrpo vllm-serve` process) or 'colocate'. Unset, it is 'server' (TRL: 'colocate'), "
                "and a server that does not answer fails the start in seconds saying so; set it to 'server' to "
                "wait up to vllm_server_timeout for one that is starting"})
    vllm_server_base_url: str | None = None
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_server_api_key: str | None = field(
        default=None, metadata={"help": "the server's --api_key, if it was started with one (ours)"})
    vllm_generation_timeout: float = field(default=600.0, metadata={
        "help": "seconds one generation request to the server may take (ours): a round of many long completions "
                "on a slow server needs more. A request that fails for a reason that may pass (the server "
                "restarting, a dropped connection) is sent again with the same seeds; a restarted server gets the "
                "weights pushed again first"})
    vllm_gpu_memory_utilization: float = 0.3
    vllm_lora_name: str | None = field(default=None, metadata={
        "help": "LoRA (peft_config): this run's adapter name on the server (default: the output_dir's folder name "
                "and 8 hex digits of its path's digest); a name belongs to the run that first pushed it"})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={
        "help": "colocate on a GPU: free the engine's KV cache and offload its weights while the trainer trains"})
    vllm_tensor_parallel_size: int = 1
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "colocate engine's context length"})
    vllm_max_model_len: int | None = field(default=None, metadata={"help": "alias of vllm_max_model_length"})
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_cap: float | None = field(default=None, metadata={"help": "deprecated (TRL): "
                                                                              "vllm_importance_sampling_clip_max"})
    vllm_weight_sync_bucket_mb: float = field(
        default=32.0, metadata={"help": "MiB per broadcast when pushing weights; two such buffers are held on each "
                                "side (see the README: choosing the bucket size)"})
    vllm_max_weight_staleness: int | None = field(
        default=None, metadata={"help": "train on completions generated by weights at most this many optimizer "
                                "steps old (default: 0, or 1 with async_generation)"})
    async_generation: bool = field(
        default=False, metadata={"help": "generate the next rounds while training on this one (server mode), "
                                 "within vllm_max_weight_staleness"})

    # --- loss ---------------------------------------------------------------------------
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0 loads no reference model"})
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = field(default=None, metadata={"help": "two-sided clipping: cap the ratio at delta"})
    importance_sampling_level: str = field(default="token", metadata={"help": "'token', or 'sequence' (GSPO)"})
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    top_entropy_quantile: float = field(default=1.0, metadata={"help": "train on this top fraction of tokens by "
                                                               "entropy (1.0: all)"})
    off_policy_mask_threshold: float | None = field(default=None, metadata={
        "help": "drop negative-advantage completions whose mean log(p_sampler / p_policy) exceeds this"})
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None
    share_prompt_prefix: bool = field(
        default=True, metadata={"help": "run each prompt of a micro-batch through the model once for all of its "
                                "completions (same logprobs and gradients, fewer tokens); off with gradient "
                                "checkpointing"})
    padding_free: bool = field(
        default=True, metadata={"help": "with share_prompt_prefix: run a micro-batch as one sequence of its real "
                                "tokens (each prompt once, then every completion) rather than padded rows; same "
                                "logprobs and gradients, fewer FLOPs. For model types fastgrpo knows "
                                "(trainer/packing.py); others run padded"})

    # --- multi-turn rollouts (GRPOTrainer's tools / environment_factory) ------------------
    max_tool_calling_iterations: int | None = field(default=None, metadata={
        "help": "rounds of tool results an episode may get; a turn that calls tools after that ends it (None: until "
                "max_completion_length, which bounds the whole episode: turns, tool results and messages)"})
    tool_timeout: float = field(default=DEFAULT_TOOL_TIMEOUT_S, metadata={
        "help": "seconds a tool call may run; past that the model gets an error result and the episode goes on"})
    max_tool_result_length: int = field(default=DEFAULT_MAX_TOOL_RESULT_CHARS, metadata={
        "help": "characters a tool result may have; a longer one is replaced by an error result"})
    environment_step_timeout: float = field(default=DEFAULT_STEP_TIMEOUT_S, metadata={
        "help": "seconds an environment's step may take (ours); past that its episode ends there, the others go on"})
    environment_concurrency: int = field(default=DEFAULT_CONCURRENCY, metadata={
        "help": "a round's environments that step at once (ours; each in a thread): tool calls and environment "
                "steps of different episodes overlap"})

    # --- logging ----------------------------------------------------------------------
    log_completions: bool = False
    num_completions_to_print: int | None = None
    log_multimodal: bool = True  # TRL's; fastgrpo's prompts are text, so there is nothing more to log

    # --- TRL's regularisers, aggregation and precision ---------------------------------------
    vespo_k_pos: float = field(default=2.0, metadata={"help": "loss_type='vespo': gamma weight shape k, A >= 0"})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "loss_type='vespo': gamma weight rate, A >= 0"})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "loss_type='vespo': gamma weight shape k, A < 0"})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "loss_type='vespo': gamma weight rate, A < 0"})
    use_bias_correction_kl: bool = field(default=True, metadata={
        "help": "multiply the k3 KL term by the policy ratio (DeepSeek-V3.2's unbiased reverse-KL gradient); beta != 0"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus: loss - entropy_coef x mean token "
                                                       "entropy (0: none); the start value when adaptive"})
    use_adaptive_entropy: bool = field(default=False, metadata={
        "help": "each optimizer step, raise entropy_coef by entropy_coef_delta while the mean entropy is at or below "
                "entropy_target, lower it otherwise (Skywork-OR1); the bonus applies only at or below the target"})
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata={
        "help": "'sum_then_normalize': weighted sum of the rewards, then group advantages; 'normalize_then_sum': "
                "each reward normalised in its group, weighted sum, then normalised over the batch (GDPO)"})
    sync_ref_model: bool = field(default=False, metadata={
        "help": "every ref_model_sync_steps optimizer steps, the reference becomes alpha x policy + (1 - alpha) x "
                "reference (TR-DPO); needs beta != 0 and a full fine-tune"})
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    cast_lm_head_to_fp32: bool = field(default=False, metadata={
        "help": "the LM head's matmul and the logits in float32, also under bf16 autocast (training forwards)"})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={
        "help": "pad prompt and completion widths of each micro-batch to a multiple of this ('auto': 128 on Neuron, "
                "else none; padding changes no number, only shapes)"})
    router_aux_loss_coef: float | None = field(default=None, metadata={
        "help": "MoE load-balancing loss weight (None: the model config's own). fastgrpo adds no router loss: a "
                "Mixture-of-Experts model with a non-zero weight fails at start; set 0.0 to train it without"})

    # TRL's fields that fastgrpo does not implement (see UNSUPPORTED_TRL_FIELDS): set, they fail at start.
    cache_implementation: str | None = None
    vllm_model_impl: str = "vllm"
    vllm_structured_outputs_regex: str | None = None
    vllm_group_port: int = 51216
    log_unique_prompts: bool = False
    log_completions_hub_repo: str | None = None
    use_transformers_continuous_batching: bool = False
    transformers_continuous_batching_config: dict | str | None = None
    use_transformers_paged: bool = False

    # --- several training processes -------------------------------------------------------
    ddp_timeout: int = field(default=3600, metadata={
        "help": "seconds any collective between the training processes may wait before it fails with a message "
                "naming the rank and step (transformers' field; its default is 1800). The longest legitimate wait is "
                "one generation round, which the main process runs while the others wait"})
    ds3_gather_for_generation: bool = field(default=True, metadata={
        "help": "DeepSpeed ZeRO-3 with use_vllm=False: gather the whole policy for generation (fast, needs room for "
                "a full copy); False generates on the shards, gathering layer by layer at every token. FSDP2 always "
                "generates on its shards"})

    # TRL's defaults for these TrainingArguments
    learning_rate: float = 1e-6
    logging_steps: float = 10
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "off (TRL: on): prompt sharing runs each prompt once per micro-batch through the model's cache, "
                "which checkpointing drops. Turn it on for memory; prompt sharing then turns off"})
    bf16: bool | None = None  # None: bf16 where the device computes it fast (CUDA; a CPU with AMX), else float32

    def __post_init__(self):
        from fastgrpo.hardware import FAST_BF16_FLAGS, bf16_is_fast

        if self.bf16 is None:
            self.bf16 = bf16_is_fast(self.use_cpu)
        elif self.bf16 and self.use_cpu and not bf16_is_fast(True):
            warnings.warn(f"bf16=True on a CPU without a bf16 matrix unit ({' or '.join(FAST_BF16_FLAGS)}): torch "
                          "emulates bf16 there, about 100x slower than float32. Leave bf16 unset (None) to get "
                          "float32 on this machine.", stacklevel=3)
        # Unset, vllm_mode is fastgrpo's 'server' (TRL's is 'colocate'): remembered, so that a missing server
        # fails the start at once saying so instead of waiting out vllm_server_timeout (see _server_backend).
        self.vllm_mode_is_default = self.vllm_mode is None
        if self.vllm_mode is None:
            self.vllm_mode = "server"
        if isinstance(self.pad_to_multiple_of, str):  # TRL's spellings, the CLI's strings included
            if self.pad_to_multiple_of.lower() in ("none", "null"):
                self.pad_to_multiple_of = None
            elif self.pad_to_multiple_of != "auto":
                self.pad_to_multiple_of = int(self.pad_to_multiple_of)
        super().__post_init__()
        if self.pad_to_multiple_of == "auto":  # Neuron compiles once per shape; nowhere else does padding pay
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None
        if isinstance(self.scale_rewards, bool):  # TRL's older boolean spelling
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.vllm_importance_sampling_cap is not None:  # TRL's older name
            warnings.warn("vllm_importance_sampling_cap is deprecated (as in TRL): use "
                          "vllm_importance_sampling_clip_max", FutureWarning, stacklevel=3)
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        self._resolve()
        self._check()
        self._warn_incoherent()

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def _resolve(self) -> None:
        """The fields other fields decide: aliases, and defaults that depend on the rest of the config."""
        if self.vllm_max_model_len is not None:
            if self.vllm_max_model_length not in (None, self.vllm_max_model_len):
                raise ConfigError(f"vllm_max_model_length={self.vllm_max_model_length} and its alias "
                                  f"vllm_max_model_len={self.vllm_max_model_len} differ: set one")
            self.vllm_max_model_length = self.vllm_max_model_len
        self.vllm_max_model_len = self.vllm_max_model_length
        if self.vllm_max_weight_staleness is None:
            self.vllm_max_weight_staleness = 1 if self.async_generation else 0
        # The generation batch: how many completions one round produces, all processes together.
        per_step = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigError("set generation_batch_size or steps_per_generation, not both")
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        else:
            if self.generation_batch_size % per_step:
                raise ConfigError(f"generation_batch_size={self.generation_batch_size} must be a multiple of "
                                  f"per_device_train_batch_size x processes = {self.per_device_train_batch_size} "
                                  f"x {self.world_size} = {per_step}")
            self.steps_per_generation = self.generation_batch_size // per_step

    def _check(self) -> None:
        """Fail at construction, naming the field and the fix, for every config that cannot work."""
        for name, valid, advice in FIELD_BOUNDS:
            if not valid(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r}: {advice}")
        for name, (default, instead) in UNSUPPORTED_TRL_FIELDS.items():
            if getattr(self, name) != default:
                raise ConfigError(f"{name}={getattr(self, name)!r}: TRL's option is not supported by fastgrpo "
                                  f"({instead}); leave it at {default!r}")
        for check in (self._check_loss, self._check_generation, self._check_async, self._check_batches):
            message = check()
            if message:
                raise ConfigError(message)
        if self.reward_weights is not None and any(not isinstance(w, (int, float)) for w in self.reward_weights):
            raise ConfigError("reward_weights must be numbers, one per reward function")

    def _check_loss(self) -> str | None:
        if self.sync_ref_model:
            if self.beta == 0.0:
                return ("sync_ref_model=True while beta=0.0: the reference model is not used during training, so "
                        "there is nothing to synchronize; set sync_ref_model=False, or set beta to a non-zero value")
            if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
                return f"ref_model_mixup_alpha={self.ref_model_mixup_alpha}: use a fraction in [0, 1]"
            if self.ref_model_sync_steps < 1:
                return f"ref_model_sync_steps={self.ref_model_sync_steps}: must be >= 1"
        if self.use_adaptive_entropy and not self.entropy_coef_min <= self.entropy_coef_max:
            return f"entropy_coef_min={self.entropy_coef_min} must not exceed entropy_coef_max={self.entropy_coef_max}"
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and not low < high:
            return f"vllm_importance_sampling_clip_min={low} must be below vllm_importance_sampling_clip_max={high}"
        if self.vllm_importance_sampling_mode.endswith("truncate") and low is None and high is None:
            return (f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} clamps the ratio: set "
                    "vllm_importance_sampling_clip_max (3.0 is TRL's default)")
        if self.epsilon <= 0 or self.effective_epsilon_high <= 0:
            return "epsilon and epsilon_high must be > 0 (0.2 and 0.28 are common)"
        if self.delta is not None and self.delta <= 1 + self.effective_epsilon_high:
            return (f"delta={self.delta} caps the ratio above the clip range: it must exceed 1 + epsilon_high = "
                    f"{1 + self.effective_epsilon_high} (TRL's paper uses 1.5 to 2)")
        if self.delta is not None and self.loss_type in ("cispo", "sapo"):
            return f"delta clips the ratio of the clipped losses; loss_type={self.loss_type!r} has no such ratio"
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            return "sapo_temperature_pos and sapo_temperature_neg must be > 0"
        if (self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction
                and self.vllm_importance_sampling_mode not in ("token_truncate", "token_mask")):
            return (f"loss_type='vespo' folds the sampler's token ratios into its weights: it needs "
                    f"vllm_importance_sampling_mode 'token_truncate' or 'token_mask', not "
                    f"{self.vllm_importance_sampling_mode!r} (or vllm_importance_sampling_correction=False)")
        return None

    def _check_generation(self) -> str | None:
        for key in self.generation_kwargs or {} if self.use_vllm else ():  # without vLLM: GenerationConfig's keys
            if key not in GENERATION_KWARGS:
                own = {"max_tokens": "max_completion_length"}.get(key, key)
                instead = (f"set GRPOConfig.{own} instead (the loss uses it too)"
                           if own in self.__dataclass_fields__ else f"the supported keys are {GENERATION_KWARGS}")
                return f"generation_kwargs[{key!r}] is not supported: {instead}"
        if self.use_vllm and self.temperature > 2.0:
            return f"temperature={self.temperature}: vLLM samples at temperatures up to 2.0 only"
        if self.vllm_enable_sleep_mode and not (self.use_vllm and self.vllm_mode == "colocate"):
            return ("vllm_enable_sleep_mode=True puts a colocated engine to sleep while the trainer trains: it needs "
                    "use_vllm=True and vllm_mode='colocate' (a server's engines are on devices of their own)")
        if self.vllm_enable_sleep_mode and self.use_cpu:
            return "vllm_enable_sleep_mode=True needs a GPU: vLLM's CPU build has no sleep mode"
        if self.weight_sync_bucket_bytes < MIN_BUCKET_BYTES:
            return (f"vllm_weight_sync_bucket_mb={self.vllm_weight_sync_bucket_mb}: use at least "
                    f"{MIN_BUCKET_BYTES / 2**20:.4f} MiB (32 is the default)")
        return None

    def _check_async(self) -> str | None:
        if self.vllm_max_weight_staleness < 0:
            return "vllm_max_weight_staleness must be >= 0"
        if not self.async_generation:
            return None
        if not (self.use_vllm and self.vllm_mode == "server"):
            where = "with use_vllm=False" if not self.use_vllm else "in colocate mode"
            return (f"async_generation needs a generator on devices of its own, a `fastgrpo vllm-serve` server "
                    f"(use_vllm=True, vllm_mode='server'): {where} generation runs on the trainer's devices, so "
                    "it cannot overlap training")
        if self.vllm_max_weight_staleness < 1:
            return ("async_generation=True with vllm_max_weight_staleness=0: a round generated while the trainer "
                    "trains is at least one step old; allow 1 (the default) or more, or turn async off")
        return None

    def _check_batches(self) -> str | None:
        """A round holds whole groups and whole optimizer steps (or a whole part of one)."""
        spg, ga = self.steps_per_generation, self.gradient_accumulation_steps
        if spg % ga and ga % spg:
            return (f"steps_per_generation={spg} and gradient_accumulation_steps={ga}: a generation round must hold "
                    "whole optimizer steps (steps_per_generation a multiple of GA) or a whole part of one (GA a "
                    "multiple of steps_per_generation)")
        if self.loss_type in GLOBALLY_NORMALISED and spg % ga:
            return (f"loss_type={self.loss_type!r} normalises each optimizer step by its own token count, which is "
                    f"known only when a round holds whole steps: make steps_per_generation ({spg}) a multiple of "
                    f"gradient_accumulation_steps ({ga})")
        if self.generation_batch_size % self.num_generations:
            return (f"the generation batch ({self.generation_batch_size} completions = per_device_train_batch_size "
                    f"{self.per_device_train_batch_size} x {self.world_size} processes x steps_per_generation "
                    f"{self.steps_per_generation}) is not divisible by num_generations={self.num_generations}: "
                    f"every prompt needs a whole group. Make the batch a multiple of {self.num_generations} "
                    f"(e.g. per_device_train_batch_size={self.num_generations}) or change num_generations.")
        if self.eval_strategy != "no":
            eval_rows = self.per_device_eval_batch_size * self.world_size
            group = self.num_generations_eval or self.num_generations
            if eval_rows % group:
                return (f"the eval batch (per_device_eval_batch_size {self.per_device_eval_batch_size} x "
                        f"{self.world_size} processes = {eval_rows}) must hold whole groups of {group} completions "
                        f"(num_generations_eval): make it a multiple of {group}")
        return None

    def _warn_incoherent(self) -> None:
        """TRL's warnings for combinations that run but do not do what their papers do, and one of ours (an
        adaptive-entropy target that TRL's own docs call too low to engage)."""
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            logger.warning("loss_type='luspo' with importance_sampling_level=%r: the paper's setup is 'sequence'",
                           self.importance_sampling_level)
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            logger.warning("loss_type='vespo' computes sequence-level weights itself: importance_sampling_level "
                           "should be 'token' (the default)")
        if self.importance_sampling_level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            logger.warning("importance_sampling_level='sequence' with loss_type=%r: that loss sums per-token terms, "
                           "which weights each sequence by its length instead of the per-sequence objective; GSPO's "
                           "setup is loss_type='grpo'", self.loss_type)
        if self.use_adaptive_entropy and self.entropy_target < 0.5:
            logger.warning("use_adaptive_entropy with entropy_target=%s: language models' token entropies are "
                           "usually 2-10 nats, so the bonus engages only on near-total collapse; set the target near "
                           "the `entropy` the run logs early", self.entropy_target)

    def check_prompt_length(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's ids, or a ValueError when they exceed max_prompt_length: never a silent cut (a cut loses
        the system prompt or few-shot examples that the reward functions still see)."""
        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            raise ValueError(
                f"a prompt has {len(prompt_ids)} tokens, more than max_prompt_length={self.max_prompt_length}. "
                "fastgrpo does not cut prompts (TRL removed the field in 0.28 for that reason): drop long prompts "
                "from the dataset (dataset.filter(...)), or raise or unset max_prompt_length")
        return prompt_ids

    @property
    def weight_sync_bucket_bytes(self) -> int:
        """The bucket size in bytes, rounded down to the wire's alignment."""
        return int(self.vllm_weight_sync_bucket_mb * 2**20) // ALIGN * ALIGN

    @property
    def unique_prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations
