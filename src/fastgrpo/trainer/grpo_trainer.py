"""GRPOTrainer: TRL's GRPO workflow on transformers' Trainer, with generation on vLLM.

One generation round serves `steps_per_generation` micro-steps: the sampler hands
each process its share of a generation batch (every prompt `num_generations` times
in a row), the round generates completions (each prompt with its own seed), scores
them, computes group advantages over the whole batch (all processes), and cuts it
into micro-batches: rows dealt to the round's optimizer steps at random, ordered to
pad little inside each (batching.py). A round that serves later steps keeps the
generating policy's logprobs for their ratio. After every optimizer step the new
weights go to the generator. Checkpoints keep the buffered round, so a resume in
the middle of one is exact.
"""

import atexit
import contextlib
import copy
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import defaultdict
from urllib.parse import urlparse

import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, set_seed

from fastgrpo.config import GRPOConfig
from fastgrpo.hardware import keep_freed_memory, usable_cores
from fastgrpo.trainer.async_rounds import (RoundProducer, cores_shared_with_server, first_step, staleness,
                                            too_stale)
from fastgrpo.trainer.batching import (completion_token_cost, pad_rows, pad_to_multiple, parts_of, round_layout,
                                      split_round)
from fastgrpo.trainer.collectives import (ExplainedError, explain, gathered_max, is_collective_failure,
                                         set_timeout)
from fastgrpo.trainer.forward import PromptSharingUnsupported, completion_logits, prompt_groups
from fastgrpo.trainer.packing import pack, packed_completion_logits, packing_unsupported, unpack
from fastgrpo.trainer.generation import (
    ColocateBackend,
    GenerationBackend,
    Sampling,
    ServerBackend,
    TransformersBackend,
    derived_seed,
    prompt_seeds,
)
from fastgrpo.trainer.loss import (
    GLOBALLY_NORMALISED,
    AdaptiveEntropy,
    entropy_bonus,
    entropy_from_logits,
    get_high_entropy_mask,
    get_off_policy_mask,
    group_advantages,
    grpo_loss,
    normalize_then_sum_advantages,
    selective_log_softmax,
    weighted_rewards,
)
from fastgrpo.trainer.lora import LoraSync, adapter_config, adapter_tensors, default_adapter_name, run_identity
from fastgrpo.trainer.multi_turn import MultiTurn, RoundRollout, turn_generator
from fastgrpo.trainer.reporting import report_completions
from fastgrpo.trainer.rewards import RewardModel, compute_rewards, env_reward, prepare_reward_funcs, reward_func_name
from fastgrpo.trainer.sampler import RepeatedStream, RepeatSampler
from fastgrpo.trainer.sharding import (check_layout, full_tensors, gathered_adapter, generation_weights,
                                       prepare_reference, reshard, sharded)
from fastgrpo.transfer import ModelWeights

logger = logging.getLogger(__name__)


ROUND_STATE = "fastgrpo_round_state_{rank}.pt"  # in each checkpoint folder, one per process
COMPLETION_SEEDS = -7  # generate_completions' seeds: apart from the rounds' (indices >= 0) and evaluation's
WEIGHT_SYNC_ATTEMPTS = 3  # a push that fails for a reason that may pass is tried again (see sync_weights)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the half-written folder is gone."""


# vllm_mode left unset means fastgrpo's 'server', where a TRL script expects 'colocate': with nothing listening
# at the server's address, the start fails this soon, saying so, rather than after vllm_server_timeout.
UNSET_MODE_WAIT_S = 10.0
UNSET_MODE_HINT = ("GRPOConfig.vllm_mode was not set, and fastgrpo's default is 'server' (TRL's is 'colocate'). "
                   "Start `fastgrpo vllm-serve --model <model>` there, set vllm_mode='colocate' to generate inside "
                   "this process as TRL does, or set vllm_mode='server' to wait up to vllm_server_timeout for a "
                   "server that is starting")
SERVER_RESTARTED = "server-restarted"  # in _generate's broadcast: every process pushes again


class StaleGenerationError(RuntimeError):
    pass


class WeightSyncError(ExplainedError):
    """A push failed on some rank (every rank raises it): its own transport errors are not collectives'."""


