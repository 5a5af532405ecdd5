"""GRPO with LoRA adapters (TRL's `peft_config`): only the adapters train, and only they are pushed.

    fastgrpo vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct --enable_lora   # terminal 1
    python examples/lora.py                                                # terminal 2

The server serves the base model and, beside it, this run's adapter (named after output_dir); after
every optimizer step the trainer pushes the adapter's tensors alone, a few MB instead of the model.
"""

from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from transformers import HfArgumentParser

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.rewards import accuracy_reward
from fastgrpo.tasks import load_task


@dataclass
class ScriptArguments:
    model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    num_examples: int = 4096
    lora_r: int = field(default=16, metadata={"help": "at most the server's --max_lora_rank"})


parser = HfArgumentParser((ScriptArguments, GRPOConfig))
parser.set_defaults(
    output_dir="outputs/lora", use_vllm=True, vllm_mode="server", use_cpu=not torch.cuda.is_available(),
    learning_rate=2e-5,  # LoRA takes a larger rate than full training
    max_steps=200, per_device_train_batch_size=8, gradient_accumulation_steps=4, num_generations=8,
    max_completion_length=256, logging_steps=1, save_strategy="no", report_to="none",
)
script_args, training_args = parser.parse_args_into_dataclasses()

peft_config = LoraConfig(
    r=script_args.lora_r,
    lora_alpha=2 * script_args.lora_r,
    lora_dropout=0.0,
    # Attention and MLP projections: what vLLM's LoRA layers serve (others would be merged into pushes).
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
trainer = GRPOTrainer(model=script_args.model_name_or_path, reward_funcs=[accuracy_reward], args=training_args,
                      train_dataset=load_task("arithmetic", script_args.num_examples, difficulty="medium"),
                      peft_config=peft_config)
trainer.train()
trainer.save_model(training_args.output_dir)  # the adapter (adapter_model.safetensors), not the whole model
trainer.close()
