"""Generating this process's rows of a round: single completions or multi-turn episodes, now or ahead.

In server mode the main process alone talks to the server for single turns: it generates every process's
unique prompts and broadcasts the completions. Multi-turn episodes run on every process (each with a
client of its own). With async_generation a producer thread generates the next rounds while the trainer
trains (async_rounds.py); a round it generated is checked when taken and generated again if it may not be
trained on.
"""

import contextlib
import copy
import logging
from collections.abc import Callable

from fastgrpo.trainer.async_rounds import RoundProducer, first_step, staleness, why_not_train
from fastgrpo.trainer.generation import (
    GenerationBackend,
    Sampling,
    ServerBackend,
    TransformersBackend,
    derived_seed,
    prompt_seeds,
)
from fastgrpo.trainer.multi_turn import MultiTurn, RoundRollout, turn_generator
from fastgrpo.trainer.rounds import Generated
from fastgrpo.trainer.weight_sync import generation_may_pass

logger = logging.getLogger(__name__)

COMPLETION_SEEDS = -7  # generate_completions' seeds: apart from the rounds' (indices >= 0) and evaluation's
SERVER_RESTARTED = "server-restarted"  # in the single-turn broadcast: every process pushes again


class StaleGenerationError(RuntimeError):
    """The generator ran on weights the trainer did not push (another trainer on the same server, say)."""


