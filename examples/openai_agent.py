"""GRPO on an agent written against the OpenAI API: the server records its calls, the trainer trains on them.

    fastgrpo vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct --tool_call_parser hermes
    python examples/openai_agent.py

`agent(prompt, base_url)` is ordinary `openai` client code (any agent framework works the same way). For
each row the trainer opens a rollout on the server and hands the agent its base URL
(`{server}/rollouts/{id}/v1`); the server samples every call from the policy being trained, with the run's
sampling settings, and records the exact tokens. The recording becomes the row's completion (the model's
tokens trained on, tool results masked out), and the agent's return value reaches the reward functions as
`agent_output`.
"""

import json
from dataclasses import dataclass

import openai
import torch
from transformers import HfArgumentParser

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.rewards import accuracy_reward
from fastgrpo.rollouts.agent import agent_rollout_func
from fastgrpo.tasks import load_task


@dataclass
class ScriptArguments:
    model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    num_examples: int = 4096
    max_turns: int = 3


parser = HfArgumentParser((ScriptArguments, GRPOConfig))
parser.set_defaults(
    output_dir="outputs/openai_agent", use_vllm=True,
    vllm_mode="server",  # the recordings live in the server
    max_completion_length=512,  # all of an episode's calls together
    max_steps=200, per_device_train_batch_size=8, gradient_accumulation_steps=4, num_generations=8,
    learning_rate=1e-6, use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to="none",
)
script_args, training_args = parser.parse_args_into_dataclasses()

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]


def run_tool(call) -> str:
    try:
        arguments = json.loads(call.function.arguments)
        return str(int(arguments["a"]) + int(arguments["b"])) if call.function.name == "add" else "unknown tool"
    except Exception as exc:  # the model's arguments are the model's business: tell it what went wrong
        return f"error: {exc}"


def agent(prompt, base_url):
    """Ask, run the tool calls the model makes, ask again; return the final answer."""
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = list(prompt)
    for _ in range(script_args.max_turns):
        reply = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS,
                                               max_tokens=training_args.max_completion_length)
        message = reply.choices[0].message
        messages.append(message)
        if not message.tool_calls:
            return message.content
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": run_tool(call)})
    return None  # out of turns without an answer


def answer_accuracy(agent_output, solution, **kwargs):
    return accuracy_reward([answer or "" for answer in agent_output], solution)


dataset = load_task("arithmetic", script_args.num_examples, difficulty="hard",
                    system_prompt="You can call the add tool. Reply with just the number.")
trainer = GRPOTrainer(model=script_args.model_name_or_path, reward_funcs=[answer_accuracy], args=training_args,
                      train_dataset=dataset, rollout_func=agent_rollout_func(agent))
trainer.train()
trainer.save_model(training_args.output_dir)
trainer.close()
