"""One rank of a 2-process gloo world that makes 4 groups and all-reduces over each; prints JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist

from fastgrpo import quiet_gloo

quiet_gloo.register()  # what vLLM's plugin loader does in each of its processes
rank, port = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
groups = [dist.new_group([0, 1], backend="gloo") for _ in range(4)]
value = torch.full((3,), float(rank + 1))
for group in groups:
    dist.all_reduce(value, group=group)
loops = sum(open(f"/proc/self/task/{t}/comm").read().strip() == "gloo_tcp_loop" for t in os.listdir("/proc/self/task"))
print(json.dumps({"loops": loops, "value": value.tolist()}))
dist.destroy_process_group()
