"""Sharded training (FSDP2, DeepSpeed ZeRO-3): what the trainer does differently where no rank holds the model.

- The reference model (beta > 0) is sharded like the policy: a full copy on every device would
  undo what sharding the policy saved (and a float32 7B model is 28 GB).
- FSDP1 is refused: its flattened parameters would need their own gather for every push; FSDP2
  (`fsdp_version: 2`) shards each parameter as a DTensor, which pushes gather one at a time.
- Adapter tensors are gathered on every rank (a collective) before the main process sends them.
- Generation on the training model (use_vllm=False) keeps every rank stepping until all are done
  (`synced_gpus`): each forward gathers shards, so a rank that stopped early would leave the others
  waiting in a gather.
"""

import contextlib
import copy
import os

import torch


def sharded(accelerator) -> bool:
    """Whether the policy's parameters are split across ranks (FSDP2, or DeepSpeed ZeRO-3)."""
    return accelerator.is_fsdp2 or zero3(accelerator)


def zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def check_layout(accelerator, merged_lora: bool, local_multi_turn: bool) -> None:
    """Refuse, at construction, the sharded layouts whose pushes would be wrong or whose ranks would issue
    different collectives."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # accelerate sets up a CPU process alone unless use_cpu is set: each would train its own copy of the run
        # and push to the same server, which refuses the second pusher with a message that hides the cause.
        raise ValueError(f"this process was launched as one of {launched} (WORLD_SIZE={launched}), but accelerate "
                         "set it up as a run of its own: the processes would not train together. On a machine "
                         "without GPUs set GRPOConfig(use_cpu=True), so that accelerate joins them over gloo; on "
                         "GPUs, check that every process sees one")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" \
            and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate enables FSDP only on GPUs: on CPUs it trains with DDP instead, and transformers has already
        # loaded every model but the main process's as empty tensors (FSDP's cpu_ram_efficient_loading), which
        # DDP repairs for the policy but nothing repairs for a reference model.
        raise ValueError(f"accelerate was launched with FSDP, but it runs {accelerator.distributed_type.value} (it "
                         "enables FSDP only on GPUs): launch without --use_fsdp (DDP) on this machine")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("FSDP1 is not supported: its flattened parameters do not stream to the generator one at a "
                         "time. Use FSDP2: `fsdp_version: 2` in the accelerate config (or `accelerate launch "
                         "--fsdp_version 2`), which shards each parameter and is what fastgrpo gathers for pushes")
    if merged_lora and sharded(accelerator):
        raise ValueError("this LoRA adapter cannot be served by vLLM's LoRA layers, so every push would merge it into "
                         "the base, which is sharded here (FSDP2 / ZeRO-3). Target attention and MLP projections "
                         "without DoRA or modules_to_save (adapter-only pushes work sharded), or train without "
                         "sharding")
    if local_multi_turn and sharded(accelerator):
        raise ValueError("tools, environments and rollout functions with use_vllm=False are not supported under FSDP2 "
                         "/ ZeRO-3: each rank's episodes take their own number of turns, so the ranks would run "
                         "different numbers of sharded generations (each a collective). Generate with vLLM "
                         "(use_vllm=True), or train without sharding")


def prepare_reference(model: torch.nn.Module, accelerator, per_device_batch_size: int) -> torch.nn.Module:
    """The reference model placed as the policy is: sharded under FSDP2 and ZeRO-3, whole elsewhere."""
    if accelerator.is_fsdp2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model)  # the policy's own wrap policy, offload and precision
    if zero3(accelerator):
        import deepspeed

        # The policy's ZeRO-3 settings for an engine with no optimizer; "auto" values are the trainer's to fill,
        # so the ones an inference engine reads are set here.
        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler", "train_batch_size", "gradient_accumulation_steps"):
            config.pop(key, None)
        config["train_micro_batch_size_per_gpu"] = per_device_batch_size
        zero = config.setdefault("zero_optimization", {})
        for key, value in list(zero.items()):
            if value == "auto":
                zero.pop(key)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine  # its forward fetches each layer's shards
    return accelerator.prepare_model(model, evaluation_mode=True)


def reshard(model: torch.nn.Module) -> None:
    """Free what FSDP2 keeps gathered after a forward (accelerate keeps the embeddings, final norm and LM head
    of a model, and its root, whole between forward and backward): a frozen model has no backward to keep
    them for. Local: no collective."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensors(tensors: dict) -> dict:
    """Whole copies of (possibly sharded) tensors; every rank must call it, in the same order (it gathers)."""
    out = {}
    for name, tensor in tensors.items():
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor
            tensor = tensor.full_tensor()
        out[name] = tensor.detach()
    return out


@contextlib.contextmanager
def zero3_gathered(accelerator, params: list):
    """ZeRO-3: these parameters gathered whole while the block runs (every rank takes part); elsewhere nothing."""
    if not zero3(accelerator):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def gathered_adapter(model, accelerator):
    """The adapter's parameters (small) gathered whole under ZeRO-3."""
    return zero3_gathered(accelerator, [p for n, p in model.named_parameters() if "lora_" in n])


def generation_weights(model, accelerator, gather: bool):
    """use_vllm=False under ZeRO-3: the whole policy gathered for generation (`ds3_gather_for_generation`), or
    left sharded (each forward gathers a layer at a time). FSDP2 always generates on its shards."""
    return zero3_gathered(accelerator, list(model.parameters()) if gather else [])
