"""fastgrpo: GRPO training with generation on a vLLM server."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import fastgrpo` stays cheap (the CLI imports it for --version).
    if name == "VLLMClient":
        from fastgrpo.client import VLLMClient

        return VLLMClient
    if name == "GRPOConfig":
        from fastgrpo.config import GRPOConfig

        return GRPOConfig
    if name == "GRPOTrainer":
        from fastgrpo.trainer.grpo_trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'fastgrpo' has no attribute {name!r}")