class RoundGenerator:
    """One per trainer. `backend` is this process's generator (None on the processes of a server-mode run that
    do not talk to the server); `new_server_backend()` makes another client (threads and other processes get
    their own); `pushed_version()` is the trainer's last push and `push_again()` pushes it once more (every
    process: a collective); `trainer` is handed to multi-turn runs, whose rollout_func receives it as in TRL."""

    def __init__(self, args, accelerator, tokenizer, backend: GenerationBackend | None, train_dataset,
                 train_sampler: Callable, new_server_backend: Callable[[], ServerBackend],
                 multi_turn: MultiTurn | None, pushed_version: Callable[[], int | None],
                 push_again: Callable[[], None], trainer):
        self.args, self.accelerator, self.tokenizer, self.backend = args, accelerator, tokenizer, backend
        self.train_dataset, self.train_sampler, self.new_server_backend = train_dataset, train_sampler, new_server_backend
        self.multi_turn, self.pushed_version, self.push_again, self.trainer = multi_turn, pushed_version, push_again, trainer
        self.producer: RoundProducer | None = None  # async_generation: rounds generated ahead
        self.producer_backend: ServerBackend | None = None
        self.turn_backend: ServerBackend | None = None  # multi-turn episodes on a process that holds no backend
        self.completion_calls = 0  # generate_completions: seeds apart per call
        self.regenerated = 0  # rounds generated ahead, then generated again

    def generate(self, prompts: list, inputs: list[dict], round_index: int, evaluating: bool) -> Generated:
        """This process's rows of the round, in row order."""
        if self.multi_turn is not None:
            return self._multi_turn_round(prompts, inputs, round_index, evaluating)
        a = self.args
        num_generations = (a.num_generations_eval or a.num_generations) if evaluating else a.num_generations
        return self._single_turn_round(self.prompt_ids(prompts), num_generations, round_index, evaluating)

    def prompt_ids(self, prompts, tokenizer=None) -> list[list[int]]:
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

    def sampling(self, n: int) -> Sampling:
        a = self.args
        return Sampling(n=n, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p or 0.0,
                        repetition_penalty=a.repetition_penalty, max_tokens=a.max_completion_length,
                        extra=tuple(sorted((a.generation_kwargs or {}).items())))

    def check_version(self, version: int | None) -> None:
        """A generation on weights the trainer did not push, or older than the bound, stops the run."""
        pushed = self.pushed_version()
        if version is None or pushed is None:
            return
        lag = pushed - version
        if lag < 0 or lag > self.args.vllm_max_weight_staleness:
            raise StaleGenerationError(
                f"the generator used weights version {version}, but the trainer pushed version {pushed} (the "
                "optimizer step it took). Another trainer may be pushing to the same server, or a push was lost. "
                "Use one server per run, or allow off-policy data with vllm_max_weight_staleness.")

    # --- single turns ----------------------------------------------------------------

    def _single_turn_round(self, prompt_ids: list[list[int]], num_generations: int, round_index: int,
                           evaluating: bool, restarts: int = 0) -> Generated:
        """Each prompt of the round samples with its own seed. In server mode the main process generates every
        process's unique prompts (now, or taken from the producer) and broadcasts the completions."""
        from accelerate.utils import broadcast_object_list, gather_object

        from fastgrpo.client import ServerRestarted

        a, acc = self.args, self.accelerator
        if not (a.use_vllm and a.vllm_mode == "server"):
            rows = len(prompt_ids)
            seeds = prompt_seeds(a.seed, round_index, rows * acc.num_processes)
            seeds = seeds[acc.process_index * rows : (acc.process_index + 1) * rows]
            with acc.autocast():  # transformers generation runs in the training precision (bf16 if set)
                comps = self.backend.generate(prompt_ids, self.sampling(1), seeds)
            lps = [c[0] for c in comps.logprobs] if comps.logprobs is not None else None
            return Generated(prompt_ids, [c[0] for c in comps.token_ids], lps, [s[0] for s in comps.stopped],
                             comps.weight_version)
        everyone = gather_object(prompt_ids)
        payload = [None] * 6
        if acc.is_main_process:
            groups = [everyone[i : i + num_generations] for i in range(0, len(everyone), num_generations)]
            if any(any(row != group[0] for row in group) for group in groups):
                raise RuntimeError("a generation batch is not made of whole groups of identical prompts; this is "
                                   "a sampler bug: please report it with your GRPOConfig")
            unique, behind, seconds = [g[0] for g in groups], None, None
            try:
                if a.async_generation and not evaluating:
                    comps, behind, seconds = self._take_single_turn_round(unique, round_index)
                else:
                    comps = self.backend.generate(unique, self.sampling(num_generations),
                                                  prompt_seeds(a.seed, round_index, len(groups)))
                payload = [[c for group in comps.token_ids for c in group],
                           [lp for group in comps.logprobs for lp in group],
                           [s for group in comps.stopped for s in group], comps.weight_version, behind, seconds]
            except ServerRestarted as exc:  # every process pushes again (a collective), then this generates again
                if restarts >= 2 or (a.async_generation and not evaluating):
                    raise
                payload = [SERVER_RESTARTED, str(exc), None, None, None, None]
        broadcast_object_list(payload, from_process=0)
        if payload[0] == SERVER_RESTARTED:
            logger.warning("%s; pushing this run's weights to it again, then generating round %d again", payload[1],
                           round_index)
            self.push_again()
            return self._single_turn_round(prompt_ids, num_generations, round_index, evaluating, restarts + 1)
        start = acc.process_index * len(prompt_ids)
        rows = slice(start, start + len(prompt_ids))
        ids, lps, stopped, version, behind, seconds = payload
        return Generated(prompt_ids, ids[rows], lps[rows], stopped[rows], version, behind, ahead_seconds=seconds)

    def _take_single_turn_round(self, prompt_ids: list[list[int]], round_index: int):
        a = self.args
        sampling, every = self.sampling(a.num_generations), a.steps_per_generation * a.num_iterations

        def start_producer() -> RoundProducer:
            # Its own HTTP client and tokenizer: a Rust tokenizer used from two threads at once can fail.
            sampler, backend, tokenizer = self.train_sampler(), self.new_server_backend(), copy.deepcopy(self.tokenizer)
            self.producer_backend = backend
            return RoundProducer(
                inputs_of=lambda r: self.prompt_ids([self.train_dataset[i]["prompt"]
                                                     for i in sampler.batch_prompts(r)], tokenizer),
                generate=lambda ids, r: backend.generate(ids, sampling, prompt_seeds(a.seed, r, len(ids))),
                trained_at=lambda r: first_step(r, every, a.gradient_accumulation_steps),
                start=round_index, max_staleness=a.vllm_max_weight_staleness, recoverable=generation_may_pass)

        return self._take_ahead(
            round_index, start_producer, same_inputs=lambda got: got == prompt_ids,
            versions_of=lambda comps: comps and [v[0] for group in comps.weight_versions for v in group],
            rows=len(prompt_ids) * a.num_generations,
            run_now=lambda: self.backend.generate(prompt_ids, sampling, prompt_seeds(a.seed, round_index,
                                                                                     len(prompt_ids))))

    def _take_ahead(self, round_index: int, start_producer, same_inputs, versions_of, rows: int, run_now):
        """async_generation, single- or multi-turn: round `round_index` from the producer (started here at the
        first round), each completion's staleness, and the seconds it took. A round async_rounds.why_not_train
        rejects (its inputs are not the trainer's, a completion is beyond vllm_max_weight_staleness, or its
        generation failed until a push landed) is generated again now, and counted."""
        if self.producer is None:
            self.producer = start_producer()
            self.producer.pushed(self.pushed_version())
        generated = self.producer.take(round_index)
        trained, versions = self.pushed_version(), versions_of(generated.result)
        why = why_not_train(generated, same_inputs(generated.inputs), versions, rows, trained,
                            self.args.vllm_max_weight_staleness)
        if why is None:
            return generated.result, staleness(versions, trained), generated.seconds
        logger.warning("round %d generated ahead is not trained on: %s; generating it again now", round_index, why)
        self.regenerated += 1
        result = run_now()
        return result, staleness(versions_of(result) or [trained] * rows, trained), generated.seconds

    # --- multi-turn --------------------------------------------------------------------

    def _multi_turn_round(self, prompts: list, inputs: list[dict], round_index: int, evaluating: bool) -> Generated:
        """This process's rows as episodes (tools, environments) or through the rollout_func."""
        from accelerate.utils import gather_object

        behind = seconds = None
        if self.args.async_generation and not evaluating:
            episodes, behind, seconds = self._take_multi_turn_round(prompts, inputs, round_index)
        else:
            episodes = self._run_multi_turn(self.multi_turn, inputs, round_index, self.generator())
            # Episodes (or agents) on weights the trainer did not push: every rank checks every rank's versions,
            # so all raise together (one rank alone would leave the others waiting in the next collective).
            versions = sorted(set(episodes.first_versions or []))
            if self.accelerator.num_processes > 1:
                versions = sorted({v for rank in gather_object([versions]) for v in rank})
            for version in versions:
                self.check_version(version)
        return Generated(episodes.prompt_ids, episodes.completion_ids, episodes.sampling_logps, episodes.stopped,
                         episodes.weight_version, behind, episodes, ahead_seconds=seconds)

    def _run_multi_turn(self, multi_turn: MultiTurn, inputs: list[dict], round_index: int,
                        backend: GenerationBackend) -> RoundRollout:
        """Turn k of this process's row i samples with a seed of (run seed, round, the row's place in the whole
        round, k): the same whether the round is generated now or ahead."""
        a, acc = self.args, self.accelerator
        rows = [{k: v for k, v in x.items() if k != "prompt"} for x in inputs]
        first_row = acc.process_index * len(inputs)
        generate = turn_generator(backend, self.sampling(1))
        with self._precision(backend):
            return multi_turn.run(self.trainer, [x["prompt"] for x in inputs], rows, generate,
                                  lambda i, turn: derived_seed(a.seed, round_index, first_row + i, turn))

    def _take_multi_turn_round(self, prompts: list, inputs: list[dict], round_index: int):
        """Every process runs its own rows' episodes ahead, in a thread with its own client (and tokenizer),
        within vllm_max_weight_staleness as single turns do."""
        a, acc = self.args, self.accelerator
        every, rows_per_round = a.steps_per_generation * a.num_iterations, len(inputs)

        def start_producer() -> RoundProducer:
            sampler, backend = self.train_sampler(), self.new_server_backend()
            multi_turn = self.multi_turn.with_tokenizer(copy.deepcopy(self.tokenizer))
            self.producer_backend = backend

            def rows_of(r: int) -> list[dict]:  # this process's share of round r, as the trainer deals it
                indices = [i for i in sampler.batch_prompts(r) for _ in range(a.num_generations)]
                start = acc.process_index * rows_per_round
                return [self.train_dataset[i] for i in indices[start : start + rows_per_round]]

            return RoundProducer(
                inputs_of=rows_of, generate=lambda rows, r: self._run_multi_turn(multi_turn, rows, r, backend),
                trained_at=lambda r: first_step(r, every, a.gradient_accumulation_steps),
                start=round_index, max_staleness=a.vllm_max_weight_staleness, recoverable=generation_may_pass)

        return self._take_ahead(
            round_index, start_producer, same_inputs=lambda got: [x["prompt"] for x in got or []] == prompts,
            versions_of=lambda rollout: rollout and rollout.first_versions, rows=len(prompts),
            run_now=lambda: self._run_multi_turn(self.multi_turn, inputs, round_index, self.generator()))

    # --- for a rollout_func, and the end of the run ----------------------------------------

    def _precision(self, backend: GenerationBackend | None):
        """transformers' generate runs in the training precision (bf16 if set); vLLM in its own dtype."""
        return self.accelerator.autocast() if isinstance(backend, TransformersBackend) else contextlib.nullcontext()

    def generator(self) -> GenerationBackend:
        """This process's generator; in server mode a process other than the main one gets a client of its own."""
        if self.backend is not None:
            return self.backend
        if self.turn_backend is None:
            self.turn_backend = self.new_server_backend()
        return self.turn_backend

    def generate_completions(self, prompt_ids: list[list[int]], max_tokens: int | list[int] | None = None) -> list[dict]:
        """One completion of each prompt (token ids) with the run's sampling settings, as {"completion_ids",
        "logprobs" (the generator's; None without vLLM), "stopped"} per prompt."""
        a, acc = self.args, self.accelerator
        caps = [max_tokens] * len(prompt_ids) if isinstance(max_tokens, int) else max_tokens
        self.completion_calls += 1
        seeds = [derived_seed(a.seed, COMPLETION_SEEDS, self.completion_calls, acc.process_index, i)
                 for i in range(len(prompt_ids))]
        with self._precision(self.backend):
            turns = turn_generator(self.generator(), self.sampling(1))(
                prompt_ids, caps or [a.max_completion_length] * len(prompt_ids), seeds)
        return [{"completion_ids": t.token_ids, "logprobs": t.logprobs, "stopped": t.stopped} for t in turns]

    def pushed(self, version: int) -> None:
        if self.producer is not None:
            self.producer.pushed(version)

    def stop_producer(self) -> None:
        if self.producer is not None:
            self.producer.close()
            self.producer_backend.close()
            self.producer = self.producer_backend = None

    def close(self) -> None:
        self.stop_producer()
        for backend in (self.backend, self.turn_backend):
            if backend is not None:
                backend.close()
        self.backend = self.turn_backend = None
