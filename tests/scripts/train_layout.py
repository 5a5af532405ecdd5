"""Two GRPO steps in server mode, recording what must not depend on the process layout.

Run alone (one process with the global batch) or under `accelerate launch --num_processes 2`
(half each): tests/test_trainer.py compares the records. Arguments: model, server port,
output folder, per-device batch size, and optionally "environment": multi-turn episodes
(each process runs its own rows' episodes, with a server client of its own).
"""

import json
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.rollouts import Environment, StepResult

STOPS = list(range(100, 140))  # about a tenth of the tiny vocabulary: turns stop early


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
    """The gradient of every parameter before each optimizer step (after DDP's all-reduce)."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def main() -> None:
    model, port, out, per_device = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    episodes = len(sys.argv) > 5 and sys.argv[5] == "environment"
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {a} + {a + 3}?"}] for a in range(16)]})
    settings = dict(output_dir=out, per_device_train_batch_size=per_device, num_generations=4,
                    max_completion_length=16, max_prompt_length=64, learning_rate=5e-3, max_steps=2,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, use_vllm=True,
                    vllm_server_host="127.0.0.1", vllm_server_port=port, disable_tqdm=True, max_grad_norm=0.0,
                    seed=3)
    if episodes:  # room for two turns and the reply between them
        settings.update(max_completion_length=96, generation_kwargs={"stop_token_ids": STOPS})
    config = GRPOConfig(**settings)
    trainer = GRPOTrainer(model, [reward_length, reward_digits], args=config, train_dataset=data,
                          environment_factory=AskTwice if episodes else None)
    advantages, split_round = [], trainer._split_round

    def recording(batch, round_index):  # the round's advantages, in this process's row order
        advantages.append(batch["advantages"].clone())
        return split_round(batch, round_index)

    trainer._split_round = recording
    gradients = Gradients(trainer)
    trainer.add_callback(gradients)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(advantages, f"{out}/advantages_{rank}.pt")
    if trainer.accelerator.is_main_process:
        torch.save(gradients.steps, f"{out}/gradients.pt")
        summary = {"world_size": trainer.accelerator.num_processes, "global_step": trainer.state.global_step,
                   "generation_batch_size": config.generation_batch_size,
                   "logs": [h for h in trainer.state.log_history if "reward" in h]}
        with open(f"{out}/summary.json", "w") as f:
            json.dump(summary, f)
    trainer.close()


if __name__ == "__main__":
    main()
