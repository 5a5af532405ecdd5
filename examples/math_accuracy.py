"""GRPO on arithmetic with TRL's accuracy reward, generation on a `fastgrpo vllm-serve` server.

    fastgrpo vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct          # terminal 1 (generation devices)
    python examples/math_accuracy.py                                 # terminal 2 (or: accelerate launch ...)

Every GRPOConfig field is a flag of its own name (`--max_steps 10`, `--vllm_server_base_url http://host:8000`,
`--help` lists them). Any dataset with a `prompt` column (text or chat messages) and a `solution` column
works; here it is fastgrpo's generated arithmetic task ("What is 6 + 9? Answer with just the number.",
solution "15").
"""

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import HfArgumentParser

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.rewards import accuracy_reward  # TRL: from trl.rewards import accuracy_reward
from fastgrpo.tasks import load_task


@dataclass
class ScriptArguments:
    model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    difficulty: Literal["easy", "medium", "hard"] = "medium"
    num_examples: int = 4096


parser = HfArgumentParser((ScriptArguments, GRPOConfig))
parser.set_defaults(
    output_dir="outputs/math_accuracy", use_vllm=True, vllm_mode="server",
    max_steps=200, per_device_train_batch_size=8, gradient_accumulation_steps=4, num_generations=8,
    max_completion_length=256, learning_rate=1e-6, logging_steps=1, save_strategy="no", report_to="none",
    use_cpu=not torch.cuda.is_available(),  # accelerate runs several CPU processes as one job only with use_cpu
)
script_args, training_args = parser.parse_args_into_dataclasses()

dataset = load_task("arithmetic", script_args.num_examples, difficulty=script_args.difficulty)  # prompt, solution
trainer = GRPOTrainer(model=script_args.model_name_or_path, reward_funcs=[accuracy_reward], args=training_args,
                      train_dataset=dataset)
trainer.train()
trainer.save_model(training_args.output_dir)
trainer.close()
