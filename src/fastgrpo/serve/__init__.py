"""The generation server: `fastgrpo vllm-serve`."""
