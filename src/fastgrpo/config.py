"""GRPOConfig: TRL's GRPO fields (same names, same meanings) on top of transformers' TrainingArguments."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from fastgrpo.transfer.packing import ALIGN, MIN_BUCKET_BYTES

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
VLLM_MODES = ("server", "colocate")


class ConfigError(ValueError):
    """A GRPOConfig that cannot work; the message says how to fix it."""


@dataclass
class GRPOConfig(TrainingArguments):
    # --- data and model ---------------------------------------------------------
    model_init_kwargs: dict | None = field(default=None, metadata={"help": "kwargs for from_pretrained of the policy"})
    max_prompt_length: int | None = field(default=512, metadata={"help": "prompts are truncated on the left to this"})
    remove_unused_columns: bool = False  # reward functions receive every dataset column

    # --- generation ---------------------------------------------------------------
    num_generations: int = field(default=8, metadata={"help": "completions per prompt (the group size)"})
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "completions per generation round, all processes together"})
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "optimizer micro-steps served by one generation round (default: GA steps)"})

    # --- vLLM -------------------------------------------------------------------------
    use_vllm: bool = False
    vllm_mode: str = "server"
    vllm_server_base_url: str | None = None
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_server_api_key: str | None = field(
        default=None, metadata={"help": "the server's --api_key, if it was started with one (ours)"})
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    vllm_max_model_len: int | None = None
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_cap: float = 2.0
    vllm_weight_sync_bucket_mb: float = field(
        default=32.0, metadata={"help": "MiB per broadcast when pushing weights; two such buffers are held on each "
                                "side (see the README: choosing the bucket size)"})
    vllm_max_weight_staleness: int = field(
        default=0, metadata={"help": "accept generations from weights this many optimizer steps old (off-policy)"})

    # --- loss ---------------------------------------------------------------------------
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0 loads no reference model"})
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    reward_weights: list[float] | None = None
    share_prompt_prefix: bool = field(
        default=True, metadata={"help": "run each prompt of a micro-batch through the model once for all of its "
                                "completions (same logprobs and gradients, fewer tokens); off with gradient "
                                "checkpointing"})

    # --- logging ----------------------------------------------------------------------
    log_completions: bool = False
    num_completions_to_print: int | None = 4

    # TRL's defaults for these TrainingArguments
    learning_rate: float = 1e-6
    logging_steps: float = 1
    bf16: bool | None = None  # None: bf16 where the device has it (CUDA), float32 on CPU

    def __post_init__(self):
        if self.bf16 is None:
            import torch

            self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()
        if isinstance(self.scale_rewards, bool):  # TRL's older boolean spelling
            self.scale_rewards = "group" if self.scale_rewards else "none"
        self._check()

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def _check(self) -> None:
        def fail(message: str):
            raise ConfigError(message)

        if self.num_generations < 2:
            fail(f"num_generations={self.num_generations}: GRPO compares completions within a group, so it needs "
                 "at least 2 (8 is common)")
        if self.loss_type not in LOSS_TYPES:
            fail(f"loss_type={self.loss_type!r}: use one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALE_REWARDS:
            fail(f"scale_rewards={self.scale_rewards!r}: use one of {SCALE_REWARDS}")
        if self.vllm_mode not in VLLM_MODES:
            fail(f"vllm_mode={self.vllm_mode!r}: use 'server' (a `fastgrpo vllm-serve` process) or 'colocate'")
        if self.max_completion_length < 1:
            fail(f"max_completion_length={self.max_completion_length}: must be >= 1")
        if self.num_iterations < 1:
            fail(f"num_iterations={self.num_iterations}: must be >= 1")
        if self.epsilon <= 0 or self.effective_epsilon_high <= 0:
            fail("epsilon and epsilon_high must be > 0 (0.2 and 0.28 are common)")
        if self.temperature <= 0:
            fail(f"temperature={self.temperature}: GRPO samples, so it must be > 0 (1.0 is common)")
        if self.use_vllm and self.temperature > 2.0:
            fail(f"temperature={self.temperature}: vLLM samples at temperatures up to 2.0 only")
        if not 0.01 <= self.repetition_penalty <= 100:
            fail(f"repetition_penalty={self.repetition_penalty}: use a value in [0.01, 100] (1.0: no penalty)")
        if self.weight_sync_bucket_bytes < MIN_BUCKET_BYTES:
            fail(f"vllm_weight_sync_bucket_mb={self.vllm_weight_sync_bucket_mb}: use at least "
                 f"{MIN_BUCKET_BYTES / 2**20:.4f} MiB (32 is the default)")
        if self.vllm_max_weight_staleness < 0:
            fail("vllm_max_weight_staleness must be >= 0")

        # The generation batch: how many completions one round produces, all processes together.
        per_step = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            fail("set generation_batch_size or steps_per_generation, not both")
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        else:
            if self.generation_batch_size % per_step:
                fail(f"generation_batch_size={self.generation_batch_size} must be a multiple of "
                     f"per_device_train_batch_size x processes = {self.per_device_train_batch_size} x "
                     f"{self.world_size} = {per_step}")
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.generation_batch_size % self.num_generations:
            fail(f"the generation batch ({self.generation_batch_size} completions = per_device_train_batch_size "
                 f"{self.per_device_train_batch_size} x {self.world_size} processes x steps_per_generation "
                 f"{self.steps_per_generation}) is not divisible by num_generations={self.num_generations}: "
                 f"every prompt needs a whole group. Make the batch a multiple of {self.num_generations} "
                 f"(e.g. per_device_train_batch_size={self.num_generations}) or change num_generations.")
        if self.reward_weights is not None and any(not isinstance(w, (int, float)) for w in self.reward_weights):
            fail("reward_weights must be numbers, one per reward function")

    @property
    def weight_sync_bucket_bytes(self) -> int:
        """The bucket size in bytes, rounded down to the wire's alignment."""
        return int(self.vllm_weight_sync_bucket_mb * 2**20) // ALIGN * ALIGN

    @property
    def unique_prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations
