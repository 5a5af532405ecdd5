"""GRPOTrainer: TRL's GRPO workflow on transformers' Trainer, with generation on vLLM.

The class keeps transformers' hooks (data loading, training_step, compute_loss, evaluate, checkpoints, log)
and wires the parts that do the work, each in a module of its own (the words round, step, micro-batch and
part are defined in rounds.py):
- round_generation.RoundGenerator: a round's completions, single- or multi-turn, now or ahead;
- rewards, loss (pure): scores, group advantages, and the policy loss behind a LossSpec;
- batching, forward, packing: a round cut into micro-batches, and their logprobs;
- weight_sync: the push after every optimizer step, retried on every rank alike;
- rounds, completion_log: the round's tensors and metrics, and the completions table.

One generation round serves `steps_per_generation` micro-steps: the sampler hands each process its share of
a generation batch (every prompt `num_generations` times in a row), the round generates completions (each
prompt with its own seed), scores them, computes group advantages over the whole batch (all processes), and
cuts it into micro-batches: rows dealt to the round's optimizer steps at random, ordered to pad little
inside each (batching.py). A round that serves later steps keeps the generating policy's logprobs for their
ratio. Checkpoints keep the buffered round, so a resume in the middle of one is exact.
"""

import atexit
import contextlib
import logging
import os
import shutil
import time
from collections import defaultdict

import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, set_seed

from fastgrpo.config import GRPOConfig
from fastgrpo.hardware import keep_freed_memory
from fastgrpo.trainer.backends import colocate_backend, server_backend, stop_token_ids, warn_if_sharing_cores
from fastgrpo.trainer.batching import (completion_token_cost, pad_rows, pad_to_multiple, parts_of, round_layout,
                                      split_round)
