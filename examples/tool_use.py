"""GRPO with a tool: the model may call `add` while it answers, TRL 1.16's `tools=[...]`.

    fastgrpo vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct     # terminal 1
    python examples/tool_use.py                                # terminal 2

The trainer runs each episode itself: it generates a turn on the server, parses the tool calls in it
(the tokenizer's format; Hermes' <tool_call> JSON for Qwen), runs the Python function, appends the result
and generates again. Only the model's own tokens are trained on; the tool results are masked out.
"""

from dataclasses import dataclass

import torch
from transformers import HfArgumentParser

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.rewards import accuracy_reward
from fastgrpo.tasks import load_task


@dataclass
class ScriptArguments:
    model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    num_examples: int = 4096


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first integer
        b: the second integer
    """
    return a + b


def final_answer_accuracy(completions, solution, **kwargs):
    """accuracy_reward on the model's last message: the tool results before it are not its answer."""
    last = [[m for m in messages if m["role"] == "assistant"][-1:] for messages in completions]
    return accuracy_reward(last, solution)


parser = HfArgumentParser((ScriptArguments, GRPOConfig))
parser.set_defaults(
    output_dir="outputs/tool_use", use_vllm=True, vllm_mode="server", max_steps=200,
    per_device_train_batch_size=8, gradient_accumulation_steps=4, num_generations=8, learning_rate=1e-6,
    max_completion_length=512, max_tool_calling_iterations=3,  # the length: all turns and tool results together
    use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to="none",
)
script_args, training_args = parser.parse_args_into_dataclasses()

dataset = load_task("arithmetic", script_args.num_examples, difficulty="hard",
                    system_prompt="You can call the add tool. Reply with just the number.")
trainer = GRPOTrainer(model=script_args.model_name_or_path, reward_funcs=[final_answer_accuracy],
                      args=training_args, train_dataset=dataset, tools=[add])
trainer.train()
trainer.save_model(training_args.output_dir)
trainer.close()
