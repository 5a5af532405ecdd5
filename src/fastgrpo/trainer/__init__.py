"""The GRPO trainer: configuration, generation backends, rewards, and the loss math (loss.py)."""
