"""The generation server: `fastgrpo vllm-serve`."""

# Recordings of agents' rollouts a server keeps (--max_recorded_rollouts); a 4k-token episode is about 0.3 MB there.
DEFAULT_MAX_ROLLOUTS = 4096
