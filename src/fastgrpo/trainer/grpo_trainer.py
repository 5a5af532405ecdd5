"""GRPOTrainer: TRL's GRPO workflow on transformers' Trainer, with generation on vLLM.

One generation round serves `steps_per_generation` micro-steps: the sampler
hands each process its share of a generation batch (every prompt
`num_generations` times in a row), the round generates completions, scores them,
computes group advantages over the whole batch (all processes), and buffers the
micro-batches. After every optimizer step the new weights go to the generator.
"""

import atexit
import logging
import tempfile
import time
from collections import defaultdict

import torch
from torch.utils.data import Sampler
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback

from fastgrpo.config import GRPOConfig
from fastgrpo.trainer.forward import PromptSharingUnsupported, completion_logits, prompt_groups
from fastgrpo.trainer.generation import (
    ColocateBackend,
    GenerationBackend,
    Sampling,
    ServerBackend,
    TransformersBackend,
)
from fastgrpo.trainer.loss import entropy_from_logits, group_advantages, grpo_loss, selective_log_softmax, weighted_rewards
from fastgrpo.trainer.rewards import compute_rewards, prepare_reward_funcs, reward_func_name

logger = logging.getLogger(__name__)


WEIGHT_SYNC_ATTEMPTS = 3  # a push that fails for a reason that may pass is tried again (see sync_weights)


class StaleGenerationError(RuntimeError):
    pass


