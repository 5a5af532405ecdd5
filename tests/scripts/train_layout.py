"""GRPO steps in server mode, recording what must not depend on the process layout.

Run alone (one process with the global batch) or under `accelerate launch --num_processes N` (a share
each): tests/test_multiprocess.py and bench/multiprocess_matrix.py compare the records. One argument, a
JSON object (see DEFAULTS): the model, the server's port, the output folder, rows per process, and the
options under test ("rollouts": "environment" for multi-turn episodes, "lora", "async", "eval",
"resume_from", "loss_type", "top_entropy_quantile", ...).

Records, in the output folder: each rank's advantages per round (advantages_<rank>.pt), the gradient of
every parameter before each optimizer step, gathered whole where it is sharded (gradients.pt, main
process), and the logs (summary.json). A rank that waits too long dumps every thread's stack to
stacks_<rank>.txt and exits (faulthandler), so a hang is reported with where each rank was waiting.
"""

import faulthandler
import json
import os
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.rollouts import Environment, StepResult

DEFAULTS = dict(per_device=4, num_generations=4, max_completion_length=16, stops=40, temperature=1.0, steps=2,
                seed=3, ga=1, steps_per_generation=None, rollouts="single_turn", lora=False, async_=False,
                eval=False, resume_from=None, save_steps=None, loss_type="dapo", top_entropy_quantile=1.0,
                ddp_timeout=600, hang_after=900, mismatch_at=None, beta=0.0, use_vllm=True, eval_per_device=4,
                use_cpu=True, kill_in_push=None)


def fsdp_on_cpu() -> None:
    """accelerate turns FSDP on only for GPU process groups; on a CPU (gloo) it silently trains with DDP instead.
    FSDP2 itself shards on CPUs, so under `accelerate launch --use_fsdp --fsdp_version 2` this flips that one gate:
    the state then says FSDP and holds the launch's FSDP2 plugin, and everything after it (accelerate's
    fsdp2_prepare_model, the trainer) is the real thing. The only stand-in of these tests."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs

    AcceleratorState.__init__ = init


class AskTwice(Environment):
    """Two turns: the model's answer, "Say more.", its second answer."""

    def reset(self, **row):
        self.turns = 0

    def step(self, turn):
        self.turns += 1
        return StepResult("Say more.", reward=float(len(turn) % 3), done=self.turns == 2)


def reward_length(completion_ids, **kwargs):
    return [len(ids) / 16 for ids in completion_ids]


def reward_digits(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c[-1]["content"]) for c in completions]


class Gradients(TrainerCallback):
    """The gradient of every parameter before each optimizer step (after DDP's all-reduce; FSDP2's sharded
    gradients gathered whole, which every rank takes part in)."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is None:
                continue
            grad = param.grad.detach()
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
        self.steps.append(grads)


class Probe(TrainerCallback):
    """After each push: the largest gap between the trainer's logprobs of a fixed text and the server's, and
    the trainer's own (every rank runs the forward: under FSDP2 it gathers the shards)."""

    def __init__(self, trainer, base_url):
        from fastgrpo.client import VLLMClient

        self.trainer, self.gaps, self.mine = trainer, [], []
        self.ids = trainer.tokenizer("What is 12 + 35? The answer is 47.")["input_ids"]
        self.client = VLLMClient(base_url=base_url) if trainer.accelerator.is_main_process else None

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            logits = self.trainer.model(input_ids=torch.tensor([self.ids])).logits[0].float()
        ours = torch.log_softmax(logits, -1)[torch.arange(len(self.ids) - 1), self.ids[1:]]
        if self.client is not None:
            served = self.client.generate(prompt_token_ids=[self.ids], max_tokens=1, prompt_logprobs=True,
                                          adapter=self.trainer.policy_adapter)
            theirs = torch.tensor(served.results[0].prompt_logprobs[1:])
            self.gaps.append((ours - theirs).abs().max().item())
            self.mine.append(ours.tolist())


class Mismatch(TrainerCallback):
    """For the test of a mismatched collective: at step `at`, rank 1 alone issues one more all-reduce."""

    def __init__(self, trainer, at):
        self.trainer, self.at = trainer, at

    def on_step_begin(self, args, state, control, **kwargs):
        acc = self.trainer.accelerator
        if state.global_step == self.at and acc.process_index == 1:
            torch.distributed.all_reduce(torch.ones(1))


def killed_in_push(trainer, version: int) -> None:
    """For the fault test: rank 1 dies (SIGKILL) while rank 0 pushes weights version `version` to the server."""
    import signal
    import threading

    push = trainer.sync_weights

    def sync_weights():
        if trainer.state.global_step == version:
            if trainer.accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            started = trainer.backend.sync_weights

            def slow_push(weights, v):  # rank 0: still pushing when rank 1 dies
                threading.Event().wait(1.0)
                return started(weights, v)

            trainer.backend.sync_weights = slow_push
        return push()

    trainer.sync_weights = sync_weights