from fastgrpo.trainer.collectives import explain, gathered_max, is_collective_failure, set_timeout
from fastgrpo.trainer.completion_log import CompletionTable, RewardLogs, flush_reward_logs
from fastgrpo.trainer.forward import PromptSharingUnsupported, completion_logits, prompt_groups
from fastgrpo.trainer.generation import GenerationBackend, ServerBackend, TransformersBackend, derived_seed
from fastgrpo.trainer.loss import (
    GLOBALLY_NORMALISED,
    AdaptiveEntropy,
    LossSpec,
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
from fastgrpo.trainer.lora import LoraSync, adapter_config, adapter_tensors, default_adapter_name
from fastgrpo.trainer.multi_turn import MultiTurn
from fastgrpo.trainer.packing import pack, packed_completion_logits, packing_unsupported, unpack
from fastgrpo.trainer.rewards import RewardModel, compute_rewards, env_reward, prepare_reward_funcs, reward_func_name
from fastgrpo.trainer.round_generation import RoundGenerator
from fastgrpo.trainer.rounds import Generated, episode_metrics, length_metrics, round_tensors
from fastgrpo.trainer.sampler import RepeatedStream, RepeatSampler
from fastgrpo.trainer.sharding import (check_layout, full_tensors, gathered_adapter, generation_weights,
                                       prepare_reference, reshard, sharded)
from fastgrpo.trainer.weight_sync import push_with_retries
from fastgrpo.transfer import ModelWeights

logger = logging.getLogger(__name__)


ROUND_STATE = "fastgrpo_round_state_{rank}.pt"  # in each checkpoint folder, one per process


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the half-written folder is gone."""


class _SyncWeightsCallback(TrainerCallback):
    """Push weights to the generator when training starts and after every optimizer step."""

    def __init__(self, trainer: "GRPOTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sync_weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sync_weights()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.rounds.stop_producer()


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
        model = self._load_policy(model, init_kwargs, quantization_config)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=args.trust_remote_code)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        self.tokenizer = processing_class
        model = self._add_adapters(model, args, peft_config)
        train_dataset = self._set_up_multi_turn(args, train_dataset, eval_dataset, tools, environment_factory,
                                                rollout_func, tool_call_parser)
        self._set_up_rewards(args, reward_funcs, reward_processing_classes)
        self._check_inputs(args, train_dataset, eval_dataset, peft_config)
        check_router_loss(model, args.router_aux_loss_coef)
        if args.cast_lm_head_to_fp32:
            cast_lm_head_to_fp32(model)
        self.ref_model = self._load_reference(args, init_kwargs) if args.beta != 0.0 and peft_config is None else None
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

        self._init_run_state()
        self._loss_spec = LossSpec.from_config(args)
        self._entropy = AdaptiveEntropy(args.entropy_coef, adaptive=args.use_adaptive_entropy,
                                        target=args.entropy_target, delta=args.entropy_coef_delta,
                                        coef_min=args.entropy_coef_min, coef_max=args.entropy_coef_max)
        # Sharing needs the model's cache in training, which gradient checkpointing switches off.
        self._share_prompts = args.share_prompt_prefix and not args.gradient_checkpointing
        self._pack = self._share_prompts and args.padding_free and self._packing_unsupported() is None
        self._completion_token_cost = completion_token_cost(self.model)
        if self.accelerator.device.type == "cpu":
            keep_freed_memory()  # activations live in host memory: reuse it rather than fault it in again
        self.rounds = RoundGenerator(args, self.accelerator, self.tokenizer, self._make_backend(), self.train_dataset,
                                     self._get_train_sampler, self._server_backend, self.multi_turn,
                                     pushed_version=lambda: self._synced_version, push_again=self._push_again,
                                     trainer=self)
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

    def _check_inputs(self, args: GRPOConfig, train_dataset, eval_dataset, peft_config) -> None:
        """Datasets with a 'prompt' column (streams prepared as TRL does), and options that fit the backend."""
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

    def _load_reference(self, args: GRPOConfig, init_kwargs: dict):
        """The frozen reference for the KL penalty (LoRA has none: the base model, the adapter disabled)."""
        reference = AutoModelForCausalLM.from_pretrained(self.model_path, **init_kwargs).eval()
        reference.requires_grad_(False)
        if args.cast_lm_head_to_fp32:
            cast_lm_head_to_fp32(reference)
        return reference

    def _init_run_state(self) -> None:
        """What the run keeps between micro-steps: metrics, the buffered round, the push and the producer."""
        self._metrics = defaultdict(list)  # logged means since the last log
        self._eval_metrics = defaultdict(list)
        a = self.args
        self._completions = CompletionTable(self.reward_func_names, a.generation_batch_size * 2,
                                            a.num_completions_to_print, a.report_to)
        self._round_seconds = 0.0  # generation + reward time inside the current training_step
        self._buffered: list[dict] | None = None
        self._step = 0
        self._synced_version: int | None = None
        self._pending_time = defaultdict(float)
        self._total_tokens = 0

    def _load_policy(self, model, init_kwargs: dict, quantization_config):
        """The policy from a name or path (the embedded model's names too), or as given; sets model_path."""
        if not isinstance(model, str):
            if quantization_config is not None:
                logger.warning("quantization_config is ignored: the model was given already loaded (as TRL does)")
            self.model_path = model.config._name_or_path
            return model
        from fastgrpo.models import resolve_model

        self.model_path = resolve_model(model)
        policy_kwargs = dict(init_kwargs)
        if quantization_config is not None:
            if "quantization_config" in policy_kwargs:
                raise ValueError("quantization_config was given both to the trainer and in args.model_init_kwargs: "
                                 "give it once")
            policy_kwargs["quantization_config"] = quantization_config
        return AutoModelForCausalLM.from_pretrained(self.model_path, **policy_kwargs)

    def _add_adapters(self, model, args: GRPOConfig, peft_config):
        """TRL's peft_config: train these adapters on the (frozen) model."""
        self.lora = None
        if peft_config is None:
            return model
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
        return model

    def _set_up_multi_turn(self, args: GRPOConfig, train_dataset, eval_dataset, tools, environment_factory,
                           rollout_func, tool_call_parser):
        """Tools, environments or a rollout_func (self.multi_turn); returns the training set (an environment
        may own its data)."""
        self.multi_turn = None
        if not (tools or environment_factory is not None or rollout_func is not None):
            if args.max_tool_calling_iterations is not None:
                raise ValueError(f"max_tool_calling_iterations={args.max_tool_calling_iterations} limits tool "
                                 "calls, but no tools were given: pass GRPOTrainer(tools=[...]) or leave it None")
            return train_dataset
        if args.async_generation and rollout_func is not None:
            raise ValueError("async_generation=True with a rollout_func: the function takes the trainer and "
                             "runs when the round is due; set async_generation=False (tools and environments "
                             "do run ahead)")
        self.multi_turn = MultiTurn(self.tokenizer, args, tools, environment_factory, rollout_func, tool_call_parser)
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
        return train_dataset

    def _set_up_rewards(self, args: GRPOConfig, reward_funcs, reward_processing_classes) -> None:
        """The reward functions (models loaded), their names and weights, environments' own rewards included."""
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
        a, acc = self.args, self.accelerator
        if not a.use_vllm:
            return TransformersBackend(lambda: acc.unwrap_model(self.model), self.tokenizer,
                                       stop_token_ids(acc.unwrap_model(self.model), self.tokenizer),
                                       synced=sharded(acc),
                                       weights=lambda: generation_weights(self.model, acc, a.ds3_gather_for_generation))
        if a.vllm_mode == "colocate":
            return colocate_backend(a, acc.unwrap_model(self.model), self.tokenizer, self.model_path,
                                    acc.process_index, adapter_only=bool(self.lora and self.lora.adapter_only))
        if not acc.is_main_process:
            return None  # only the main process talks to the server
        backend = self._server_backend()
        if a.async_generation:
            warn_if_sharing_cores(backend, acc.device.type)
        return backend

    def _server_backend(self) -> ServerBackend:
        return server_backend(self.args, self.policy_adapter)

    @property
    def policy_adapter(self) -> str | None:
        """The adapter this run's generations use (its own, when only adapters are pushed); None: the base model."""
        return self.lora.name if self.lora is not None and self.lora.adapter_only else None

    # --- weight sync ----------------------------------------------------------------

    def sync_weights(self) -> None:
        """Push the current weights if they changed since the last push (every rank calls this), tried again
        on every rank while the failure may pass (weight_sync.push_with_retries)."""
        if isinstance(self.backend, TransformersBackend):
            return
        version = self.state.global_step
        if self._synced_version == version:
            return
        began, self._where = time.perf_counter(), f"the weight push of step {version}"
        push_with_retries(lambda: self._push_once(version), version, self.accelerator.process_index)
        self._synced_version = version
        self.rounds.pushed(version)
        self._pending_time["time/weight_sync"] += time.perf_counter() - began

    def _push_once(self, version: int) -> None:
        """One attempt: every rank gathers every parameter (a collective), also when its own send failed."""
        model = self.accelerator.unwrap_model(self.model)
        with self._weights_to_push(model) as weights:
            try:
                if weights is None:  # LoRA: the adapter alone, gathered on every rank where it is sharded
                    with gathered_adapter(model, self.accelerator):
                        tensors = full_tensors(adapter_tensors(model))
                    if self.backend is not None:
                        self.backend.sync_adapter(self.lora.name, tensors, adapter_config(model), version)
                elif self.backend is not None:
                    self.backend.sync_weights(weights, version)
            finally:
                if weights is not None:
                    weights.drain()

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

    @property
    def backend(self) -> GenerationBackend | None:
        """This process's generator (None on the processes of a server-mode run that do not talk to it)."""
        return self.rounds.backend

    @property
    def vllm_client(self):
        """This process's client of the generation server (server mode), e.g. for a rollout_func."""
        generator = self.rounds.generator()
        if not isinstance(generator, ServerBackend):
            raise ValueError("this needs the generation server: use_vllm=True, vllm_mode='server'")
        return generator.client

    def generate_completions(self, prompt_ids: list[list[int]], max_tokens: int | list[int] | None = None) -> list[dict]:
        """For a rollout_func: one completion of each prompt (token ids) with the run's sampling settings, as
        {"completion_ids", "logprobs" (the generator's; None without vLLM), "stopped"} per prompt."""
        return self.rounds.generate_completions(prompt_ids, max_tokens)

    def _push_again(self) -> None:
        self._synced_version = None
        self.sync_weights()

    @torch.no_grad()
    def _generate_and_score(self, inputs: list[dict], round_index: int, evaluating: bool = False) -> list[dict]:
        """Generate, score and batch one round: its micro-batches in training order.

        Evaluating, it only generates and scores (one micro-batch, no old or reference logprobs), and logs
        under the eval metrics."""
        a, acc = self.args, self.accelerator
        metrics = self._eval_metrics if evaluating else self._metrics
        prompts = [x["prompt"] for x in inputs]
        began = time.perf_counter()
        generated = self.rounds.generate(prompts, inputs, round_index, evaluating)
        generate_s = time.perf_counter() - began
        self.rounds.check_version(generated.weight_version)

        texts = self.tokenizer.batch_decode(generated.completion_ids, skip_special_tokens=True)
        began = time.perf_counter()
        logged = RewardLogs()
        all_rewards, advantages, stats, per_func = self._score(prompts, inputs, generated, texts, logged, evaluating)
        reward_s = time.perf_counter() - began
        start = acc.process_index * len(inputs)
        batch = round_tensors(generated, advantages[start : start + len(inputs)], self.tokenizer.pad_token_id,
                              a.mask_truncated_completions)
        sampling_logps = generated.sampling_logps
        if sampling_logps is not None and a.vllm_importance_sampling_correction and not evaluating:
            batch["sampling_logps"] = pad_rows(sampling_logps, 0.0).float()
        elif a.async_generation and not evaluating:
            # Generated ahead, by older weights: without the sampler correction, the ratio's denominator is
            # the sampler's own logprobs, never the trainer's current ones (a ratio of 1 for stale data).
            batch["old_logps"] = pad_rows(sampling_logps, 0.0).float()
        micro = self._micro_batches(batch, round_index, evaluating)

        self._round_metrics(metrics, generated, batch, stats, per_func, generate_s, reward_s, evaluating)
        self._round_seconds += generate_s + reward_s
        if not evaluating:
            for key, value in self._pending_time.items():
                metrics[key].append(value)
            self._pending_time.clear()
        extra_columns = flush_reward_logs(acc, logged, metrics, len(prompts), with_columns=a.log_completions)
        if a.log_completions:
            self._completions.add(acc, self.state.global_step, prompts, texts, all_rewards, advantages, evaluating,
                                  extra_columns)
        return micro

    def _score(self, prompts: list, inputs: list[dict], generated: Generated, texts: list[str], logged: "RewardLogs",
               evaluating: bool):
        """Every process's rewards [rows, functions], the advantages of every row, and their statistics."""
        a, acc = self.args, self.accelerator
        episodes = generated.episodes
        if episodes is not None:
            completions = episodes.completions
        elif isinstance(prompts[0], list):  # conversational
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = texts
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k != "prompt"}
        if episodes is not None:
            clash = set(columns) & set(episodes.reward_columns)
            if clash:
                raise ValueError(f"dataset columns {sorted(clash)} clash with what multi-turn rollouts pass to the "
                                 "reward functions: rename the columns")
            columns.update(episodes.reward_columns)
        local_rewards = compute_rewards(self.reward_funcs, prompts, completions, generated.completion_ids, columns,
                                        trainer_state=self.state, log_extra=logged.extra, log_metric=logged.metric)
        all_rewards = acc.gather(local_rewards.to(acc.device)).float().cpu()
        total, per_func = weighted_rewards(all_rewards, self.reward_weights)
        num_generations = (a.num_generations_eval or a.num_generations) if evaluating else a.num_generations
        if a.multi_objective_aggregation == "normalize_then_sum":
            advantages, stats = normalize_then_sum_advantages(all_rewards, self.reward_weights, num_generations)
        else:
            advantages, stats = group_advantages(total, num_generations, a.scale_rewards)
        return all_rewards, advantages, stats, per_func

    def _micro_batches(self, batch: dict, round_index: int, evaluating: bool) -> list[dict]:
        """The round cut into micro-batches, with the old policy's and the reference's logprobs where needed."""
        a, acc = self.args, self.accelerator
        if evaluating:  # one micro-batch, every row, normalised by its own tokens on every process
            tokens = acc.gather(batch["completion_mask"].sum().reshape(1).to(acc.device)).sum().float().cpu()
            micro = [{**pad_to_multiple(batch, a.pad_to_multiple_of, self.tokenizer.pad_token_id),
                      "num_items_in_batch": tokens}]
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
        return micro

    def _round_metrics(self, metrics, generated: Generated, batch: dict, stats: dict, per_func: dict,
                       generate_s: float, reward_s: float, evaluating: bool) -> None:
        """TRL's round metrics over every process: tokens, rewards, lengths, times, and the async staleness."""
        acc, device = self.accelerator, self.accelerator.device
        lengths = acc.gather(torch.tensor([len(c) for c in generated.completion_ids], device=device)).cpu()
        round_tokens = int(acc.gather(torch.tensor(
            [batch["prompt_mask"].sum().item() + batch["completion_attention"].sum().item()], device=device)
        ).sum().item())
        if not evaluating:
            self._total_tokens += round_tokens
            metrics["num_tokens"].append(self._total_tokens)
        for name in ("reward", "reward_std", "frac_reward_zero_std"):
            metrics[name].append(stats[name].item())
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(per_func["mean"][i].item())
            metrics[f"rewards/{name}/std"].append(per_func["std"][i].item())
        terminated = acc.gather(torch.tensor(generated.terminated, device=device)).cpu().bool()
        for name, value in length_metrics(lengths, terminated).items():
            metrics[name].append(value)
        metrics["time/generate"].append(generate_s)
        metrics["time/reward"].append(reward_s)
        if generated.episodes is None:
            metrics["generate/tokens_per_second"].append(lengths.sum().item() / max(generate_s, 1e-9))
        else:  # the model's tokens only, not the tool results and messages between its turns
            tokens = acc.gather(batch["completion_mask"].sum().reshape(1).to(device)).sum().item()
            metrics["generate/tokens_per_second"].append(tokens / max(generate_s, 1e-9))
            totals = {k: acc.gather(torch.tensor(v, device=device, dtype=torch.float32)).cpu()
                      for k, v in generated.episodes.per_row.items()}
            for name, value in episode_metrics(totals).items():
                metrics[name].append(value)
        behind = generated.staleness
        if behind is not None:
            metrics["async/staleness_mean"].append(sum(behind) / len(behind))
            metrics["async/staleness_max"].append(max(behind))
            metrics["async/regenerated_rounds"].append(self.rounds.regenerated)
        if generated.ahead_seconds is not None:
            metrics["async/generation_seconds"].append(generated.ahead_seconds)

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
        old_logps, ref_logps, sampling_logps = (inputs[k].to(device) if k in inputs else None
                                                for k in ("old_logps", "ref_logps", "sampling_logps"))
        loss, metrics = grpo_loss(self._loss_spec, logps, old_logps, inputs["advantages"].to(device), mask,
                                  ref_per_token_logps=ref_logps, sampling_per_token_logps=sampling_logps,
                                  entropy_mask=entropy_mask, num_items_in_batch=inputs["num_items_in_batch"].item(),
                                  num_processes=acc.num_processes)
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
        if self.accelerator.is_main_process:
            self._completions.report()
        super().log({**logs, **averaged}, start_time)

    def close(self) -> None:
        """End the run: release the generator, then (in a multi-process run) the process group.

        Call it last: the trainer cannot train or save after it. A process group left for the interpreter's
        shutdown can abort the process: gloo's worker threads outlive the interpreter (torch, seen here as
        "terminate called without an active exception" on the rank that finished first, failing the launch).
        """
        self.rounds.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.accelerator.wait_for_everyone()  # no rank tears the group down under another's collective
            self.accelerator.end_training()


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