class RepeatSampler(Sampler):
    """Dataset indices for generation batches.

    Each batch of `prompts_per_batch` prompts is emitted `repeat_count` times (once
    per micro-step it serves), each prompt `num_generations` times in a row, so a
    group of completions is consecutive in the global batch.
    """

    def __init__(self, num_rows: int, num_generations: int, prompts_per_batch: int, repeat_count: int,
                 shuffle: bool = True, seed: int = 0):
        if num_rows < prompts_per_batch:
            raise ValueError(f"the dataset has {num_rows} prompts but one generation batch needs "
                             f"{prompts_per_batch}: use a larger dataset or a smaller generation batch")
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_batch, self.repeat_count = prompts_per_batch, repeat_count
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        for start in range(0, len(order) - self.prompts_per_batch + 1, self.prompts_per_batch):
            chunk = order[start : start + self.prompts_per_batch]
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        return (self.num_rows // self.prompts_per_batch) * self.prompts_per_batch * self.num_generations * self.repeat_count


class _SyncWeightsCallback(TrainerCallback):
    """Push weights to the generator when training starts and after every optimizer step."""

    def __init__(self, trainer: "GRPOTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sync_weights()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sync_weights()


def _identity_collator(features):
    return features


def _pad(rows: list[list], value, left: bool = False) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([([value] * (width - len(r)) + list(r)) if left else (list(r) + [value] * (width - len(r)))
                         for r in rows])


class GRPOTrainer(Trainer):
    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None),
                 peft_config=None):
        if peft_config is not None:
            raise NotImplementedError("peft_config is not supported by fastgrpo yet: merge adapters or train the "
                                      "full model")
        args = args or GRPOConfig(output_dir="grpo-output")
        if not isinstance(args, GRPOConfig):
            raise TypeError("args must be a fastgrpo.GRPOConfig")
        init_kwargs = dict(args.model_init_kwargs or {})
        init_kwargs.setdefault("dtype", torch.float32)  # master weights; bf16 comes from autocast
        if isinstance(model, str):
            from fastgrpo.models import resolve_model

            self.model_path = resolve_model(model)
            model = AutoModelForCausalLM.from_pretrained(self.model_path, **init_kwargs)
        else:
            self.model_path = model.config._name_or_path
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(self.model_path)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        self.tokenizer = processing_class

        self.reward_funcs = prepare_reward_funcs(reward_funcs, reward_processing_classes)
        if not self.reward_funcs:
            raise ValueError("give at least one reward function")
        self.reward_func_names = [reward_func_name(f) for f in self.reward_funcs]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward "
                             "functions: give one weight per function")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        if eval_dataset is not None:
            raise NotImplementedError("evaluation inside GRPOTrainer is not built yet: evaluate the saved model, or "
                                      "point an eval harness at the server's OpenAI routes while training runs")
        if train_dataset is not None and "prompt" not in train_dataset.column_names:
            raise ValueError(f"the training dataset needs a 'prompt' column (text or chat messages); it has "
                             f"{train_dataset.column_names}")

        self.ref_model = None
        if args.beta != 0.0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_path, **init_kwargs).eval()
            self.ref_model.requires_grad_(False)

        super().__init__(model=model, args=args, data_collator=_identity_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        # We normalise the loss for gradient accumulation ourselves (see compute_loss).
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = False
        if self.ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)

        self._metrics = defaultdict(list)  # logged means since the last log
        self._round_seconds = 0.0  # generation + reward time inside the current training_step
        self._buffered: list[dict] | None = None
        self._step = 0
        self._synced_version: int | None = None
        self._pending_time = defaultdict(float)
        self._total_tokens = 0
        # Sharing needs the model's cache in training, which gradient checkpointing switches off.
        self._share_prompts = args.share_prompt_prefix and not args.gradient_checkpointing
        self._completion_token_cost = _completion_token_cost(self.model)
        self.backend = self._make_backend()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            atexit.register(_destroy_process_group)  # for scripts that never call close() (see close)
        self.add_callback(_SyncWeightsCallback(self))

    # --- generation backends ------------------------------------------------------

    def _make_backend(self) -> GenerationBackend | None:
        a = self.args
        if not a.use_vllm:
            return TransformersBackend(lambda: self.accelerator.unwrap_model(self.model), self.tokenizer)
        if a.vllm_mode == "server":
            if not self.accelerator.is_main_process:
                return None  # only the main process talks to the server
            return ServerBackend(a.vllm_server_base_url, a.vllm_server_host, a.vllm_server_port,
                                 a.vllm_server_timeout, bucket_bytes=a.weight_sync_bucket_bytes,
                                 api_key=a.vllm_server_api_key)
        path = self.model_path
        if path is None or not isinstance(path, str):
            path = tempfile.mkdtemp(prefix="fastgrpo-colocate-")
            self.accelerator.unwrap_model(self.model).save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        max_len = a.vllm_max_model_len or ((a.max_prompt_length or 1024) + a.max_completion_length)
        return ColocateBackend(path, a.vllm_gpu_memory_utilization, a.vllm_tensor_parallel_size, max_len,
                               seed=a.seed + self.accelerator.process_index, bucket_bytes=a.weight_sync_bucket_bytes)

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

        from fastgrpo.transfer import ModelWeights

        if isinstance(self.backend, TransformersBackend):
            return
        version = self.state.global_step
        if self._synced_version == version:
            return
        began = time.perf_counter()
        for attempt in range(1, WEIGHT_SYNC_ATTEMPTS + 1):
            weights = ModelWeights(self.accelerator.unwrap_model(self.model))
            failure = None
            try:
                if self.backend is not None:
                    self.backend.sync_weights(weights, version)
            except Exception as exc:
                failure = (f"{type(exc).__name__}: {exc}", _may_pass(exc))
                logger.error("weight sync of step %d failed on process %d (attempt %d of %d): %s", version,
                             self.accelerator.process_index, attempt, WEIGHT_SYNC_ATTEMPTS, failure[0])
            finally:
                weights.drain()
            failures = [f for f in gather_object([failure]) if f is not None]
            if not failures:
                break
            if attempt == WEIGHT_SYNC_ATTEMPTS or not all(may_pass for _, may_pass in failures):
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                raise RuntimeError(f"pushing the weights of step {version} to the generator failed{tried}: "
                                   f"{failures[0][0]}")
        self._synced_version = version
        self._pending_time["time/weight_sync"] += time.perf_counter() - began

    # --- data --------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        a = self.args
        return RepeatSampler(len(train_dataset or self.train_dataset), a.num_generations,
                             a.unique_prompts_per_generation, a.steps_per_generation * a.num_iterations,
                             shuffle=True, seed=a.seed)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("GRPOTrainer needs a train_dataset with a 'prompt' column")
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _prepare_inputs(self, generation_batch):
        every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % every == 0 or self._buffered is None:
            self._buffered = self._generate_and_score(generation_batch)
        inputs = self._buffered[self._step % self.args.steps_per_generation]
        self._step += 1
        return inputs

    # --- one generation round -----------------------------------------------------

    def _prompt_ids(self, prompts) -> list[list[int]]:
        conversational = isinstance(prompts[0], list)
        ids = []
        for prompt in prompts:
            if conversational:
                row = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]
            else:
                row = self.tokenizer(prompt)["input_ids"]
            if self.args.max_prompt_length is not None:
                row = row[-self.args.max_prompt_length :]  # keep the end: the question and the turn marker
            ids.append(list(row))
        return ids

    def _sampling(self, n: int) -> Sampling:
        a = self.args
        return Sampling(n=n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                        repetition_penalty=a.repetition_penalty, max_tokens=a.max_completion_length)

    def _generate(self, prompt_ids: list[list[int]]):
        """Completions (and sampler logprobs) for this process's rows, in row order."""
        from accelerate.utils import broadcast_object_list, gather_object

        a, acc = self.args, self.accelerator
        seed = a.seed * 1_000_003 + self.state.global_step * 7919
        if not self._server_mode():
            with acc.autocast():  # transformers generation runs in the training precision (bf16 if set)
                comps = self.backend.generate(prompt_ids, self._sampling(1), seed + 104_729 * acc.process_index)
            ids = [c[0] for c in comps.token_ids]
            lps = [c[0] for c in comps.logprobs] if comps.logprobs is not None else None
            return ids, lps, comps.weight_version
        everyone = gather_object(prompt_ids)
        payload = [None, None, None]
        if acc.is_main_process:
            groups = [everyone[i : i + a.num_generations] for i in range(0, len(everyone), a.num_generations)]
            if any(any(row != group[0] for row in group) for group in groups):
                raise RuntimeError("a generation batch is not made of whole groups of identical prompts; this is "
                                   "a sampler bug: please report it with your GRPOConfig")
            comps = self.backend.generate([g[0] for g in groups], self._sampling(a.num_generations), seed)
            payload = [[c for group in comps.token_ids for c in group],
                       [lp for group in comps.logprobs for lp in group], comps.weight_version]
        broadcast_object_list(payload, from_process=0)
        start = acc.process_index * len(prompt_ids)
        rows = slice(start, start + len(prompt_ids))
        return payload[0][rows], payload[1][rows], payload[2]

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
    def _generate_and_score(self, inputs: list[dict]) -> list[dict]:
        a, acc, device = self.args, self.accelerator, self.accelerator.device
        metrics = self._metrics
        prompts = [x["prompt"] for x in inputs]
        conversational = isinstance(prompts[0], list)
        prompt_ids = self._prompt_ids(prompts)

        began = time.perf_counter()
        completion_ids, sampling_logps, version = self._generate(prompt_ids)
        generate_s = time.perf_counter() - began
        self._check_version(version)

        eos = self.tokenizer.eos_token_id
        terminated = [len(c) > 0 and c[-1] == eos for c in completion_ids]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts

        began = time.perf_counter()
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k != "prompt"}
        local_rewards = compute_rewards(self.reward_funcs, prompts, completions, completion_ids, columns,
                                        trainer_state=self.state)
        all_rewards = acc.gather(local_rewards.to(device)).float().cpu()
        total, per_func = weighted_rewards(all_rewards, self.reward_weights)
        advantages, stats = group_advantages(total, a.num_generations, a.scale_rewards)
        reward_s = time.perf_counter() - began
        start = acc.process_index * len(inputs)
        local_advantages = advantages[start : start + len(inputs)]

        # Batch tensors: prompts left-padded, completions right-padded.
        pad = self.tokenizer.pad_token_id
        prompt_tensor = _pad(prompt_ids, pad, left=True)
        prompt_mask = _pad([[1] * len(p) for p in prompt_ids], 0, left=True)
        completion_tensor = _pad(completion_ids, pad)
        completion_attention = _pad([[1] * len(c) for c in completion_ids], 0)
        completion_mask = completion_attention.clone()
        if a.mask_truncated_completions:
            completion_mask[~torch.tensor(terminated)] = 0
        batch = {"prompt_ids": prompt_tensor, "prompt_mask": prompt_mask, "completion_ids": completion_tensor,
                 "completion_attention": completion_attention, "completion_mask": completion_mask,
                 "advantages": local_advantages}
        if sampling_logps is not None and a.vllm_importance_sampling_correction:
            batch["sampling_logps"] = _pad(sampling_logps, 0.0).float()

        # Token count of the optimizer step, all processes: the "dapo" normaliser.
        lengths = acc.gather(torch.tensor([len(c) for c in completion_ids], device=device)).cpu()
        step_tokens = completion_mask.sum().to(device)
        global_tokens = acc.gather(step_tokens.reshape(1)).sum().item()
        batch["num_items_in_batch"] = torch.tensor(
            global_tokens * self.args.gradient_accumulation_steps / self.args.steps_per_generation)

        micro = self._split(batch, a.steps_per_generation)
        if a.num_iterations > 1 or a.beta != 0.0:
            for m in micro:
                if a.num_iterations > 1:
                    m["old_logps"] = self._per_token_logps(self.model, m)
                if a.beta != 0.0:
                    m["ref_logps"] = self._per_token_logps(self.ref_model, m)

        # Metrics, TRL's names.
        self._total_tokens += int(acc.gather(torch.tensor(
            [prompt_mask.sum().item() + completion_attention.sum().item()], device=device)).sum().item())
        metrics["num_tokens"].append(self._total_tokens)
        metrics["reward"].append(stats["reward"].item())
        metrics["reward_std"].append(stats["reward_std"].item())
        metrics["frac_reward_zero_std"].append(stats["frac_reward_zero_std"].item())
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(per_func["mean"][i].item())
            metrics[f"rewards/{name}/std"].append(per_func["std"][i].item())
        all_terminated = acc.gather(torch.tensor(terminated, device=device)).cpu()
        metrics["completions/mean_length"].append(lengths.float().mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        metrics["completions/clipped_ratio"].append(1.0 - all_terminated.float().mean().item())
        done = lengths[all_terminated]
        metrics["completions/mean_terminated_length"].append(done.float().mean().item() if len(done) else 0.0)
        metrics["time/generate"].append(generate_s)
        metrics["time/reward"].append(reward_s)
        self._round_seconds += generate_s + reward_s
        metrics["generate/tokens_per_second"].append(lengths.sum().item() / max(generate_s, 1e-9))
        for key, value in self._pending_time.items():
            metrics[key].append(value)
        self._pending_time.clear()
        if a.log_completions and acc.is_main_process:
            self._print_completions(prompts, texts, total[start : start + len(inputs)])
        return micro

    def _print_completions(self, prompts, texts, rewards) -> None:
        shown = self.args.num_completions_to_print or len(texts)
        from tqdm import tqdm

        for prompt, text, reward in list(zip(prompts, texts, rewards.tolist()))[:shown]:
            question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            tqdm.write(f"step {self.state.global_step} | reward {reward:.2f} | "
                       f"{' '.join(question.split())[:80]} -> {' '.join(text.split())[:160]}")

    def _split(self, batch: dict, parts: int) -> list[dict]:
        """Cut a generation batch into micro-batches that waste little compute on padding.

        Rows sorted by total length pad least; with prompt sharing, rows kept by prompt run each prompt
        once per micro-batch but pad their completions more. Take whichever order costs less, counting
        a completion position as a token plus its share of the LM head.
        """
        rows = batch["prompt_ids"].shape[0]
        if parts == 1:
            return [_trim(batch)]
        prompt_lengths = batch["prompt_mask"].sum(1)
        completion_lengths = batch["completion_attention"].sum(1)
        order = torch.argsort(prompt_lengths + completion_lengths, stable=True)
        size = rows // parts
        if self._share_prompts:
            _, prompt_index = prompt_groups(batch["prompt_ids"], batch["prompt_mask"])
            # By prompt length, then prompt, then completion length (stable sorts, last key first).
            by_prompt = torch.argsort(completion_lengths, stable=True)
            by_prompt = by_prompt[torch.argsort(prompt_index[by_prompt], stable=True)]
            by_prompt = by_prompt[torch.argsort(prompt_lengths[by_prompt], stable=True)]

            def cost(order) -> float:
                total = 0.0
                for p in range(parts):
                    index = order[p * size : (p + 1) * size]
                    total += (len(prompt_index[index].unique()) * int(prompt_lengths[index].max())
                              + len(index) * int(completion_lengths[index].max()) * self._completion_token_cost)
                return total

            order = min(order, by_prompt, key=cost)
        micro = []
        for p in range(parts):
            index = order[p * size : (p + 1) * size]
            m = {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v)
                 for k, v in batch.items()}
            micro.append(_trim(m))
        return micro

    # --- the loss ------------------------------------------------------------------------

    def _per_token_logps(self, model, m: dict, with_entropy: bool = False):
        """Log-probs of the completion tokens under `model`; logits only over the completion."""
        device = self.accelerator.device
        tensors = [m[k].to(device) for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_attention")]
        try:
            logits = completion_logits(model, *tensors, share_prompts=self._share_prompts)
        except PromptSharingUnsupported as exc:
            logger.warning("prompt sharing is off for this run: %s", exc)
            self._share_prompts = False
            logits = completion_logits(model, *tensors, share_prompts=False)
        logits = logits / self.args.temperature
        logps = selective_log_softmax(logits, tensors[2])
        if with_entropy:
            with torch.no_grad():
                return logps, entropy_from_logits(logits.detach())
        return logps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GRPOTrainer does not return outputs")
        a, acc, device = self.args, self.accelerator, self.accelerator.device
        logps, entropy = self._per_token_logps(model, inputs, with_entropy=True)
        mask = inputs["completion_mask"].to(device)
        loss, metrics = grpo_loss(
            logps, inputs.get("old_logps"), inputs["advantages"].to(device), mask, loss_type=a.loss_type,
            epsilon_low=a.epsilon, epsilon_high=a.effective_epsilon_high, beta=a.beta,
            ref_per_token_logps=inputs.get("ref_logps"), max_completion_length=a.max_completion_length,
            num_items_in_batch=inputs["num_items_in_batch"].item(), num_processes=acc.num_processes,
            sampling_per_token_logps=inputs["sampling_logps"].to(device) if "sampling_logps" in inputs else None,
            importance_sampling_cap=a.vllm_importance_sampling_cap,
        )
        if a.loss_type != "dapo":  # dapo's global normaliser already spans the accumulated micro-steps
            loss = loss / self.current_gradient_accumulation_steps
        token_count = mask.sum().clamp(min=1)
        metrics["entropy"] = (entropy * mask).sum() / token_count
        for key, value in metrics.items():
            value = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(1)
            self._metrics[key].append(acc.gather(value).nanmean().item())
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        began, self._round_seconds = time.perf_counter(), 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._metrics["time/train"].append(time.perf_counter() - began - self._round_seconds)
        return loss

    def log(self, logs: dict, start_time=None) -> None:
        averaged = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        if self._metrics.get("time/train"):  # per optimizer step: the sum over its micro-steps
            micro_steps = self._metrics["time/train"]
            steps = max(1, len(micro_steps) // self.args.gradient_accumulation_steps)
            averaged["time/train"] = sum(micro_steps) / steps
        self._metrics.clear()
        super().log({**logs, **averaged}, start_time)

    def close(self) -> None:
        """End the run: release the generator, then (in a multi-process run) the process group.

        Call it last: the trainer cannot train or save after it. A process group left for the interpreter's
        shutdown can abort the process: gloo's worker threads outlive the interpreter (torch, seen here as
        "terminate called without an active exception" on the rank that finished first, failing the launch).
        """
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.accelerator.wait_for_everyone()  # no rank tears the group down under another's collective
            self.accelerator.end_training()


def _may_pass(exc: Exception) -> bool:
    """Whether trying a failed push again can help: not when the generator refused it (a 4xx answer)."""
    from fastgrpo.client import ServerError

    while exc is not None:
        if isinstance(exc, ServerError):
            return exc.status >= 500
        exc = exc.__cause__
    return True


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _completion_token_cost(model) -> float:
    """Cost of a completion position relative to a prompt token: the body, plus the LM head (vocab x hidden
    multiply-adds) that only completion positions pay. About 1.27 for SmolLM2-135M, 1.08 for Qwen2.5-7B."""
    config = getattr(model, "config", None)
    try:
        head = config.vocab_size * config.hidden_size
        body = model.num_parameters(exclude_embeddings=True)
        return 1.0 + head / max(body, 1)
    except (AttributeError, TypeError):
        return 1.0


def _trim(m: dict) -> dict:
    """Drop columns that are padding in every row (left of prompts, right of completions)."""
    prompt_keep = m["prompt_mask"].any(0)
    first = int(prompt_keep.float().argmax()) if prompt_keep.any() else 0
    completion_keep = m["completion_attention"].any(0)
    last = int(completion_keep.nonzero().max()) + 1 if completion_keep.any() else 1
    out = dict(m)
    for key in ("prompt_ids", "prompt_mask"):
        out[key] = m[key][:, first:]
    for key in ("completion_ids", "completion_attention", "completion_mask", "sampling_logps"):
        if key in m:
            out[key] = m[key][:, :last]
    return out
