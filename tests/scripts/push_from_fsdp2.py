"""Launched by tests/test_weight_sync.py with torchrun, 2 processes on CPU (gloo).

The tiny model is sharded with FSDP2 (`fully_shard`); rank 0 pushes it to the server with
`VLLMClient.update_weights(ModelWeights(model))` while rank 1 takes part in each gather. Checks on
every rank: names and full shapes are known without gathering; no gathered tensor is still held once
the next is pulled (so no rank ever holds the whole model). Rank 0 saves the gathered weights it pushed
(after the push, for the test to compare with the server) and the new version.
"""

import gc
import json
import sys
import weakref

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from fastgrpo.transfer import ModelWeights, Weights


class Watched(Weights):
    """The stream, checking that nobody downstream (the sender) still holds a gathered tensor once the
    next one is pulled. (Its storage is FSDP's business: functional collectives may keep buffers.)"""

    def __init__(self, inner: ModelWeights):
        self.inner, self.pulled = inner, 0
        self.names, self.shapes, self.dtypes, self.device = inner.names, inner.shapes, inner.dtypes, inner.device

    def __iter__(self):
        previous = None
        for tensor in self.inner:
            if previous is not None and previous() is not None:
                gc.collect()  # reference cycles that nobody can reach do not count
            assert previous is None or previous() is None, f"gathered tensor {self.pulled - 1} outlived its turn"
            previous = weakref.ref(tensor)
            self.pulled += 1
            yield tensor
            del tensor


def main() -> None:
    model_path, base_url, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(12)  # the same perturbation on both ranks
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(hasattr(p, "full_tensor") for p in model.parameters()), "not sharded"
    local = sum(p.to_local().numel() for p in model.parameters())
    assert local < sum(p.numel() for p in model.parameters()), "each rank should hold a part"

    weights = Watched(ModelWeights(model))
    assert dict(zip(weights.names, weights.shapes)) == full_shapes  # known before any gather
    version = None
    if rank == 0:
        from fastgrpo.client import VLLMClient

        with VLLMClient(base_url=base_url, bucket_bytes=48 << 10, weight_transfer_timeout=60) as client:
            version = client.update_weights(weights)
    else:
        for tensor in weights:  # every gather is a collective: this rank takes part, keeps nothing
            del tensor
    assert weights.pulled == len(full_shapes)
    gathered = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(gathered, f"{out}/fsdp2_weights.pt")
        with open(f"{out}/fsdp2.json", "w") as f:
            json.dump({"version": version, "local_numel": local}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