def reference_is_sharded(trainer) -> bool | None:
    """Whether this rank holds only a share of each reference parameter (None: no reference model)."""
    if trainer.ref_model is None:
        return None
    return all(hasattr(p, "full_tensor") and p.to_local().numel() < p.numel() for p in trainer.ref_model.parameters())


def main() -> None:
    spec = {**DEFAULTS, **json.loads(sys.argv[1])}
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_on_cpu()
    out = spec["out"]
    # A hang ends with every thread's stack, in a file of this rank's own (ranks share the launcher's stderr).
    stacks = open(f"{out}/stacks_{os.environ.get('RANK', '0')}.txt", "w")
    faulthandler.dump_traceback_later(spec["hang_after"], exit=True, file=stacks)
    episodes = spec["rollouts"] == "environment"
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {a} + {a + 3}?"}] for a in range(64)]})
    # Stop ids: about stops/384 of the tiny vocabulary, so completions end anywhere from 1 token to the limit.
    stops = list(range(100, 100 + spec["stops"]))
    settings = dict(output_dir=out, per_device_train_batch_size=spec["per_device"],
                    num_generations=spec["num_generations"], max_completion_length=spec["max_completion_length"],
                    max_prompt_length=64, learning_rate=0.1, optim="sgd", max_steps=spec["steps"], logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=spec["use_cpu"], bf16=False, use_vllm=spec["use_vllm"],
                    vllm_server_host="127.0.0.1", vllm_server_port=spec["port"], disable_tqdm=True, max_grad_norm=0.0,
                    seed=spec["seed"], temperature=spec["temperature"], gradient_accumulation_steps=spec["ga"],
                    steps_per_generation=spec["steps_per_generation"], loss_type=spec["loss_type"],
                    top_entropy_quantile=spec["top_entropy_quantile"], ddp_timeout=spec["ddp_timeout"],
                    generation_kwargs={"stop_token_ids": stops}, beta=spec["beta"])
    if spec["save_steps"]:
        settings.update(save_strategy="steps", save_steps=spec["save_steps"])
    if episodes:  # room for two turns and the reply between them
        settings.update(max_completion_length=max(96, spec["max_completion_length"]))
    if spec["async_"]:
        settings.update(async_generation=True, vllm_max_weight_staleness=1)
    if spec["eval"]:
        settings.update(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=spec["eval_per_device"],
                        num_generations_eval=2)
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config = GRPOConfig(**settings)
    trainer = GRPOTrainer(spec["model"], [reward_length, reward_digits], args=config, train_dataset=data,
                          eval_dataset=data.select(range(8)) if spec["eval"] else None,
                          environment_factory=AskTwice if episodes else None, peft_config=peft_config)
    advantages, lengths, split_round = [], [], trainer._split_round

    def recording(batch, round_index):  # the round's advantages, in this process's row order
        advantages.append(batch["advantages"].clone())
        lengths.append(batch["completion_attention"].sum(1).tolist())
        return split_round(batch, round_index)

    trainer._split_round = recording
    gradients = Gradients(trainer)
    trainer.add_callback(gradients)
    probe = Probe(trainer, f"http://127.0.0.1:{spec['port']}") if spec["use_vllm"] else None
    if probe is not None:
        trainer.add_callback(probe)  # after the weight-sync callback: sees the pushed weights
    if spec["mismatch_at"] is not None:
        trainer.add_callback(Mismatch(trainer, spec["mismatch_at"]))
    if spec["kill_in_push"] is not None:
        killed_in_push(trainer, spec["kill_in_push"])
    trainer.train(resume_from_checkpoint=spec["resume_from"])
    rank = trainer.accelerator.process_index
    torch.save(advantages, f"{out}/advantages_{rank}.pt")
    if trainer.accelerator.is_main_process:
        torch.save(gradients.steps, f"{out}/gradients.pt")
        summary = {"world_size": trainer.accelerator.num_processes,
                   "distributed_type": str(trainer.accelerator.distributed_type),
                   "ref_sharded": reference_is_sharded(trainer), "global_step": trainer.state.global_step,
                   "generation_batch_size": config.generation_batch_size, "lengths": lengths,
                   "probe_gaps": probe and probe.gaps, "probe_logprobs": probe and probe.mine,
                   "logs": [h for h in trainer.state.log_history if {"loss", "reward", "eval_reward"} & h.keys()]}
        with open(f"{out}/summary.json", "w") as f:
            json.dump(summary, f)
    trainer.close()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
