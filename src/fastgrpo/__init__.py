"""fastgrpo: GRPO training with generation on a vLLM server."""

__version__ = "0.1.0"
