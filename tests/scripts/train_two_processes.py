"""Launched by tests/test_trainer.py with `accelerate launch --num_processes 2`: 2 steps in server mode."""

import json
import sys

from datasets import Dataset

from fastgrpo import GRPOConfig, GRPOTrainer


def reward_length(completion_ids, **kwargs):
    return [len(ids) / 16 for ids in completion_ids]


def main() -> None:
    model, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {a} + {a + 3}?"}] for a in range(16)]})
    config = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                        max_prompt_length=64, learning_rate=5e-3, max_steps=2, logging_steps=1, save_strategy="no",
                        report_to=[], use_cpu=True, use_vllm=True, vllm_server_host="127.0.0.1",
                        vllm_server_port=port, disable_tqdm=True)
    trainer = GRPOTrainer(model, reward_length, args=config, train_dataset=data)
    trainer.train()
    trainer.close()
    if trainer.accelerator.is_main_process:
        summary = {"world_size": trainer.accelerator.num_processes, "global_step": trainer.state.global_step,
                   "generation_batch_size": config.generation_batch_size,
                   "logs": [h for h in trainer.state.log_history if "reward" in h]}
        with open(f"{out}/summary.json", "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