class _SyncWeightsCallback(TrainerCallback):
    """Push weights to the generator when training starts and after every optimizer step."""

    def __init__(self, trainer: "GRPOTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sync_weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sync_weights()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._stop_producer()


class _SyncReferenceCallback(TrainerCallback):
    """sync_ref_model (TR-DPO): every ref_model_sync_steps optimizer steps, reference = alpha x policy +
    (1 - alpha) x reference, before the next step's reference logprobs are computed."""

    def __init__(self, trainer: "GRPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            t = self.trainer
            mix_into(t.ref_model, t.accelerator.unwrap_model(t.model), args.ref_model_mixup_alpha)


def _identity_collator(features):
    return features


class GRPOTrainer(Trainer):
    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None, tool_call_parser=None):
        # TRL 1.16's parameters in TRL's order; tool_call_parser is ours.
        args = args or GRPOConfig(output_dir="grpo-output")
        if not isinstance(args, GRPOConfig):
            raise TypeError("args must be a fastgrpo.GRPOConfig")
        init_kwargs = dict(args.model_init_kwargs or {})
        init_kwargs.setdefault("dtype", torch.float32)  # master weights; bf16 comes from autocast
        if args.trust_remote_code:
            init_kwargs.setdefault("trust_remote_code", True)
        if isinstance(model, str):
            from fastgrpo.models import resolve_model

            self.model_path = resolve_model(model)
            policy_kwargs = dict(init_kwargs)
            if quantization_config is not None:
                if "quantization_config" in policy_kwargs:
                    raise ValueError("quantization_config was given both to the trainer and in "
                                     "args.model_init_kwargs: give it once")
                policy_kwargs["quantization_config"] = quantization_config
            model = AutoModelForCausalLM.from_pretrained(self.model_path, **policy_kwargs)
        else:
            if quantization_config is not None:
                logger.warning("quantization_config is ignored: the model was given already loaded (as TRL does)")
            self.model_path = model.config._name_or_path
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=args.trust_remote_code)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        self.tokenizer = processing_class
        self.lora = None
        if peft_config is not None:  # TRL's meaning: train these adapters on the (frozen) model
            from peft import PeftModel, get_peft_model

            if isinstance(model, PeftModel):
                raise ValueError("peft_config was given with a model that already has adapters: pass the base "
                                 "model, or the PeftModel without peft_config")
            if args.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
            # The adapters' random initialisation from the run's seed (Trainer seeds only later): the same on
            # every process, and the same run after run.
            set_seed(args.seed)
            model = get_peft_model(model, peft_config)
            if args.use_vllm:
                self.lora = LoraSync(model, args.vllm_lora_name or default_adapter_name(args.output_dir))

        self.multi_turn = None
        if tools or environment_factory is not None or rollout_func is not None:
            if args.async_generation and rollout_func is not None:
                raise ValueError("async_generation=True with a rollout_func: the function takes the trainer and "
                                 "runs when the round is due; set async_generation=False (tools and environments "
                                 "do run ahead)")
            self.multi_turn = MultiTurn(processing_class, args, tools, environment_factory, rollout_func,
                                        tool_call_parser)
            if train_dataset is None and environment_factory is not None and not isinstance(environment_factory, dict):
                train_dataset = environment_owned_data(args)
            self.multi_turn.check_dataset(train_dataset)
            for name, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]:
                self.multi_turn.check_dataset(dataset, name)
            if rollout_func is None and isinstance(train_dataset, Dataset) and len(train_dataset) \
                    and not isinstance(train_dataset[0]["prompt"], list):
                raise ValueError("tools and environment_factory need conversational prompts (a 'prompt' column of "
                                 "message lists, [{'role': 'user', 'content': ...}]): the chat template writes each "
                                 "turn; this dataset's prompts are plain text")
        elif args.max_tool_calling_iterations is not None:
            raise ValueError(f"max_tool_calling_iterations={args.max_tool_calling_iterations} limits tool calls, but "
                             "no tools were given: pass GRPOTrainer(tools=[...]) or leave it None")
        if not reward_funcs and self.multi_turn is not None and self.multi_turn.has_step_environments:
            reward_funcs = [env_reward]  # step environments' own rewards: the sum of their steps'
        reward_init_kwargs = {"trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
        self.reward_funcs = prepare_reward_funcs(reward_funcs or [], reward_processing_classes, reward_init_kwargs)
        self.reward_func_names = [reward_func_name(f) for f in self.reward_funcs]
        weights = list(args.reward_weights or [1.0] * len(self.reward_funcs))
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward "
                             "functions: give one weight per function")
        # TRL's environment-owned rewards: one function per environment class with a get_reward, weight 1.
        for name, func in self.multi_turn.environment_reward_funcs() if self.multi_turn is not None else []:
            self.reward_funcs.append(func)
            self.reward_func_names.append(name)
            weights.append(1.0)
        if not self.reward_funcs:
            raise ValueError("No reward source provided. Pass `reward_funcs`, or an `environment_factory` whose "
                             "environment defines a `get_reward` method.")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        eval_sets = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
        for name, dataset in [("training", train_dataset), *eval_sets]:
            columns = getattr(dataset, "column_names", None)  # a stream may not know its columns yet
            if dataset is not None and columns is not None and "prompt" not in columns:
                raise ValueError(f"the {name} dataset needs a 'prompt' column (text or chat messages); it has "
                                 f"{columns}")
        self._prepare_for_streams(args, train_dataset, [d for _, d in eval_sets])
        if not args.use_vllm:
            unknown = TransformersBackend.unknown_kwargs(args.generation_kwargs or {})
            if unknown:
                raise ValueError(f"generation_kwargs {unknown}: with use_vllm=False they go to transformers' "
                                 f"GenerationConfig, which has no such fields (nor are they {TransformersBackend.GENERATION_KWARGS})")

        if args.sync_ref_model and peft_config is not None:
            raise NotImplementedError(
                "sync_ref_model=True with peft_config: with LoRA the reference is the base model with the adapter "
                "disabled, so there is no reference model to synchronize; use sync_ref_model=False, or a full "
                "fine-tune for a synced reference")
        check_router_loss(model, args.router_aux_loss_coef)
        if args.cast_lm_head_to_fp32:
            cast_lm_head_to_fp32(model)
        self.ref_model = None
        if args.beta != 0.0 and peft_config is None:  # LoRA: the reference is the base, the adapter disabled
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_path, **init_kwargs).eval()
            self.ref_model.requires_grad_(False)
            if args.cast_lm_head_to_fp32:
                cast_lm_head_to_fp32(self.ref_model)
        if args.disable_dropout:
            for module in (model, self.ref_model):
                if module is not None:
                    _disable_dropout(module)

        super().__init__(model=model, args=args, data_collator=_identity_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        # We normalise the loss for gradient accumulation ourselves (see compute_loss).
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = False
        check_layout(self.accelerator, merged_lora=self.lora is not None and not self.lora.adapter_only,
                     local_multi_turn=self.multi_turn is not None and not args.use_vllm)
        if self.ref_model is not None:  # sharded like the policy under FSDP2 / ZeRO-3
            self.ref_model = prepare_reference(self.ref_model, self.accelerator, args.per_device_train_batch_size)

        self._metrics = defaultdict(list)  # logged means since the last log
        self._eval_metrics = defaultdict(list)
        self._completion_rows: list[dict] = []  # log_completions: rows since the last log
        self._round_seconds = 0.0  # generation + reward time inside the current training_step
        self._buffered: list[dict] | None = None
        self._step = 0
        self._synced_version: int | None = None
        self._producer: RoundProducer | None = None  # async_generation: rounds generated ahead (main process)
        self._producer_backend: ServerBackend | None = None
        self._turn_backend: ServerBackend | None = None  # multi-turn episodes on a process that holds no backend
        self._completion_calls = 0  # generate_completions: seeds apart per call
        self._regenerated_rounds = 0
        self._pending_time = defaultdict(float)
        self._total_tokens = 0
        self._entropy = AdaptiveEntropy(args.entropy_coef, adaptive=args.use_adaptive_entropy,
                                        target=args.entropy_target, delta=args.entropy_coef_delta,
                                        coef_min=args.entropy_coef_min, coef_max=args.entropy_coef_max)
        # Sharing needs the model's cache in training, which gradient checkpointing switches off.
        self._share_prompts = args.share_prompt_prefix and not args.gradient_checkpointing
        self._pack = self._share_prompts and args.padding_free and self._packing_unsupported() is None
        self._completion_token_cost = completion_token_cost(self.model)
        if self.accelerator.device.type == "cpu":
            keep_freed_memory()  # activations live in host memory: reuse it rather than fault it in again
        self.backend = self._make_backend()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            atexit.register(_destroy_process_group)  # for scripts that never call close() (see close)
            set_timeout(args.ddp_timeout)  # every collective ends (trainer/collectives.py)
        self._where = "setup"  # what this process is doing, for a failed collective's message
        self.add_callback(_SyncWeightsCallback(self))
        if args.sync_ref_model:
            self.add_callback(_SyncReferenceCallback(self))
        for f in self.reward_funcs:  # reward models score on the trainer's device, as TRL places them
            if isinstance(f, RewardModel):
                f.model.to(self.accelerator.device)

    @staticmethod
    def _prepare_for_streams(args: GRPOConfig, train_dataset, eval_datasets: list) -> None:
        """TRL's rules for datasets.IterableDataset: each process reads its slice of the stream itself
        (dispatch_batches=False: the main process cannot collate text columns to send them), and the training
        stream is read by one worker (several would interleave it and split the groups)."""
        if not any(isinstance(d, IterableDataset) for d in [train_dataset, *eval_datasets]):
            return
        if args.accelerator_config.dispatch_batches:
            raise ValueError("Iterable datasets require `dispatch_batches=False`, but it is set to `True` in "
                             "`accelerator_config`. Please set it to `False`.")
        args.accelerator_config.dispatch_batches = False
        if isinstance(train_dataset, IterableDataset):
            if args.async_generation:
                raise ValueError("async_generation=True with an IterableDataset: generating ahead reads the "
                                 "prompts of later rounds by index; use a map-style Dataset, or train synchronously")
            if args.dataloader_num_workers != 0:
                logger.warning("Iterable datasets require `dataloader_num_workers=0` to preserve prompt grouping; "
                               "overriding the provided value (%d).", args.dataloader_num_workers)
                args.dataloader_num_workers = 0

    # --- generation backends ------------------------------------------------------

    def _make_backend(self) -> GenerationBackend | None:
        a = self.args
        if not a.use_vllm:
            acc = self.accelerator
            return TransformersBackend(lambda: acc.unwrap_model(self.model), self.tokenizer,
                                       _stop_token_ids(acc.unwrap_model(self.model), self.tokenizer),
                                       synced=sharded(acc),
                                       weights=lambda: generation_weights(self.model, acc, a.ds3_gather_for_generation))
        if a.vllm_mode == "server":
            if not self.accelerator.is_main_process:
                return None  # only the main process talks to the server
            backend = self._server_backend()
            if a.async_generation:
                self._warn_if_sharing_cores(backend)
            return backend
        path = self.model_path
        if path is None or not isinstance(path, str):
            path = tempfile.mkdtemp(prefix="fastgrpo-colocate-")
            self.accelerator.unwrap_model(self.model).save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        max_len = a.vllm_max_model_length or ((a.max_prompt_length or 1024) + a.max_completion_length)
        lora_rank = self.lora and self.lora.adapter_only and adapter_config(self.model)["r"]
        return ColocateBackend(path, a.vllm_gpu_memory_utilization, a.vllm_tensor_parallel_size, max_len,
                               seed=a.seed + self.accelerator.process_index, bucket_bytes=a.weight_sync_bucket_bytes,
                               sleep_mode=a.vllm_enable_sleep_mode, lora_rank=lora_rank or None)

    def _server_backend(self) -> ServerBackend:
        a = self.args
        return ServerBackend(a.vllm_server_base_url, a.vllm_server_host, a.vllm_server_port, a.vllm_server_timeout,
                             bucket_bytes=a.weight_sync_bucket_bytes, api_key=a.vllm_server_api_key,
                             adapter=self.policy_adapter, adapter_owner=run_identity(a.output_dir),
                             request_timeout=a.vllm_generation_timeout,
                             nothing_listening=(UNSET_MODE_WAIT_S, UNSET_MODE_HINT) if a.vllm_mode_is_default else None)

    @property
    def policy_adapter(self) -> str | None:
        """The adapter this run's generations use (its own, when only adapters are pushed); None: the base model."""
        return self.lora.name if self.lora is not None and self.lora.adapter_only else None

    def _warn_if_sharing_cores(self, backend: ServerBackend) -> None:
        """Async rounds overlap generation with training only where each has its own devices: a CPU server
        on this trainer's cores makes every step slower instead (the demo's steps: 2-3x)."""
        if self.accelerator.device.type != "cpu":
            return
        host = urlparse(backend.client.base_url).hostname
        if host not in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
            return
        shared = cores_shared_with_server(backend.client.info, set(usable_cores()))
        if shared:
            logger.warning(
                "async_generation: the server at %s generates on CPU cores %s, which this trainer runs on too; "
                "generation and training then compete for those cores and each step gets slower, not faster. "
                "Give each its own cores (start the server with VLLM_CPU_OMP_THREADS_BIND=<its cores> and the "
                "trainer under `taskset -c <the others>`), or train synchronously.",
                backend.client.base_url, ",".join(map(str, sorted(shared))))

    def _server_mode(self) -> bool:
        return self.args.use_vllm and self.args.vllm_mode == "server"

    # --- weight sync ----------------------------------------------------------------

    def sync_weights(self) -> None:
        """Push the current weights if they changed since the last push (every rank calls this).

        Parameters are gathered one at a time from ZeRO-3 / FSDP shards as the sender packs them, so no
        rank holds a full copy of the model. Gathering is a collective: every rank iterates all of them,
        also when the push fails, and a failure on any rank is known to every rank.

        A push that fails for a reason that may pass (the connection, a timeout, the server side) is tried
        again, up to WEIGHT_SYNC_ATTEMPTS times in all: this is how a failed push recovers without a human.
        Meanwhile the generator refuses to generate (its weights may be mixed), so no completion of an
        inconsistent generator is ever trained on. A refused push (4xx: bad names, a wrong key) fails at once.
        """
        from accelerate.utils import gather_object

        if isinstance(self.backend, TransformersBackend):
            return
        version = self.state.global_step
        if self._synced_version == version:
            return
        began, self._where = time.perf_counter(), f"the weight push of step {version}"
        for attempt in range(1, WEIGHT_SYNC_ATTEMPTS + 1):
            model = self.accelerator.unwrap_model(self.model)
            failure = None
            with self._weights_to_push(model) as weights:
                try:
                    if weights is None:  # LoRA: the adapter alone, gathered on every rank where it is sharded
                        with gathered_adapter(model, self.accelerator):
                            tensors = full_tensors(adapter_tensors(model))
                        if self.backend is not None:
                            self.backend.sync_adapter(self.lora.name, tensors, adapter_config(model), version)
                    elif self.backend is not None:
                        self.backend.sync_weights(weights, version)
                except Exception as exc:
                    failure = (f"{type(exc).__name__}: {exc}", _may_pass(exc))
                    logger.error("weight sync of step %d failed on process %d (attempt %d of %d): %s", version,
                                 self.accelerator.process_index, attempt, WEIGHT_SYNC_ATTEMPTS, failure[0])
                finally:
                    if weights is not None:
                        weights.drain()
            failures = [f for f in gather_object([failure]) if f is not None]
            if not failures:
                break
            if attempt == WEIGHT_SYNC_ATTEMPTS or not all(may_pass for _, may_pass in failures):
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                raise WeightSyncError(f"pushing the weights of step {version} to the generator failed{tried}: "
                                      f"{failures[0][0]}")
        self._synced_version = version
        if self._producer is not None:
            self._producer.pushed(version)
        self._pending_time["time/weight_sync"] += time.perf_counter() - began

    @contextlib.contextmanager
    def _weights_to_push(self, model):
        """None for an adapter-only LoRA push; else the tensors a full push sends (LoRA: merged into the base)."""
        if self.lora is None:
            yield ModelWeights(model)
        elif self.lora.adapter_only:
            yield None
        else:
            with LoraSync.merged(model) as weights:
                yield weights

    # --- data --------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        a = self.args
        return RepeatSampler(len(train_dataset or self.train_dataset), a.num_generations,
                             a.unique_prompts_per_generation, a.steps_per_generation * a.num_iterations,
                             shuffle=a.shuffle_dataset, seed=a.seed)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("GRPOTrainer needs a train_dataset with a 'prompt' column")
        a, dataset = self.args, self.train_dataset
        if isinstance(dataset, IterableDataset):  # RepeatSampler's order, read from the stream
            if a.shuffle_dataset:
                dataset = dataset.shuffle(seed=a.seed)  # a buffered shuffle: the stream cannot be permuted whole
            dataset = RepeatedStream(dataset, a.num_generations, a.unique_prompts_per_generation,
                                     a.steps_per_generation * a.num_iterations)
        return self._get_dataloader(dataset=dataset, description="Training",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _prepare_inputs(self, generation_batch):
        """The micro-batch of this micro-step; a new generation round when the last one is used up."""
        a = self.args
        every = a.steps_per_generation * a.num_iterations
        if self._step % every == 0 or self._buffered is None:
            self._where = f"generation round {self._step // every}"
            if self._step % every:
                logger.warning("resuming in the middle of a generation round that the checkpoint does not hold: "
                               "generating a new one (the run is not exactly the uninterrupted one)")
            self._buffered = self._generate_and_score(generation_batch, round_index=self._step // every)
        inputs = self._buffered[self._step % a.steps_per_generation]
        self._where = f"the forward and backward of micro-step {self._step}"
        self._step += 1
        return inputs

    # --- one generation round -----------------------------------------------------

    def _prompt_ids(self, prompts, tokenizer=None) -> list[list[int]]:
        tokenizer = tokenizer or self.tokenizer
        conversational = isinstance(prompts[0], list)
        ids = []
        for prompt in prompts:
            if conversational:
                row = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True,
                                                         **(self.args.chat_template_kwargs or {}))["input_ids"]
            else:
                row = tokenizer(prompt)["input_ids"]
            ids.append(self.args.check_prompt_length(list(row)))
        return ids

    def _sampling(self, n: int) -> Sampling:
        a = self.args
        return Sampling(n=n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p or 0.0,
                        repetition_penalty=a.repetition_penalty, max_tokens=a.max_completion_length,
                        extra=tuple(sorted((a.generation_kwargs or {}).items())))

    def _generate(self, prompt_ids: list[list[int]], num_generations: int, round_index: int, evaluating: bool,
                  restarts: int = 0):
        """Completions of this process's rows, in row order: (token ids, sampler logprobs or None, whether each
        ended on a stop condition, weights version, each completion's staleness or None when the round was
        generated now). Each prompt of the round samples with its own seed."""
        from accelerate.utils import broadcast_object_list, gather_object

        from fastgrpo.client import ServerRestarted

        a, acc = self.args, self.accelerator
        if not self._server_mode():
            rows = len(prompt_ids)
            seeds = prompt_seeds(a.seed, round_index, rows * acc.num_processes)
            seeds = seeds[acc.process_index * rows : (acc.process_index + 1) * rows]
            with acc.autocast():  # transformers generation runs in the training precision (bf16 if set)
                comps = self.backend.generate(prompt_ids, self._sampling(1), seeds)
            ids = [c[0] for c in comps.token_ids]
            lps = [c[0] for c in comps.logprobs] if comps.logprobs is not None else None
            return ids, lps, [s[0] for s in comps.stopped], comps.weight_version, None
        everyone = gather_object(prompt_ids)
        payload = [None, None, None, None, None]
        if acc.is_main_process:
            groups = [everyone[i : i + num_generations] for i in range(0, len(everyone), num_generations)]
            if any(any(row != group[0] for row in group) for group in groups):
                raise RuntimeError("a generation batch is not made of whole groups of identical prompts; this is "
                                   "a sampler bug: please report it with your GRPOConfig")
            unique, behind = [g[0] for g in groups], None
            try:
                if a.async_generation and not evaluating:
                    comps, behind = self._take_round(unique, round_index)
                else:
                    comps = self.backend.generate(unique, self._sampling(num_generations),
                                                  prompt_seeds(a.seed, round_index, len(groups)))
                payload = [[c for group in comps.token_ids for c in group],
                           [lp for group in comps.logprobs for lp in group],
                           [s for group in comps.stopped for s in group], comps.weight_version, behind]
            except ServerRestarted as exc:  # every process pushes again (a collective), then this generates again
                if restarts >= 2 or (a.async_generation and not evaluating):
                    raise
                payload = [SERVER_RESTARTED, str(exc), None, None, None]
        broadcast_object_list(payload, from_process=0)
        if payload[0] == SERVER_RESTARTED:
            logger.warning("%s; pushing this run's weights to it again, then generating round %d again", payload[1],
                           round_index)
            self._synced_version = None
            self.sync_weights()
            return self._generate(prompt_ids, num_generations, round_index, evaluating, restarts + 1)
        start = acc.process_index * len(prompt_ids)
        rows = slice(start, start + len(prompt_ids))
        return payload[0][rows], payload[1][rows], payload[2][rows], payload[3], payload[4]

    def _take_round(self, prompt_ids: list[list[int]], round_index: int):
        """async_generation: round `round_index` from the producer (started here at the first round), and
        each completion's staleness. A round with other prompts than the trainer's (the look-ahead missed) or a
        completion older than vllm_max_weight_staleness is generated again now, and counted."""
        a = self.args
        sampling, bound = self._sampling(a.num_generations), a.vllm_max_weight_staleness
        if self._producer is None:
            # Its own HTTP client and tokenizer: a Rust tokenizer used from two threads at once can fail.
            sampler, backend = self._get_train_sampler(), self._server_backend()
            tokenizer, every = copy.deepcopy(self.tokenizer), a.steps_per_generation * a.num_iterations
            self._producer_backend = backend

            def prompts_of(r: int) -> list[list[int]]:
                return self._prompt_ids([self.train_dataset[i]["prompt"] for i in sampler.batch_prompts(r)], tokenizer)

            self._producer = RoundProducer(
                prompts_of=prompts_of,
                generate=lambda ids, r: backend.generate(ids, sampling, prompt_seeds(a.seed, r, len(ids))),
                trained_at=lambda r: first_step(r, every, a.gradient_accumulation_steps),
                start=round_index, max_staleness=bound, recoverable=generation_may_pass)
            self._producer.pushed(self._synced_version)
        generated = self._producer.take(round_index)
        self._metrics["async/generation_seconds"].append(generated.seconds)
        trained = self._synced_version
        if generated.recoverable:
            why = f"its generation failed ({generated.error}), and the push since landed"
        elif generated.prompt_ids != prompt_ids:
            why = "its prompts are not this round's (the look-ahead over the dataset missed)"
        elif too_stale(firsts := [v[0] for group in generated.completions.weight_versions for v in group], trained,
                       bound):
            why = (f"completions were generated by weights up to {max(staleness(firsts, trained))} steps older "
                   f"than the trainer's (step {trained}), beyond vllm_max_weight_staleness={bound}")
        else:
            return generated.completions, staleness(firsts, trained)
        logger.warning("round %d generated ahead is not trained on: %s; generating it again now", round_index, why)
        self._regenerated_rounds += 1
        comps = self.backend.generate(prompt_ids, sampling, prompt_seeds(a.seed, round_index, len(prompt_ids)))
        return comps, staleness([v[0] for group in comps.weight_versions for v in group], trained)

    # --- multi-turn rounds --------------------------------------------------------

    def _multi_turn_round(self, prompts: list, inputs: list[dict], round_index: int, evaluating: bool):
        """This process's rows as episodes (tools, environments) or through the rollout_func, and each episode's
        staleness (None when the round was generated now)."""
        if self.args.async_generation and not evaluating:
            return self._take_multi_turn_round(prompts, inputs, round_index)
        from accelerate.utils import gather_object

        rollout = self._run_multi_turn(self.multi_turn, inputs, round_index, self._generator())
        # Episodes (or agents) on weights the trainer did not push: every rank checks every rank's versions, so all
        # raise together (one rank alone would leave the others waiting in the next collective).
        versions = sorted(set(rollout.first_versions or []))
        if self.accelerator.num_processes > 1:
            versions = sorted({v for rank in gather_object([versions]) for v in rank})
        for version in versions:
            self._check_version(version)
        return rollout, None

    def _run_multi_turn(self, multi_turn: MultiTurn, inputs: list[dict], round_index: int,
                        backend: GenerationBackend) -> RoundRollout:
        """Turn k of this process's row i samples with a seed of (run seed, round, the row's place in the whole
        round, k): the same whether the round is generated now or ahead."""
        a, acc = self.args, self.accelerator
        rows = [{k: v for k, v in x.items() if k != "prompt"} for x in inputs]
        first_row = acc.process_index * len(inputs)
        generate = turn_generator(backend, self._sampling(1))
        context = acc.autocast() if isinstance(backend, TransformersBackend) else contextlib.nullcontext()
        with context:
            return multi_turn.run(self, [x["prompt"] for x in inputs], rows, generate,
                                  lambda i, turn: derived_seed(a.seed, round_index, first_row + i, turn))

    def _take_multi_turn_round(self, prompts: list, inputs: list[dict], round_index: int):
        """async_generation with tools or environments: every process runs its own rows' episodes ahead, in a
        thread with its own client (and tokenizer), within vllm_max_weight_staleness as single turns do; a round
        whose rows are not this round's, or whose episodes ran on weights beyond the bound, is run again now."""
        a, acc = self.args, self.accelerator
        bound, rows_per_round = a.vllm_max_weight_staleness, len(inputs)
        if self._producer is None:
            sampler, backend = self._get_train_sampler(), self._server_backend()
            multi_turn, every = self.multi_turn.with_tokenizer(copy.deepcopy(self.tokenizer)), \
                a.steps_per_generation * a.num_iterations
            self._producer_backend = backend

            def rows_of(r: int) -> list[dict]:  # this process's share of round r, as _generate deals it
                indices = [i for i in sampler.batch_prompts(r) for _ in range(a.num_generations)]
                start = acc.process_index * rows_per_round
                return [self.train_dataset[i] for i in indices[start : start + rows_per_round]]

            self._producer = RoundProducer(
                prompts_of=rows_of, generate=lambda rows, r: self._run_multi_turn(multi_turn, rows, r, backend),
                trained_at=lambda r: first_step(r, every, a.gradient_accumulation_steps),
                start=round_index, max_staleness=bound, recoverable=generation_may_pass)
            self._producer.pushed(self._synced_version)
        generated = self._producer.take(round_index)
        self._metrics["async/generation_seconds"].append(generated.seconds)
        trained, rollout = self._synced_version, generated.completions
        firsts = (rollout.first_versions if rollout is not None else None) or []
        if generated.recoverable:
            why = f"its episodes failed ({generated.error}), and the push since landed"
        elif [x["prompt"] for x in generated.prompt_ids] != prompts:
            why = "its rows are not this round's (the look-ahead over the dataset missed)"
        elif len(firsts) != len(prompts) or too_stale(firsts, trained, bound):
            why = (f"episodes ran on weights up to {max(staleness(firsts, trained), default='?')} steps older than "
                   f"the trainer's (step {trained}), beyond vllm_max_weight_staleness={bound}")
        else:
            return rollout, staleness(firsts, trained)
        logger.warning("round %d generated ahead is not trained on: %s; running it again now", round_index, why)
        self._regenerated_rounds += 1
        rollout = self._run_multi_turn(self.multi_turn, inputs, round_index, self._generator())
        return rollout, staleness(rollout.first_versions or [trained] * len(prompts), trained)

    def _generator(self) -> GenerationBackend:
        """This process's generator; in server mode a process other than the main one gets a client of its own."""
        if self.backend is not None:
            return self.backend
        if self._turn_backend is None:
            self._turn_backend = self._server_backend()
        return self._turn_backend

    @property
    def vllm_client(self):
        """This process's client of the generation server (server mode), e.g. for a rollout_func."""
        generator = self._generator()
        if not isinstance(generator, ServerBackend):
            raise ValueError("this needs the generation server: use_vllm=True, vllm_mode='server'")
        return generator.client

    def generate_completions(self, prompt_ids: list[list[int]], max_tokens: int | list[int] | None = None) -> list[dict]:
        """For a rollout_func: one completion of each prompt (token ids) with the run's sampling settings, as
        {"completion_ids", "logprobs" (the generator's; None without vLLM), "stopped"} per prompt."""
        a, acc = self.args, self.accelerator
        caps = [max_tokens] * len(prompt_ids) if isinstance(max_tokens, int) else max_tokens
        self._completion_calls += 1
        seeds = [derived_seed(a.seed, COMPLETION_SEEDS, self._completion_calls, acc.process_index, i)
                 for i in range(len(prompt_ids))]
        context = acc.autocast() if isinstance(self.backend, TransformersBackend) else contextlib.nullcontext()
        with context:
            turns = turn_generator(self._generator(), self._sampling(1))(
                prompt_ids, caps or [a.max_completion_length] * len(prompt_ids), seeds)
        return [{"completion_ids": t.token_ids, "logprobs": t.logprobs, "stopped": t.stopped} for t in turns]

    def _log_multi_turn(self, metrics, rollout: RoundRollout) -> None:
        """Per-episode means over every process's rows (TRL's tools/call_frequency and tools/failure_frequency)."""
        acc, device = self.accelerator, self.accelerator.device
        totals = {k: acc.gather(torch.tensor(v, device=device, dtype=torch.float32)).cpu()
                  for k, v in rollout.per_row.items()}
        if "multi_turn/turns" in totals:
            metrics["multi_turn/turns_mean"].append(totals["multi_turn/turns"].mean().item())
            metrics["multi_turn/turns_max"].append(totals["multi_turn/turns"].max().item())
            metrics["multi_turn/step_timeouts"].append(totals["multi_turn/step_timeouts"].sum().item())
        generated, env = totals["completions/generated_tokens"], totals["completions/env_tokens"]
        metrics["completions/generated_tokens_mean"].append(generated.mean().item())
        metrics["completions/env_tokens_mean"].append(env.mean().item())
        metrics["completions/generated_fraction"].append((generated.sum() / (generated.sum() + env.sum()).clamp(
            min=1)).item())
        if "tools/calls" in totals:
            calls, failures = totals["tools/calls"].sum().item(), totals["tools/failures"].sum().item()
            metrics["tools/call_frequency"].append(totals["tools/calls"].mean().item())
            metrics["tools/failure_frequency"].append(failures / calls if calls else 0.0)
            metrics["tools/failures_per_episode"].append(totals["tools/failures"].mean().item())
            for key, values in totals.items():
                if key.startswith("tools/failures/"):
                    metrics[key].append(values.mean().item())

    def _stop_producer(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer_backend.close()
            self._producer = self._producer_backend = None

    def _check_version(self, version: int | None) -> None:
        if version is None or self._synced_version is None:
            return
        lag = self._synced_version - version
        if lag < 0 or lag > self.args.vllm_max_weight_staleness:
            raise StaleGenerationError(
                f"the generator used weights version {version}, but the trainer pushed version "
                f"{self._synced_version} (optimizer step {self.state.global_step}). Another trainer may be pushing "
                "to the same server, or a push was lost. Use one server per run, or allow off-policy data with "
                "vllm_max_weight_staleness.")

    @torch.no_grad()
    def _generate_and_score(self, inputs: list[dict], round_index: int, evaluating: bool = False) -> list[dict]:
        """Generate, score and batch one round: its micro-batches in training order.

        Evaluating, it only generates and scores (one micro-batch, no old or reference logprobs), and logs
        under the eval metrics."""
        a, acc, device = self.args, self.accelerator, self.accelerator.device
        metrics = self._eval_metrics if evaluating else self._metrics
        num_generations = (a.num_generations_eval or a.num_generations) if evaluating else a.num_generations
        prompts = [x["prompt"] for x in inputs]
        conversational = isinstance(prompts[0], list)

        began = time.perf_counter()
        rollout = None
        if self.multi_turn is not None:
            rollout, behind = self._multi_turn_round(prompts, inputs, round_index, evaluating)
            prompt_ids, completion_ids, sampling_logps = rollout.prompt_ids, rollout.completion_ids, rollout.sampling_logps
            terminated, version = rollout.stopped, rollout.weight_version
        else:
            prompt_ids = self._prompt_ids(prompts)
            completion_ids, sampling_logps, terminated, version, behind = self._generate(
                prompt_ids, num_generations, round_index, evaluating)
        generate_s = time.perf_counter() - began
        self._check_version(version)

        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        if rollout is not None:
            completions = rollout.completions
        else:
            completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts

        began = time.perf_counter()
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k != "prompt"}
        if rollout is not None:
            clash = set(columns) & set(rollout.reward_columns)
            if clash:
                raise ValueError(f"dataset columns {sorted(clash)} clash with what multi-turn rollouts pass to the "
                                 "reward functions: rename the columns")
            columns.update(rollout.reward_columns)
        logged = RewardLogs()
        local_rewards = compute_rewards(self.reward_funcs, prompts, completions, completion_ids, columns,
                                        trainer_state=self.state, log_extra=logged.extra, log_metric=logged.metric)
        all_rewards = acc.gather(local_rewards.to(device)).float().cpu()
        total, per_func = weighted_rewards(all_rewards, self.reward_weights)
        if a.multi_objective_aggregation == "normalize_then_sum":
            advantages, stats = normalize_then_sum_advantages(all_rewards, self.reward_weights, num_generations)
        else:
            advantages, stats = group_advantages(total, num_generations, a.scale_rewards)
        reward_s = time.perf_counter() - began
        start = acc.process_index * len(inputs)
        local_advantages = advantages[start : start + len(inputs)]

        # Batch tensors: prompts left-padded, completions right-padded.
        pad = self.tokenizer.pad_token_id
        prompt_mask = pad_rows([[1] * len(p) for p in prompt_ids], 0, left=True)
        completion_attention = pad_rows([[1] * len(c) for c in completion_ids], 0)
        # The loss covers the model's own tokens: all of a single turn, never a tool's or an environment's.
        completion_mask = completion_attention.clone() if rollout is None else pad_rows(rollout.completion_mask, 0)
        if a.mask_truncated_completions:
            completion_mask[~torch.tensor(terminated, dtype=torch.bool)] = 0
        batch = {"prompt_ids": pad_rows(prompt_ids, pad, left=True), "prompt_mask": prompt_mask,
                 "completion_ids": pad_rows(completion_ids, pad), "completion_attention": completion_attention,
                 "completion_mask": completion_mask, "advantages": local_advantages}
        if sampling_logps is not None and a.vllm_importance_sampling_correction and not evaluating:
            batch["sampling_logps"] = pad_rows(sampling_logps, 0.0).float()
        elif a.async_generation and not evaluating:
            # Generated ahead, by older weights: without the sampler correction, the ratio's denominator is
            # the sampler's own logprobs, never the trainer's current ones (a ratio of 1 for stale data).
            batch["old_logps"] = pad_rows(sampling_logps, 0.0).float()

        if evaluating:  # one micro-batch, every row, normalised by its own tokens on every process
            tokens = acc.gather(completion_mask.sum().reshape(1).to(device)).sum().float().cpu()
            micro = [{**pad_to_multiple(batch, a.pad_to_multiple_of, pad), "num_items_in_batch": tokens}]
        else:
            micro = self._split_round(batch, round_index)
        # A round that serves later optimizer steps (or several iterations) trains them off-policy: their
        # ratio is to the policy that generated, computed now, before the first step changes the weights.
        off_policy = a.num_iterations > 1 or a.steps_per_generation > a.gradient_accumulation_steps
        for m in (p for m in micro for p in parts_of(m)):
            if off_policy and not evaluating and "old_logps" not in m:
                m["old_logps"] = self._per_token_logps(self.model, m)
            if a.beta != 0.0:
                m["ref_logps"] = self._reference_logps(m)

        # Metrics, TRL's names.
        lengths = acc.gather(torch.tensor([len(c) for c in completion_ids], device=device)).cpu()
        round_tokens = int(acc.gather(torch.tensor(
            [prompt_mask.sum().item() + completion_attention.sum().item()], device=device)).sum().item())
        if not evaluating:
            self._total_tokens += round_tokens
            metrics["num_tokens"].append(self._total_tokens)
        metrics["reward"].append(stats["reward"].item())
        metrics["reward_std"].append(stats["reward_std"].item())
        metrics["frac_reward_zero_std"].append(stats["frac_reward_zero_std"].item())
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(per_func["mean"][i].item())
            metrics[f"rewards/{name}/std"].append(per_func["std"][i].item())
        all_terminated = acc.gather(torch.tensor(terminated, device=device)).cpu().bool()
        metrics["completions/mean_length"].append(lengths.float().mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(1.0 - all_terminated.float().mean().item())
        done = lengths[all_terminated]
        metrics["completions/mean_terminated_length"].append(done.float().mean().item() if len(done) else 0.0)
        metrics["completions/min_terminated_length"].append(done.min().item() if len(done) else 0.0)
        metrics["completions/max_terminated_length"].append(done.max().item() if len(done) else 0.0)
        metrics["time/generate"].append(generate_s)
        metrics["time/reward"].append(reward_s)
        self._round_seconds += generate_s + reward_s
        if rollout is None:
            metrics["generate/tokens_per_second"].append(lengths.sum().item() / max(generate_s, 1e-9))
        else:  # the model's tokens only, not the tool results and messages between its turns
            generated = acc.gather(completion_mask.sum().reshape(1).to(device)).sum().item()
            metrics["generate/tokens_per_second"].append(generated / max(generate_s, 1e-9))
            self._log_multi_turn(metrics, rollout)
        if behind is not None:
            metrics["async/staleness_mean"].append(sum(behind) / len(behind))
            metrics["async/staleness_max"].append(max(behind))
            metrics["async/regenerated_rounds"].append(self._regenerated_rounds)
        if not evaluating:
            for key, value in self._pending_time.items():
                metrics[key].append(value)
            self._pending_time.clear()
        extra_columns = self._flush_reward_logs(logged, metrics, len(prompts))
        if a.log_completions:
            self._log_completions(prompts, texts, all_rewards, advantages, evaluating, extra_columns)
        return micro

    def _flush_reward_logs(self, logged: "RewardLogs", metrics, rows: int) -> dict[str, list]:
        """What reward functions logged this round, over every process: log_metric values averaged into the
        metrics, log_extra columns gathered for the completions table. The names are agreed first, in one
        order, so every process issues the same gathers whatever its own functions logged."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        names = sorted({n for rank in gather_object([sorted(logged.metrics)]) for n in rank})
        for name in names:
            values = logged.metrics.get(name, [])
            totals = acc.gather(torch.tensor([[sum(values), len(values)]], dtype=torch.float64,
                                             device=acc.device)).sum(0)
            metrics[name].append((totals[0] / totals[1].clamp(min=1)).item())
        if not self.args.log_completions:  # the columns go to the completions table only
            return {}
        columns = sorted({c for rank in gather_object([sorted(logged.columns)]) for c in rank})
        return {c: gather_object(list(logged.columns.get(c, [None] * rows))) for c in columns}

    def _split_round(self, batch: dict, round_index: int) -> list[dict]:
        """The round's micro-batches in training order, each with its optimizer step's token count.

        Rows are dealt to the round's optimizer steps at random (a seeded generator: a resumed run deals
        alike); inside a step they are ordered to pad little (see batching.split_round)."""
        a, acc = self.args, self.accelerator
        steps, micro_per_step = round_layout(a.steps_per_generation, a.gradient_accumulation_steps)
        generator = torch.Generator().manual_seed(derived_seed(a.seed, round_index, -1 - acc.process_index))
        prompt_index = prompt_groups(batch["prompt_ids"], batch["prompt_mask"])[1] if self._share_prompts else None
        by_step = split_round(batch, steps, micro_per_step, prompt_index, self._completion_token_cost, generator,
                              max_parts=self._max_parts(), agree=lambda costs: gathered_max(self.accelerator, costs),
                              order_for_padding=not self._normalised_per_micro_batch())
        # The "dapo" normaliser: each optimizer step's completion tokens, all processes together.
        local = torch.tensor([sum(int(p["completion_mask"].sum()) for m in step for p in parts_of(m))
                              for step in by_step], device=acc.device)
        step_tokens = acc.gather(local.reshape(1, -1)).sum(0).cpu()
        micro, multiple, pad = [], a.pad_to_multiple_of, self.tokenizer.pad_token_id
        for step, tokens in zip(by_step, step_tokens.tolist()):
            for m in step:
                if multiple:
                    m = ({"parts": [pad_to_multiple(p, multiple, pad) for p in m["parts"]]} if "parts" in m
                         else pad_to_multiple(m, multiple, pad))
                m["num_items_in_batch"] = torch.tensor(float(tokens))
                micro.append(m)
        return micro

    def _normalised_per_micro_batch(self) -> bool:
        """Whether the objective depends on which rows share a micro-batch: bnpo divides by the micro-batch's
        tokens, the entropy mask keeps a quantile of its tokens. Their micro-batches are random samples of the
        step (as TRL's shuffled ones), never rows of similar length, and are not cut into parts."""
        return self.args.loss_type == "bnpo" or self.args.top_entropy_quantile < 1.0

    def _max_parts(self) -> int:
        """How finely a micro-batch may be cut to pad less (batching.cut_for_padding). Not where a part's
        loss is not a share of the micro-batch's (see _normalised_per_micro_batch); nor under DeepSpeed or
        FSDP, whose engines count backward calls. A decision from the config: the same on every process."""
        from accelerate.utils import DistributedType

        if self._normalised_per_micro_batch():
            return 1
        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return 1
        if self._pack:
            return 1  # nothing is padded to cut away
        return 8

    # --- completions, evaluation, checkpoints ------------------------------------

    def _log_completions(self, prompts, texts, all_rewards, advantages, evaluating: bool,
                         extra_columns: dict[str, list]) -> None:
        """Keep this round's rows (all processes) for the next log: step, prompt, completion, rewards, advantage."""
        from accelerate.utils import gather_object

        from fastgrpo.trainer.rewards import completion_text

        prompts = gather_object([completion_text(p[-1]) if isinstance(p, list) else p for p in prompts])
        texts = gather_object(list(texts))
        if not self.accelerator.is_main_process:
            return
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            row = {"step": self.state.global_step, "prompt": prompt, "completion": text}
            row.update({name: all_rewards[i, f].item() for f, name in enumerate(self.reward_func_names)})
            row["advantage"] = advantages[i].item()
            row.update({column: values[i] if i < len(values) else None for column, values in extra_columns.items()})
            if evaluating:
                row["split"] = "eval"
            self._completion_rows.append(row)
        del self._completion_rows[: -self.args.generation_batch_size * 2]  # at most two rounds' worth

    def _report_completions(self) -> None:
        rows, self._completion_rows = self._completion_rows, []
        report_completions(rows, self.reward_func_names, self.args.num_completions_to_print, self.args.report_to)

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(dataset, IterableDataset):
            return super().get_eval_dataloader(eval_dataset)
        group = self.args.num_generations_eval or self.args.num_generations
        stream = RepeatedStream(dataset, group, self.args.per_device_eval_batch_size * self.args.world_size // group, 1)
        workers, self.args.dataloader_num_workers = self.args.dataloader_num_workers, 0  # groups stay whole
        try:
            return self._get_dataloader(dataset=stream, description="Evaluation", batch_size=self.args.eval_batch_size,
                                        sampler_fn=self._get_eval_sampler)
        finally:
            self.args.dataloader_num_workers = workers

    def _get_eval_sampler(self, eval_dataset=None):
        a = self.args
        group = a.num_generations_eval or a.num_generations
        return RepeatSampler(len(eval_dataset or self.eval_dataset), group,
                             a.per_device_eval_batch_size * a.world_size // group, 1, shuffle=False)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Generate on the current weights for every eval prompt, score, and compute the loss on those completions.

        Returns and logs TRL's metrics with `eval_` in front: eval_loss, eval_reward, eval_rewards/<f>/mean,
        eval_completions/mean_length, eval_entropy, ..., eval_runtime, eval_samples_per_second. A dict of eval
        sets (or the name of one in it) evaluates each, its metrics prefixed by the name (eval_<name>_reward)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            if not isinstance(self.eval_dataset, dict) or dataset not in self.eval_dataset:
                raise ValueError(f"evaluate({dataset!r}) names no eval set; the trainer has "
                                 f"{sorted(self.eval_dataset) if isinstance(self.eval_dataset, dict) else 'one'}")
            dataset = self.eval_dataset[dataset]
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (GRPOTrainer(eval_dataset=...) or the argument)")
        with self._explained_collectives():
            if isinstance(dataset, dict):
                metrics = {}
                for name, one in dataset.items():
                    metrics.update(self._evaluate_on(one, f"{metric_key_prefix}_{name}"))
                return metrics
            return self._evaluate_on(dataset, metric_key_prefix)

    def _evaluate_on(self, dataset, metric_key_prefix: str) -> dict:
        self.sync_weights()  # the generator evaluates the weights the trainer holds now
        self._where = "evaluation"
        self._eval_metrics = defaultdict(list)
        began, losses, rows = time.perf_counter(), [], 0
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(self.get_eval_dataloader(dataset)):
                # Seeds apart from the training rounds' (their indices are >= 0).
                inputs = self._generate_and_score(batch, round_index=-1 - (self.state.global_step * 100_003 + i),
                                                  evaluating=True)[0]
                with torch.no_grad(), self.compute_loss_context_manager():
                    losses.append(self.compute_loss(model, inputs).item())
                rows += len(batch) * self.accelerator.num_processes
        finally:
            model.train(was_training)
        runtime = time.perf_counter() - began
        metrics = {f"{metric_key_prefix}_{k}": sum(v) / len(v) for k, v in self._eval_metrics.items() if v}
        metrics[f"{metric_key_prefix}_loss"] = sum(losses) / max(len(losses), 1)
        metrics[f"{metric_key_prefix}_runtime"] = runtime
        metrics[f"{metric_key_prefix}_samples_per_second"] = rows / max(runtime, 1e-9)
        metrics[f"{metric_key_prefix}_steps_per_second"] = len(losses) / max(runtime, 1e-9)
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        Trainer.log(self, metrics)  # not our log(): that adds the training metrics
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, plus what makes a resume exact: the buffered round (it may serve steps still
        to come), the micro-step counter and the token count. One file per process: rounds are per process."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            super()._save_checkpoint(model, trial)
            os.makedirs(folder, exist_ok=True)
            torch.save({"step": self._step, "total_tokens": self._total_tokens, "buffered": self._buffered,
                        "entropy": self._entropy.state_dict()},
                       os.path.join(folder, ROUND_STATE.format(rank=self.accelerator.process_index)))
        except OSError as exc:
            # Trainer writes into the folder itself: a half-written one would be the "latest" a resume picks.
            shutil.rmtree(folder, ignore_errors=True)
            last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
            raise CheckpointError(
                f"saving {os.path.basename(folder)} in {run_dir} failed ({exc.strerror or exc}): the half-written "
                f"folder was removed, so resume_from_checkpoint=True starts from the last complete one "
                f"({os.path.basename(last) if last else 'none yet'}). Free space on that disk, or set output_dir "
                "on another one, and resume.") from exc

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        from transformers.trainer_utils import get_last_checkpoint

        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if folder:
            path = os.path.join(folder, ROUND_STATE.format(rank=self.accelerator.process_index))
            if os.path.exists(path):
                state = torch.load(path, weights_only=True)
                self._step, self._total_tokens, self._buffered = state["step"], state["total_tokens"], state["buffered"]
                if "entropy" in state:
                    self._entropy.load_state_dict(state["entropy"])
            else:
                logger.warning("%s holds no fastgrpo round state (%s): the resumed run regenerates its round",
                               folder, os.path.basename(path))
        with self._explained_collectives():
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    @contextlib.contextmanager
    def _explained_collectives(self):
        """A failed collective between the processes re-raised with this rank, its step and what it was doing."""
        try:
            yield
        except Exception as exc:
            acc = self.accelerator
            if acc.num_processes > 1 and is_collective_failure(exc):
                error = explain(exc, acc.process_index, acc.num_processes, self._where, self.state.global_step,
                                self.args.ddp_timeout)
                logger.error("%s", error)
                raise error from exc
            raise

    # --- the loss ------------------------------------------------------------------------

    def _reference_logps(self, m: dict):
        if self.ref_model is not None:
            logps = self._per_token_logps(self.ref_model, m)
            if self.accelerator.is_fsdp2:
                reshard(self.ref_model)  # no rank keeps any of it whole between uses
            return logps
        with self.accelerator.unwrap_model(self.model).disable_adapter():  # LoRA: the base model itself
            return self._per_token_logps(self.model, m)

    def _per_token_logps(self, model, m: dict, with_entropy: bool = False, entropy_grad: bool = False):
        """Log-probs of the completion tokens under `model`; logits only over the completion. With entropy: each
        position's entropy too, carrying gradient when `entropy_grad` (the entropy bonus trains on it)."""
        device = self.accelerator.device
        tensors = [m[k].to(device) for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_attention")]
        token_ids, attention = tensors[2], tensors[3]
        if self._pack:  # logits [completion tokens, vocab] at real tokens only (trainer/packing.py)
            logits = packed_completion_logits(model, self.accelerator.unwrap_model(model).config, pack(*tensors))
            token_ids = token_ids[attention.bool()]
        else:
            try:
                logits = completion_logits(model, *tensors, share_prompts=self._share_prompts)
            except PromptSharingUnsupported as exc:
                logger.warning("prompt sharing is off for this run: %s", exc)
                self._share_prompts = False
                logits = completion_logits(model, *tensors, share_prompts=False)

        def as_rows(values):  # [rows, width], zero at padding
            return unpack(values, attention) if self._pack else values

        if self.args.temperature != 1.0:  # a pass over the logits each way: skipped when it is 1
            logits = logits / self.args.temperature
        logps = as_rows(selective_log_softmax(logits, token_ids))
        if with_entropy:
            if entropy_grad:
                return logps, as_rows(entropy_from_logits(logits))
            with torch.no_grad():
                return logps, as_rows(entropy_from_logits(logits.detach()))
        return logps

    def _packing_unsupported(self) -> str | None:
        """Why this run pads its micro-batches although padding_free asks otherwise (logged), or None."""
        model = self.accelerator.unwrap_model(self.model)
        reason = packing_unsupported(getattr(model, "get_base_model", lambda: model)())
        if reason:
            logger.info("padding_free: micro-batches run padded, since %s", reason)
        return reason

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of one micro-batch (or part of one), divided for gradient accumulation where the loss type's
        normaliser does not span the step already, minus the entropy bonus. Metrics go to the training log, or,
        in evaluate() (model.eval()), to the eval metrics."""
        if return_outputs:
            raise ValueError("GRPOTrainer does not return outputs")
        a, acc, device = self.args, self.accelerator, self.accelerator.device
        training, bonus = model.training, self._entropy
        logps, entropy = self._per_token_logps(model, inputs, with_entropy=True, entropy_grad=bonus.enabled)
        mask = inputs["completion_mask"].to(device)
        entropy_mask = None
        if a.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropy.detach(), mask, 1.0 - a.top_entropy_quantile)
        old_logps = inputs.get("old_logps")
        loss, metrics = grpo_loss(
            logps, None if old_logps is None else old_logps.to(device), inputs["advantages"].to(device), mask,
            loss_type=a.loss_type, epsilon_low=a.epsilon, epsilon_high=a.effective_epsilon_high, delta=a.delta,
            importance_sampling_level=a.importance_sampling_level, sapo_temperature_pos=a.sapo_temperature_pos,
            sapo_temperature_neg=a.sapo_temperature_neg, beta=a.beta,
            ref_per_token_logps=inputs["ref_logps"].to(device) if "ref_logps" in inputs else None,
            max_completion_length=a.max_completion_length, num_items_in_batch=inputs["num_items_in_batch"].item(),
            num_processes=acc.num_processes,
            sampling_per_token_logps=inputs["sampling_logps"].to(device) if "sampling_logps" in inputs else None,
            vllm_is_mode=a.vllm_importance_sampling_mode, vllm_is_clip_min=a.vllm_importance_sampling_clip_min,
            vllm_is_clip_max=a.vllm_importance_sampling_clip_max, off_policy_mask_threshold=a.off_policy_mask_threshold,
            entropy_mask=entropy_mask, vespo_k_pos=a.vespo_k_pos, vespo_lambda_pos=a.vespo_lambda_pos,
            vespo_k_neg=a.vespo_k_neg, vespo_lambda_neg=a.vespo_lambda_neg,
            use_bias_correction_kl=a.use_bias_correction_kl,
        )
        accumulation = getattr(self, "current_gradient_accumulation_steps", a.gradient_accumulation_steps) \
            if training else 1
        if a.loss_type not in GLOBALLY_NORMALISED:  # their normaliser already spans the step's micro-batches
            loss = loss / accumulation
        if bonus.enabled:  # TRL: loss - coef x the mean entropy of the trained tokens, / GA
            metrics["policy_loss"] = loss.detach() * (accumulation if a.loss_type not in GLOBALLY_NORMALISED else 1)
            term, sums = entropy_bonus(entropy, mask, coef=bonus.coef_to_apply(), accumulation=accumulation,
                                       entropy_mask=entropy_mask, num_tokens=inputs.get("micro_tokens"))
            if a.loss_type not in GLOBALLY_NORMALISED:  # _forward_backward divides each part's loss by the parts
                term = term * inputs.get("num_parts", 1)
            loss = loss - term
            if training:
                bonus.accumulate(sums["entropy_sum"], sums["token_count"])
        token_count = mask.sum().clamp(min=1)
        metrics["entropy"] = (entropy.detach() * mask).sum() / token_count
        sink = self._metrics if training else self._eval_metrics
        for key, value in metrics.items():
            value = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(1)
            sink[key].append(acc.gather(value).nanmean().item())
        return loss

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """TRL's: the completion tokens whose entropy is at or above the `threshold` quantile of every process's
        completion-token entropies (a gather: every process calls it with its micro-batch)."""
        acc = self.accelerator
        local = entropies[mask.bool()].float()
        everyone = acc.gather(acc.pad_across_processes(local, dim=0, pad_index=-1.0))
        return get_high_entropy_mask(entropies, mask, threshold, gathered_entropies=everyone[everyone >= 0])

    get_off_policy_mask = staticmethod(get_off_policy_mask)

    def _end_of_step(self) -> None:
        """After an optimizer step's last micro-batch: the adaptive entropy coefficient moves on the step's
        entropy over every process (a reduce every process issues, the decision from the config)."""
        bonus, acc = self._entropy, self.accelerator
        if not bonus.enabled:
            return
        if bonus.adaptive:
            window = acc.reduce(bonus.window().to(acc.device), reduction="sum")
            bonus.step(window[0] / window[1].clamp(min=1))
        self._metrics["entropy_coef"].append(bonus.coef)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-step: forward, loss, backward.

        Ours rather than Trainer's, so the loss is scaled for gradient accumulation once, by compute_loss,
        on every transformers version: before 5.19 Trainer ignores `loss_is_scaled_for_ga` and divides the
        loss by the accumulation steps again (grpo, bnpo and dr_grpo then come out divided by GA^2).
        """
        began, self._round_seconds = time.perf_counter(), 0.0
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers
            self.optimizer.train()
        loss = self._forward_backward(model, self._prepare_inputs(inputs))
        if self._step % self.args.gradient_accumulation_steps == 0:  # this micro-step ended an optimizer step
            self._end_of_step()
        self._metrics["time/train"].append(time.perf_counter() - began - self._round_seconds)
        return loss

    def _forward_backward(self, model, inputs: dict) -> torch.Tensor:
        """Loss and gradients of one micro-batch, part by part (see batching.cut_for_padding)."""
        from accelerate.utils import DistributedType

        kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False  # DeepSpeed would divide by GA too
        parts, total = parts_of(inputs), 0.0
        # The entropy bonus is a mean over the micro-batch's trained tokens: every part divides by all of them.
        micro_tokens = sum(p["completion_mask"].sum() for p in parts) if self.args.top_entropy_quantile == 1.0 else None
        for i, part in enumerate(parts):
            # A part's loss is its share of the micro-batch's: equal parts of a mean over rows (grpo, sapo,
            # dr_grpo), or a sum over the step's tokens already (dapo, cispo).
            part = {**part, "num_items_in_batch": inputs["num_items_in_batch"], "num_parts": len(parts)}
            if micro_tokens is not None:
                part["micro_tokens"] = micro_tokens
            last = i == len(parts) - 1
            with self.compute_loss_context_manager(), \
                    contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = self.compute_loss(model, part)
                if self.args.loss_type not in GLOBALLY_NORMALISED:
                    loss = loss / len(parts)
                self.accelerator.backward(loss, **kwargs)
            total = total + loss.detach()
        return total

    def log(self, logs: dict, start_time=None) -> None:
        averaged = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        if self._metrics.get("time/train"):  # per optimizer step: the sum over its micro-steps
            micro_steps = self._metrics["time/train"]
            steps = max(1, len(micro_steps) // self.args.gradient_accumulation_steps)
            averaged["time/train"] = sum(micro_steps) / steps
        self._metrics.clear()
        if self._completion_rows and self.accelerator.is_main_process:
            self._report_completions()
        super().log({**logs, **averaged}, start_time)

    def close(self) -> None:
        """End the run: release the generator, then (in a multi-process run) the process group.

        Call it last: the trainer cannot train or save after it. A process group left for the interpreter's
        shutdown can abort the process: gloo's worker threads outlive the interpreter (torch, seen here as
        "terminate called without an active exception" on the rank that finished first, failing the launch).
        """
        self._stop_producer()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self._turn_backend is not None:
            self._turn_backend.close()
            self._turn_backend = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.accelerator.wait_for_everyone()  # no rank tears the group down under another's collective
            self.accelerator.end_training()


class RewardLogs:
    """What reward functions log through TRL's `log_extra(column, values)` and `log_metric(name, value)` kwargs."""

    def __init__(self):
        self.columns: dict[str, list] = defaultdict(list)
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def extra(self, column: str, values: list) -> None:
        self.columns[column].extend(values)

    def metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))


def generation_may_pass(exc: Exception) -> bool:
    """Whether a generation that failed may succeed once the next push lands: the server refused it because a push
    that failed half-way left its weights mixed (the trainer pushes again, and retries a failed push)."""
    from fastgrpo.client import ServerError

    while exc is not None:
        if isinstance(exc, ServerError):
            return exc.status == 503 and exc.type == "weights_inconsistent"
        exc = exc.__cause__
    return False


def _may_pass(exc: Exception) -> bool:
    """Whether trying a failed push again can help: not when the generator refused it (a 4xx answer)."""
    from fastgrpo.client import ServerError

    while exc is not None:
        if isinstance(exc, ServerError):
            return exc.status >= 500
        exc = exc.__cause__
    return True


@torch.no_grad()
def mix_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """reference <- alpha x policy + (1 - alpha) x reference, parameter by parameter (the same sharding on both:
    FSDP2 shards them alike, so each rank mixes its own shards)."""
    ref_params, policy_params = dict(reference.named_parameters()), dict(policy.named_parameters())
    if ref_params.keys() != policy_params.keys():
        raise RuntimeError("sync_ref_model: the reference and the policy have different parameters; a reference "
                           "loaded from another checkpoint cannot be mixed with this policy")
    for name, ref in ref_params.items():
        ref.mul_(1.0 - alpha).add_(policy_params[name].detach().to(ref.dtype), alpha=alpha)


def check_router_loss(model, coef: float | None) -> None:
    """fastgrpo adds no Mixture-of-Experts load-balancing loss: a MoE model whose effective weight (the config's
    when unset, as TRL reads it) is not 0 fails here instead of training without it unsaid."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not hasattr(config, "output_router_logits"):
        if coef not in (None, 0.0):
            raise ValueError(f"router_aux_loss_coef={coef}, but {type(model).__name__} is not a Mixture-of-Experts "
                             "model; leave it None")
        return
    effective = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef
    if effective:
        raise ValueError(f"{type(model).__name__} is a Mixture-of-Experts model with a load-balancing loss weight of "
                         f"{effective}{' (its config)' if coef is None else ''}; fastgrpo does not add the router "
                         "loss yet. Set router_aux_loss_coef=0.0 to train without it")


def cast_lm_head_to_fp32(model) -> None:
    """cast_lm_head_to_fp32: the LM head's weights and matmul in float32, autocast or not; a tied input embedding
    keeps giving activations in its former dtype."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        raise ValueError(f"cast_lm_head_to_fp32=True needs a plain Linear LM head; {type(model).__name__}'s is "
                         f"{type(head).__name__} (an adapter on lm_head is not supported: remove 'lm_head' from "
                         "target_modules, or set cast_lm_head_to_fp32=False)")
    dtype = head.weight.dtype
    head.float()

    def forward(hidden_states):
        with torch.autocast(hidden_states.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return torch.nn.functional.linear(hidden_states.float(), head.weight.float(), bias)

    head.forward = forward
    embeddings = model.get_input_embeddings()
    if dtype != torch.float32 and embeddings is not None and embeddings.weight is head.weight:
        embeddings.register_forward_hook(lambda module, args, output: output.to(dtype))


def environment_owned_data(args: GRPOConfig) -> Dataset:
    """No train_dataset: the environment owns the data, its reset() writes each prompt. TRL's placeholder rows of
    empty user messages, one round's worth, drive the loop; max_steps sets the length."""
    if args.max_steps <= 0:
        raise ValueError("When training without a `train_dataset` (the environment owns the data and returns the "
                         "prompt from `reset()`), `max_steps` must be set to a positive value to define the training "
                         "length. Set it via `GRPOConfig(max_steps=...)`.")
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * args.unique_prompts_per_generation})


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _disable_dropout(model) -> None:
    """Dropout off everywhere: nn.Dropout modules (what TRL turns off), and the attention dropout that most
    decoder layers (Llama, Qwen2, ...) apply as a float attribute inside attention, not as a module."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if isinstance(getattr(model.config, "attention_dropout", None), float):
        model.config.attention_dropout = 0.0


def _stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the generation config's EOS ids (chat models often have several,
    such as <|im_end|> and <|endoftext|>) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
