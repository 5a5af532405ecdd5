"""Choosing the generation server's tensor-parallel (TP) and data-parallel (DP) layout.

A performance model, pure Python, no GPU needed. For every layout with
TP x DP = the server's GPU count it answers two questions:

1. Does the model fit? Per device: the model's weights / TP, plus a reserve
   for what vLLM needs besides weights and KV cache (CUDA context, CUDA graphs,
   communication buffers, the activation peak of a prefill chunk), must leave
   room for a KV cache of at least one full sequence inside
   gpu_memory_utilization x device memory.

2. How long does one generation round take? Each replica (TP devices) gets
   its share of the prompts; it prefills them (compute-bound), then decodes one
   token per step for all its running sequences. A decode step costs the larger
   of reading the weights and the KV cache from memory and doing the math, plus
   TP's two all-reduces per layer over the interconnect, plus the engine's
   host-side work per step (scheduling, sampling bookkeeping, detokenizing),
   which runs once per replica and is not split by TP. Sequences that do not
   fit in the KV cache (or beyond vLLM's max_num_seqs) at once run in waves.

The round time is that of the busiest replica. On several nodes (`Cluster`)
a TP group stays within a node unless the model fits in no node; one that
spans nodes does its all-reduces over the network between them. Every
constant below says where it comes from; see docs/tp-dp.md for the whole
derivation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from fastgrpo.planner.tables import GPU_ALIASES, KNOWN_GPUS, KNOWN_MODELS, MODEL_ALIASES

GIB = 1024**3

# ---------------------------------------------------------------------------
# Constants of the performance model (each with its source; see docs/tp-dp.md)
# ---------------------------------------------------------------------------

# Fraction of peak HBM bandwidth that decode kernels reach. Memory-copy and
# GEMV benchmarks on A100/H100 reach 80-90% of the datasheet figure; vLLM's
# decode step (many small kernels) sits at the low end.
BANDWIDTH_EFFICIENCY = 0.8
# Fraction of dense bf16 peak that large GEMMs reach end to end (cuBLAS reaches
# 70-80% on big shapes; prefill with attention and norms lands near 60%).
COMPUTE_EFFICIENCY = 0.6
# Memory per device that vLLM uses besides weights and KV cache, not counting
# the activation peak computed below: CUDA context (~0.5 GiB), captured CUDA
# graphs (~0.5-1 GiB by vLLM's own log line), NCCL / custom all-reduce buffers
# (~0.5 GiB when TP > 1).
FIXED_RESERVE_GIB = 1.5
# vLLM's default gpu_memory_utilization is 0.92 (0.32); fastgrpo vllm-serve's, like TRL's, is 0.9.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# KV cache block size in tokens (vLLM's default); sequences hold whole blocks.
KV_BLOCK_TOKENS = 16
# Host-side cost of one engine step (scheduler, input preparation, sampler
# bookkeeping, output processing), seconds: a fixed part and a part per running
# sequence. vLLM's engine core is one process per replica, so DP divides this
# work and TP does not. Order of magnitude: vLLM's engine spends milliseconds
# of CPU per step at a few hundred sequences (the reason for V1's rewrite and
# its async scheduling); the per-sequence figure is calibrated so that the
# published 8 x H100 results come out (docs/tp-dp.md).
HOST_STEP_SECONDS = 1.0e-3
HOST_SECONDS_PER_SEQUENCE = 40e-6
# Extra cost per step of a TP group: handing the step's inputs to every TP
# worker and gathering the sampled tokens back (vLLM's shared-memory message
# queue and the logits gather), plus waiting for the slowest worker.
# Calibrated with the constant above.
TP_STEP_SECONDS = 1.0e-3
# Two layouts whose predicted round times differ by less than this are a tie;
# the tie goes to the smaller TP (fewer collectives that can hang, and each
# replica is independent).
TIE_TOLERANCE = 0.05
# A replica running fewer sequences than this at once leaves its GPUs mostly
# idle (decode is bound by reading the weights): DP does not pay off.
MIN_EFFICIENT_SEQUENCES_PER_REPLICA = 32
# The network between nodes (--nodes > 1), per direction: one 400 Gb/s
# InfiniBand NDR or RoCE port per node (NVIDIA ConnectX-7, the NIC of the
# H100 generation) = 50 GB/s. Nodes with one such port per GPU (DGX/HGX H100:
# 8) give NCCL up to 8 times this: pass the bus bandwidth that nccl-tests'
# all_reduce_perf reports across two nodes (--internode_gbs).
DEFAULT_INTERNODE_GBS = 50.0
# Effective fixed cost of one small all-reduce between two devices on
# different nodes, the counterpart of a GPU row's allreduce_latency_us. NCCL's
# own tuning model (src/graph/tuning.cc, hwLat: a network hop 2.7-5 us against
# 0.5-0.6 us over NVLink, LL protocol) makes a two-rank all-reduce across two
# nodes 2-2.7x the NVLink one, base latency included; scaled like the NVLink
# rows (bare ~10 us, effective 20 us) that is 40-54 us.
DEFAULT_INTERNODE_LATENCY_US = 50.0


def vllm_batch_defaults(gpu_name: str, memory_gib: float) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) that vLLM picks for this GPU.

    The per-step token budget (the prefill chunk; vLLM's profiling run sizes
    the activation peak with it) and the cap on sequences running at once.
    Source: vLLM 0.32, EngineArgs.get_batch_defaults, offline engine values
    (the CPU build's per worker).
    """
    if is_cpu(gpu_name):
        return 4096, 256
    if memory_gib >= 160:
        return 16384, 1024  # B200-class
    if memory_gib >= 70 and "a100" not in gpu_name.lower():
        return 16384, 1024  # H100 / H200
    return 8192, 256


class PlanError(ValueError):
    """A problem with the inputs, with a message that names the fix."""


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of a decoder-only transformer that matter for memory and time."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    bytes_per_param: int = 2  # bf16 / fp16 weights and KV cache

    @property
    def params_per_layer(self) -> int:
        q_size = self.heads * self.head_dim
        kv_size = self.kv_heads * self.head_dim
        attention = self.hidden * (q_size + 2 * kv_size) + q_size * self.hidden
        if self.qkv_bias:
            attention += q_size + 2 * kv_size
        if self.qk_norm:
            attention += 2 * self.head_dim
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU)
        norms = 2 * self.hidden
        return attention + mlp + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def param_count(self) -> int:
        lm_head = 0 if self.tied else self.embedding_params
        return self.layers * self.params_per_layer + self.embedding_params + lm_head + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token: all layers plus the LM head (the embedding is a lookup)."""
        return self.layers * self.params_per_layer + self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.param_count * self.bytes_per_param

    def kv_heads_per_device(self, tp: int) -> int:
        # vLLM shards KV heads over TP; with more devices than KV heads each
        # device keeps (a replica of) one.
        return max(1, self.kv_heads // tp)

    def kv_bytes_per_token(self, tp: int) -> int:
        """KV cache bytes one token occupies on one device of a TP group."""
        return 2 * self.layers * self.kv_heads_per_device(tp) * self.head_dim * self.bytes_per_param

    def tp_problem(self, tp: int) -> str | None:
        """Why vLLM refuses this TP for this model, or None."""
        if self.heads % tp:
            return f"TP={tp} does not divide the {self.heads} attention heads"
        if self.kv_heads % tp and tp % self.kv_heads:
            return f"TP={tp} and the {self.kv_heads} KV heads do not divide one another"
        if self.intermediate % tp:
            return f"TP={tp} does not divide the MLP width {self.intermediate}"
        return None


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float
    bandwidth_gbs: float  # GB/s, peak HBM
    bf16_tflops: float  # dense
    interconnect_gbs: float  # GB/s per direction, device to device
    allreduce_latency_us: float  # fixed cost of one small all-reduce between two devices
    # A fixed KV cache per device, GiB, instead of what the memory budget leaves
    # (vLLM's CPU build: VLLM_CPU_KVCACHE_SPACE). None on GPUs.
    kv_cache_gib: float | None = None


@dataclass(frozen=True)
class Workload:
    """One generation round of GRPO: prompt_batch_size prompts x num_generations completions."""

    prompt_batch_size: int
    num_generations: int
    prompt_length: int
    max_completion_length: int

    @property
    def sequences(self) -> int:
        return self.prompt_batch_size * self.num_generations

    @property
    def context_length(self) -> int:
        return self.prompt_length + self.max_completion_length

    @property
    def mean_decode_context(self) -> float:
        """Mean context of a running sequence while decoding: the prompt and half the completion."""
        return self.prompt_length + self.max_completion_length / 2


@dataclass(frozen=True)
class Cluster:
    """The server's machines: `nodes` nodes of `gpus_per_node` GPUs each, and the network between them."""

    nodes: int
    gpus_per_node: int
    internode_gbs: float = DEFAULT_INTERNODE_GBS  # per direction
    internode_latency_us: float = DEFAULT_INTERNODE_LATENCY_US

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def nodes_spanned(self, tp: int) -> int:
        """Nodes one TP group occupies (1 while it fits in a node)."""
        return math.ceil(tp / self.gpus_per_node)


def server_cluster(
    num_server_gpus: int | None,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    internode_gbs: float = DEFAULT_INTERNODE_GBS,
    internode_latency_us: float = DEFAULT_INTERNODE_LATENCY_US,
) -> Cluster:
    """The server's nodes from --num_server_gpus, --nodes and --gpus_per_node.

    On one node the server gets num_server_gpus (gpus_per_node, if given, only
    bounds it: the trainer may have the rest). On several it takes every GPU
    of each node: nodes x gpus_per_node. Raises PlanError naming the flags.
    """
    if not isinstance(nodes, int) or nodes < 1:
        raise PlanError(f"--nodes must be a positive number of machines, got {nodes!r}; use --nodes 1 for one machine")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise PlanError(f"--gpus_per_node must be at least 1, got {gpus_per_node}")
    if internode_gbs <= 0:
        raise PlanError(f"--internode_gbs must be a positive bandwidth in GB/s, got {internode_gbs:g} "
                        f"(400 Gb/s InfiniBand: --internode_gbs {DEFAULT_INTERNODE_GBS:g})")
    if internode_latency_us < 0:
        raise PlanError(f"--internode_latency_us cannot be negative, got {internode_latency_us:g}")
    link = dict(internode_gbs=internode_gbs, internode_latency_us=internode_latency_us)
    if nodes == 1:
        if num_server_gpus is None:
            if gpus_per_node is None:
                raise PlanError("pass --num_server_gpus: how many GPUs the generation server gets (TP x DP)")
            num_server_gpus = gpus_per_node
        if num_server_gpus < 1:
            raise PlanError(f"num_server_gpus must be at least 1, got {num_server_gpus}")
        if gpus_per_node is not None and num_server_gpus > gpus_per_node:
            raise PlanError(
                f"--num_server_gpus {num_server_gpus} is more than --gpus_per_node {gpus_per_node} on --nodes 1: "
                f"pass --nodes {math.ceil(num_server_gpus / gpus_per_node)} (the server then takes whole nodes), "
                f"or at most {gpus_per_node} GPUs"
            )
        return Cluster(1, num_server_gpus, **link)
    if gpus_per_node is None:
        if num_server_gpus is None:
            raise PlanError(f"--nodes {nodes} needs --gpus_per_node: how many GPUs each node gives the server "
                            f"(e.g. --gpus_per_node 8)")
        if num_server_gpus < nodes or num_server_gpus % nodes:
            raise PlanError(
                f"--num_server_gpus {num_server_gpus} does not split evenly over --nodes {nodes}: the server takes "
                f"whole nodes of equal size; pass --gpus_per_node (GPUs in each node) instead"
            )
        gpus_per_node = num_server_gpus // nodes
    elif num_server_gpus is not None and num_server_gpus != nodes * gpus_per_node:
        raise PlanError(
            f"--num_server_gpus {num_server_gpus} does not match --nodes {nodes} x --gpus_per_node {gpus_per_node} "
            f"= {nodes * gpus_per_node}: on several nodes the server takes every GPU of each node; drop "
            f"--num_server_gpus or set it to {nodes * gpus_per_node}"
        )
    return Cluster(nodes, gpus_per_node, **link)


# ---------------------------------------------------------------------------
# The prompt batch
# ---------------------------------------------------------------------------


def prompt_batch_size(
    per_device_train_batch_size: int,
    num_processes: int,
    gradient_accumulation_steps: int,
    num_generations: int,
) -> int:
    """Prompts sent to the server per generation round.

    The trainer gathers per_device_train_batch_size x num_processes x
    gradient_accumulation_steps completions per round, num_generations of them
    per prompt (TRL's generation batch). Example: 8 x 4 x 16 / 8 = 64.
    """
    figures = dict(
        per_device_train_batch_size=per_device_train_batch_size,
        num_processes=num_processes,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_generations=num_generations,
    )
    for name, value in figures.items():
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    completions = per_device_train_batch_size * num_processes * gradient_accumulation_steps
    if completions % num_generations:
        # Suggest the nearest valid gradient_accumulation_steps and per-device batch.
        per_step = per_device_train_batch_size * num_processes
        step = num_generations // math.gcd(per_step, num_generations)
        fixed_accumulation = max(step, round(gradient_accumulation_steps / step) * step)
        raise PlanError(
            f"completions per round = per_device_train_batch_size x num_processes x "
            f"gradient_accumulation_steps = {per_device_train_batch_size} x {num_processes} x "
            f"{gradient_accumulation_steps} = {completions}, which is not a multiple of "
            f"num_generations={num_generations}: every prompt needs all its {num_generations} "
            f"completions in the same round. Fix: make it a multiple, e.g. "
            f"gradient_accumulation_steps={fixed_accumulation}, or a num_generations that divides {completions}."
        )
    return completions // num_generations


# ---------------------------------------------------------------------------
# Models and GPUs by name
# ---------------------------------------------------------------------------


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _model_lookup() -> dict[str, str]:
    """Every accepted spelling (lower case, with and without org) -> table key."""
    lookup = {}
    for key in KNOWN_MODELS:
        for spelling in [key, *MODEL_ALIASES.get(key, [])]:
            lookup[_normalize(spelling)] = key
            lookup[_normalize(spelling.split("/")[-1])] = key
    return lookup


def known_model_names() -> list[str]:
    return list(KNOWN_MODELS)


def model_from_config(config: dict, name: str = "model") -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json dict (text config of the model)."""
    config = config.get("text_config", config)  # multimodal configs nest the language model
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        spec = dict(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
        )
    except KeyError as missing:
        raise PlanError(f"{name}: config.json lacks {missing}; is this a decoder-only language model?") from None
    model_type = str(config.get("model_type", ""))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return ModelSpec(
        name=name,
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type.startswith("qwen3"),
        bytes_per_param=4 if dtype in ("float32", "torch.float32") else 2,
        **spec,
    )


def resolve_model(model: str) -> ModelSpec:
    """A local model folder (its config.json) or a known name."""
    if os.path.isdir(model):
        config_path = os.path.join(model, "config.json")
        if not os.path.isfile(config_path):
            raise PlanError(f"{model} is a folder without a config.json; pass a Hugging Face model folder")
        with open(config_path) as f:
            return model_from_config(json.load(f), name=model)
    if model.endswith(".json") and os.path.isfile(model):
        with open(model) as f:
            return model_from_config(json.load(f), name=model)
    key = _model_lookup().get(_normalize(model.removesuffix("-Instruct").removesuffix("-instruct")))
    if key is None:
        names = ", ".join(name.split("/")[-1] for name in KNOWN_MODELS)
        raise PlanError(
            f"unknown model {model!r} and no such local folder. Known names: {names}. "
            f"For another model pass a local folder that holds its config.json (e.g. a downloaded snapshot)."
        )
    return ModelSpec(name=key, **KNOWN_MODELS[key])


def known_gpu_names() -> list[str]:
    return list(KNOWN_GPUS)


def resolve_gpu(gpu: str) -> GPUSpec:
    lookup = {}
    for key in KNOWN_GPUS:
        for spelling in [key, *GPU_ALIASES.get(key, [])]:
            lookup[_normalize(spelling)] = key
    key = lookup.get(_normalize(gpu))
    if key is None:
        raise PlanError(
            f"unknown GPU {gpu!r}. Known: {', '.join(KNOWN_GPUS)}. For another GPU pass "
            f"--gpu custom with --gpu_memory_gib, --gpu_bandwidth_gbs, --gpu_bf16_tflops and --interconnect_gbs."
        )
    return GPUSpec(name=key, **KNOWN_GPUS[key])


def is_cpu(gpu_name: str) -> bool:
    return gpu_name.lower().startswith("cpu")


def cpu_device(cores: int = 1, kv_cache_gib: float | None = None) -> GPUSpec:
    """`cores` cores of the CPU table row taken as one device (a CPU engine replica's OpenMP threads).

    Compute, bandwidth and memory scale with the cores (the table's figures are
    per core); the KV cache is the fixed VLLM_CPU_KVCACHE_SPACE of the replica.
    """
    if cores < 1:
        raise PlanError(f"a CPU replica needs at least one core, got {cores}")
    row = KNOWN_GPUS["CPU"]
    return GPUSpec(
        name="CPU" if cores == 1 else f"CPU ({cores} cores)",
        memory_gib=row["memory_gib"] * cores,
        bandwidth_gbs=row["bandwidth_gbs"] * cores,
        bf16_tflops=row["bf16_tflops"] * cores,
        interconnect_gbs=row["interconnect_gbs"],
        allreduce_latency_us=row["allreduce_latency_us"],
        kv_cache_gib=row["kv_cache_gib"] if kv_cache_gib is None else kv_cache_gib,
    )


def custom_gpu(
    memory_gib: float,
    bandwidth_gbs: float,
    bf16_tflops: float,
    interconnect_gbs: float,
    allreduce_latency_us: float = 10.0,
    name: str = "custom",
) -> GPUSpec:
    for label, value in dict(memory_gib=memory_gib, bandwidth_gbs=bandwidth_gbs, bf16_tflops=bf16_tflops,
                             interconnect_gbs=interconnect_gbs).items():
        if value is None or value <= 0:
            raise PlanError(f"custom GPU needs a positive {label}, got {value!r}")
    return GPUSpec(name, memory_gib, bandwidth_gbs, bf16_tflops, interconnect_gbs, allreduce_latency_us)


# ---------------------------------------------------------------------------
# The performance model of one layout
# ---------------------------------------------------------------------------


@dataclass
class LayoutEstimate:
    tensor_parallel_size: int
    data_parallel_size: int
    valid: bool  # vLLM accepts this TP for the model
    fits: bool  # weights + reserve + KV for one full sequence fit per device
    reason: str = ""  # why not valid / not fitting
    weights_gib_per_device: float = 0.0
    kv_cache_gib_per_replica: float = 0.0
    kv_cache_tokens_per_replica: int = 0
    prompts_per_replica: int = 0
    sequences_per_replica: int = 0  # completions one replica generates per round
    concurrent_sequences_per_replica: int = 0  # of those, how many run at once
    waves: float = 0.0
    prefill_seconds: float = math.inf
    decode_seconds: float = math.inf
    seconds_per_round: float = math.inf
    tokens_per_second: float = 0.0  # completion tokens per second, whole server
    warnings: list[str] = field(default_factory=list)
    # Where the layout sits on several nodes (TPDPPlan.to_dict leaves these out on one node).
    nodes_per_replica: int = 1  # nodes one replica's TP group spans
    replicas_per_node: int | None = None  # vLLM's --data-parallel-size-local; None when a replica spans nodes
    tp_link: str = "none"  # what TP's all-reduces cross: "none" (TP=1), "intra-node" or "inter-node"
    decode_step_seconds: float = math.inf  # one decode step of one replica
    weight_push_seconds: float = 0.0  # the trainer's weight push over the network between nodes

    @property
    def label(self) -> str:
        return f"TP={self.tensor_parallel_size}, DP={self.data_parallel_size}"

    @property
    def usable(self) -> bool:
        return self.valid and self.fits


def candidate_layouts(num_gpus: int, gpus_per_node: int | None = None) -> list[tuple[int, int]]:
    """Every (TP, DP) with TP x DP = num_gpus, smallest TP first.

    On nodes of gpus_per_node GPUs a TP group either fits in one node (TP
    divides gpus_per_node, so the node holds whole DP ranks) or takes whole
    nodes (TP a multiple of it): a group never straddles part of a node.
    """
    per_node = gpus_per_node or num_gpus
    return [(tp, num_gpus // tp) for tp in range(1, num_gpus + 1)
            if num_gpus % tp == 0 and (per_node % tp == 0 or tp % per_node == 0)]


def tp_nodes(tp: int, cluster: Cluster | None) -> int:
    """Nodes a TP group spans; no cluster: one node holds it."""
    return 1 if cluster is None else cluster.nodes_spanned(tp)


def activation_reserve_bytes(model: ModelSpec, tp: int, chunk_tokens: int, max_num_seqs: int) -> float:
    """Peak activation memory of vLLM's profiling run: one prefill chunk plus the sampler's logits.

    A few hidden-sized buffers (residual, normed input, attention output, qkv)
    and the MLP's gate/up output for one chunk of chunk_tokens tokens, and fp32
    logits for max_num_seqs sequences (vLLM profiles the sampler at that batch).
    """
    per_token = (6 * model.hidden + 3 * model.intermediate / tp) * model.bytes_per_param
    logits = max_num_seqs * model.vocab * 4 * 2  # fp32 logits and their softmax
    return chunk_tokens * per_token + logits


def allreduce_seconds(message_bytes: float, tp: int, gpu: GPUSpec, cluster: Cluster | None = None) -> float:
    """One all-reduce over a TP group: a fixed latency that grows with the ring, plus ring traffic.

    A group spanning nodes reduces in two levels, as NCCL's tree does:
    log2(TP per node) steps over the GPUs' link, log2(nodes) over the network;
    its ring traffic moves at the pace of its slowest link, the network.
    """
    if tp == 1:
        return 0.0
    nodes = tp_nodes(tp, cluster)
    if nodes == 1:
        latency = gpu.allreduce_latency_us * 1e-6 * math.log2(tp)
        link_gbs = gpu.interconnect_gbs
    else:
        latency = (gpu.allreduce_latency_us * 1e-6 * math.log2(tp // nodes)
                   + cluster.internode_latency_us * 1e-6 * math.log2(nodes))
        link_gbs = cluster.internode_gbs
    traffic = 2 * (tp - 1) / tp * message_bytes / (link_gbs * 1e9)
    return latency + traffic


def weight_push_seconds(model: ModelSpec, cluster: Cluster | None) -> float:
    """Network time of one weight push from the trainer to a server on several nodes; 0 on one node.

    The trainer broadcasts the whole weights to every inference rank. NCCL's
    broadcast is a pipelined ring, so every node's link carries them once, all
    at the same time: more nodes add a hop's latency, not another copy's time.
    The same for every layout, so it is shown beside the round, not in it.
    """
    if cluster is None or cluster.nodes == 1:
        return 0.0
    return model.weight_bytes / (cluster.internode_gbs * 1e9)


def decode_step_seconds(model: ModelSpec, gpu: GPUSpec, tp: int, running: int, mean_context: float,
                        cluster: Cluster | None = None) -> float:
    """One decode step of one replica with `running` sequences of mean_context tokens so far."""
    weight_read = (model.layers * model.params_per_layer + model.embedding_params) * model.bytes_per_param / tp
    kv_read = running * mean_context * model.kv_bytes_per_token(tp)
    memory_time = (weight_read + kv_read) / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY)
    heads_per_device = model.heads // tp
    attention_flops = 4 * model.layers * heads_per_device * model.head_dim * mean_context
    flops = running * (2 * model.matmul_params / tp + attention_flops)
    compute_time = flops / (gpu.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY)
    # Two all-reduces per layer (after attention, after the MLP) of the hidden states.
    comm_time = 2 * model.layers * allreduce_seconds(running * model.hidden * model.bytes_per_param, tp, gpu, cluster)
    host_time = HOST_STEP_SECONDS + HOST_SECONDS_PER_SEQUENCE * running + (TP_STEP_SECONDS if tp > 1 else 0.0)
    return max(memory_time, compute_time) + comm_time + host_time


def prefill_seconds(model: ModelSpec, gpu: GPUSpec, tp: int, prompts: int, prompt_length: int, chunk_tokens: int,
                    cluster: Cluster | None = None) -> float:
    """Prefill `prompts` prompts on one replica (each prompt once: its generations share it)."""
    tokens = prompts * prompt_length
    if tokens == 0:
        return 0.0
    heads_per_device = model.heads // tp
    # Causal attention: QK^T and AV over half the square on average.
    attention_flops = prompts * 2 * model.layers * heads_per_device * model.head_dim * prompt_length**2
    flops = tokens * 2 * model.matmul_params / tp + attention_flops
    compute_time = flops / (gpu.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY)
    chunks = math.ceil(tokens / chunk_tokens)
    weight_time = chunks * model.weight_bytes / tp / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY)
    message_bytes = min(tokens, chunk_tokens) * model.hidden * model.bytes_per_param
    comm_time = chunks * 2 * model.layers * allreduce_seconds(message_bytes, tp, gpu, cluster)
    return max(compute_time, weight_time) + comm_time + chunks * HOST_STEP_SECONDS


def _blocks(tokens: float) -> int:
    return math.ceil(tokens / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def estimate_layout(
    model: ModelSpec,
    gpu: GPUSpec,
    workload: Workload,
    tp: int,
    dp: int,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_num_seqs: int | None = None,
    cluster: Cluster | None = None,
) -> LayoutEstimate:
    """Fit and round time of one layout. Never raises for a bad layout: it says why in `reason`.

    `cluster`: the nodes it runs on; None is one node holding every TP group.
    """
    est = LayoutEstimate(tensor_parallel_size=tp, data_parallel_size=dp, valid=True, fits=False)
    est.nodes_per_replica = tp_nodes(tp, cluster)
    est.replicas_per_node = dp // (cluster.nodes if cluster else 1) if est.nodes_per_replica == 1 else None
    est.tp_link = "none" if tp == 1 else "intra-node" if est.nodes_per_replica == 1 else "inter-node"
    chunk_tokens, default_max_num_seqs = vllm_batch_defaults(gpu.name, gpu.memory_gib)
    max_num_seqs = max_num_seqs or default_max_num_seqs
    problem = model.tp_problem(tp)
    if problem:
        est.valid = False
        est.reason = problem
        return est

    # Memory per device.
    budget = gpu_memory_utilization * gpu.memory_gib * GIB
    weights = model.weight_bytes / tp
    reserve = FIXED_RESERVE_GIB * GIB + activation_reserve_bytes(model, tp, chunk_tokens, max_num_seqs)
    kv_bytes_per_device = max(0.0, budget - weights - reserve)
    if gpu.kv_cache_gib is not None:  # vLLM's CPU build: a fixed size, not what is left
        kv_bytes_per_device = gpu.kv_cache_gib * GIB
    est.weights_gib_per_device = weights / GIB
    est.kv_cache_gib_per_replica = kv_bytes_per_device * tp / GIB
    kv_tokens = int(kv_bytes_per_device // model.kv_bytes_per_token(tp))
    est.kv_cache_tokens_per_replica = kv_tokens

    if weights + reserve > budget:
        est.reason = (
            f"weights {weights / GIB:.1f} GiB + vLLM reserve {reserve / GIB:.1f} GiB per device exceed "
            f"{gpu_memory_utilization:g} x {gpu.memory_gib:g} GiB"
        )
        return est
    if kv_tokens < workload.context_length:
        est.reason = (
            f"KV cache room for {kv_tokens} tokens per replica, less than one sequence of "
            f"{workload.context_length} tokens (weights {weights / GIB:.1f} GiB per device)"
        )
        return est
    est.fits = True

    # The server gives each replica whole prompts (a prompt's generations stay together).
    prompts = math.ceil(workload.prompt_batch_size / dp)
    sequences = prompts * workload.num_generations
    est.prompts_per_replica = prompts
    est.sequences_per_replica = sequences

    # Mean KV footprint of a running sequence: its share of the prompt (prefix
    # caching stores a prompt once for all its generations) plus half its
    # completion. vLLM allocates blocks as tokens arrive and refills finished
    # slots, so in steady state the running sequences are spread evenly over
    # their completions.
    footprint = _blocks(workload.prompt_length) / workload.num_generations + workload.max_completion_length / 2
    concurrent = max(1, min(sequences, max_num_seqs, int(kv_tokens // footprint)))
    est.concurrent_sequences_per_replica = concurrent
    # Continuous batching refills finished slots at once, so waves are fractional.
    est.waves = sequences / concurrent

    step = decode_step_seconds(model, gpu, tp, concurrent, workload.mean_decode_context, cluster)
    est.decode_step_seconds = step
    est.prefill_seconds = prefill_seconds(model, gpu, tp, prompts, workload.prompt_length, chunk_tokens, cluster)
    est.decode_seconds = est.waves * workload.max_completion_length * step
    est.weight_push_seconds = weight_push_seconds(model, cluster)
    est.seconds_per_round = est.prefill_seconds + est.decode_seconds
    est.tokens_per_second = workload.sequences * workload.max_completion_length / est.seconds_per_round

    # Where DP does not pay off.
    if dp > 1 and workload.prompt_batch_size < dp:
        est.warnings.append(
            f"only {workload.prompt_batch_size} prompt{'s' if workload.prompt_batch_size != 1 else ''} for {dp} replicas: "
            f"{dp - workload.prompt_batch_size} replica{'s sit' if dp - workload.prompt_batch_size != 1 else ' sits'} idle"
        )
    elif dp > 1 and concurrent < MIN_EFFICIENT_SEQUENCES_PER_REPLICA:
        est.warnings.append(
            f"{concurrent} sequences per replica at once: too few to fill a batch, "
            f"each replica is bound by reading its weights"
        )
    if est.waves > 1 and concurrent < max_num_seqs and concurrent < sequences:
        est.warnings.append(f"KV cache holds {concurrent} of {sequences} sequences: they run in {est.waves:.1f} waves")
    return est


# ---------------------------------------------------------------------------
# The plan: every layout, and the recommendation
# ---------------------------------------------------------------------------


# LayoutEstimate's fields about nodes, which the JSON of a one-node plan leaves out.
NODE_FIELDS = ("nodes_per_replica", "replicas_per_node", "tp_link", "decode_step_seconds", "weight_push_seconds")


def describe_server(num_gpus: int, gpu_name: str, cluster: Cluster | None) -> str:
    """'8 x H100-80GB', or '2 nodes x 8 x H100-80GB'."""
    if cluster is None or cluster.nodes == 1:
        return f"{num_gpus} x {gpu_name}"
    return f"{cluster.nodes} nodes x {cluster.gpus_per_node} x {gpu_name}"


@dataclass
class Recommendation:
    tensor_parallel_size: int
    data_parallel_size: int
    reason: str


@dataclass
class TPDPPlan:
    model: ModelSpec
    gpu: GPUSpec
    workload: Workload
    num_server_gpus: int
    gpu_memory_utilization: float
    max_num_seqs: int
    layouts: list[LayoutEstimate]
    recommended: Recommendation | None
    warnings: list[str]
    cluster: Cluster | None = None  # None: one node

    @property
    def several_nodes(self) -> bool:
        return self.cluster is not None and self.cluster.nodes > 1

    @property
    def gpus_per_node(self) -> int:
        return self.cluster.gpus_per_node if self.cluster else self.num_server_gpus

    def to_dict(self) -> dict:
        def finite(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        # One node: exactly the keys from before there were nodes.
        skipped = () if self.several_nodes else NODE_FIELDS
        layouts = []
        for est in self.layouts:
            entry = {k: finite(v) for k, v in asdict(est).items() if k not in skipped}
            layouts.append(entry)
        return {
            "model": {**asdict(self.model), "param_count": self.model.param_count},
            "gpu": asdict(self.gpu),
            "num_server_gpus": self.num_server_gpus,
            **(asdict(self.cluster) if self.several_nodes else {}),
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "prompt_batch_size": self.workload.prompt_batch_size,
            "num_generations": self.workload.num_generations,
            "completions_per_round": self.workload.sequences,
            "prompt_length": self.workload.prompt_length,
            "max_completion_length": self.workload.max_completion_length,
            "layouts": layouts,
            "recommended": asdict(self.recommended) if self.recommended else None,
            "warnings": list(self.warnings),
        }


def recommend(layouts: list[LayoutEstimate], prompt_batch_size: int) -> Recommendation | None:
    """The fastest usable layout; near-ties go to the smaller TP.

    A TP group spanning nodes does every all-reduce over the network, so such
    layouts count only when the model fits in no node.
    """
    usable = [est for est in layouts if est.usable]
    if not usable:
        return None
    usable = [est for est in usable if est.nodes_per_replica == 1] or usable
    fastest = min(usable, key=lambda est: est.seconds_per_round)
    tied = [est for est in usable if est.seconds_per_round <= fastest.seconds_per_round * (1 + TIE_TOLERANCE)]
    best = min(tied, key=lambda est: est.tensor_parallel_size)
    others = sorted((est for est in usable if est is not best), key=lambda est: est.seconds_per_round)
    if others:
        runner_up = others[0]
        ratio = runner_up.seconds_per_round / best.seconds_per_round
        versus = (
            f"{ratio:.2f}x faster than the next best ({runner_up.label})"
            if ratio >= 1 + TIE_TOLERANCE
            else f"within {TIE_TOLERANCE:.0%} of {runner_up.label}, and a smaller TP needs fewer collectives"
            if best.tensor_parallel_size < runner_up.tensor_parallel_size
            else f"within {TIE_TOLERANCE:.0%} of {runner_up.label}"
        )
    else:
        versus = "the only layout that fits"
    reason = f"{best.label}: fastest predicted round ({best.seconds_per_round:.1f} s), {versus}; {why_this_tp(best, usable, prompt_batch_size)}."
    return Recommendation(best.tensor_parallel_size, best.data_parallel_size, reason)


def why_this_tp(best: LayoutEstimate, usable: list[LayoutEstimate], prompt_batch_size: int) -> str:
    """Why not more replicas: compare with the usable layout of the next smaller TP."""
    if best.tensor_parallel_size == 1:
        return "the model fits on one GPU, so independent replicas beat sharding it"
    smaller = [est for est in usable if est.tensor_parallel_size < best.tensor_parallel_size]
    if not smaller:
        return f"TP={best.tensor_parallel_size} is the smallest TP at which the model fits with room for KV cache"
    more_dp = max(smaller, key=lambda est: est.tensor_parallel_size)
    if prompt_batch_size < more_dp.data_parallel_size:
        return f"{prompt_batch_size} prompt{'s' if prompt_batch_size != 1 else ''} would leave replicas of {more_dp.label} idle"
    if more_dp.concurrent_sequences_per_replica < more_dp.sequences_per_replica:
        return (
            f"at {more_dp.label} the KV cache runs only {more_dp.concurrent_sequences_per_replica} of "
            f"{more_dp.sequences_per_replica} sequences per replica at once ({more_dp.waves:.1f} waves)"
        )
    return (
        f"with {more_dp.sequences_per_replica} sequences per replica at {more_dp.label}, sharding the weights "
        f"shortens each decode step more than TP's all-reduces cost"
    )


def internode_cost(est: LayoutEstimate, model: ModelSpec, gpu: GPUSpec, workload: Workload, cluster: Cluster) -> str:
    """What the network costs a layout whose TP group spans nodes: its decode step against the in-node link's."""
    in_one_node = decode_step_seconds(model, gpu, est.tensor_parallel_size, est.concurrent_sequences_per_replica,
                                      workload.mean_decode_context)
    return (
        f"TP={est.tensor_parallel_size} spans {est.nodes_per_replica} nodes: its all-reduces cross the "
        f"{cluster.internode_gbs:g} GB/s link, {est.decode_step_seconds / in_one_node:.1f}x slower per decode step "
        f"than over the {gpu.interconnect_gbs:g} GB/s link within a node"
    )


def internode_note(best: LayoutEstimate, layouts: list[LayoutEstimate], model: ModelSpec, gpu: GPUSpec,
                   workload: Workload, cluster: Cluster) -> str | None:
    """Where the network between nodes makes a layout lose, or what it costs the one recommended."""
    if best.nodes_per_replica > 1:
        return (f"{internode_cost(best, model, gpu, workload, cluster)}, which no layout avoids: "
                f"the model fits in no node's {cluster.gpus_per_node} GPUs")
    spanning = [est for est in layouts if est.usable and est.nodes_per_replica > 1]
    if not spanning:
        return None
    other = min(spanning, key=lambda est: est.seconds_per_round)
    ratio = other.seconds_per_round / best.seconds_per_round
    cost = internode_cost(other, model, gpu, workload, cluster)
    if ratio >= 1:
        return f"{cost}; its round takes {ratio:.1f}x as long as {best.label}'s"
    return (f"{cost}, yet its round is predicted {1 / ratio:.2f}x faster than {best.label}'s; this planner puts "
            f"TP across nodes only where the model fits in no node, so time both on the cluster")


def plan_for_workload(
    model: ModelSpec,
    gpu: GPUSpec,
    workload: Workload,
    num_server_gpus: int | Cluster,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_num_seqs: int | None = None,
) -> TPDPPlan:
    """The plan on num_server_gpus GPUs of one node, or on a Cluster of several."""
    cluster = num_server_gpus if isinstance(num_server_gpus, Cluster) else server_cluster(num_server_gpus)
    num_server_gpus = cluster.num_gpus
    if not 0 < gpu_memory_utilization <= 1:
        raise PlanError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if workload.prompt_length < 1 or workload.max_completion_length < 1:
        raise PlanError("prompt_length and max_completion_length must be positive")
    max_num_seqs = max_num_seqs or vllm_batch_defaults(gpu.name, gpu.memory_gib)[1]
    layouts = [
        estimate_layout(model, gpu, workload, tp, dp, gpu_memory_utilization, max_num_seqs, cluster)
        for tp, dp in candidate_layouts(num_server_gpus, cluster.gpus_per_node)
    ]
    recommended = recommend(layouts, workload.prompt_batch_size)
    warnings = []
    for est in layouts:
        if est.valid and not est.fits:
            warnings.append(f"{est.label}: the model does not fit ({est.reason})")
    if recommended is None:
        warnings.append(
            f"no layout fits {model.name} on {describe_server(num_server_gpus, gpu.name, cluster)}: use more GPUs, a larger "
            f"gpu_memory_utilization, shorter sequences, or a quantized model"
        )
    else:
        best = next(est for est in layouts if est.tensor_parallel_size == recommended.tensor_parallel_size)
        warnings.extend(f"{best.label}: {w}" for w in best.warnings)
        note = internode_note(best, layouts, model, gpu, workload, cluster) if cluster.nodes > 1 else None
        if note:
            recommended.reason += f" {note}."
    return TPDPPlan(model, gpu, workload, num_server_gpus, gpu_memory_utilization, max_num_seqs,
                    layouts, recommended, warnings, cluster)


def plan_tp_dp(
    model: str | ModelSpec,
    num_server_gpus: int | None,
    gpu: str | GPUSpec = "H100-80GB",
    *,
    max_completion_length: int = 256,
    prompt_length: int = 512,
    per_device_train_batch_size: int = 8,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    num_generations: int = 8,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_num_seqs: int | None = None,
    nodes: int = 1,
    gpus_per_node: int | None = None,
    internode_gbs: float = DEFAULT_INTERNODE_GBS,
    internode_latency_us: float = DEFAULT_INTERNODE_LATENCY_US,
) -> TPDPPlan:
    """The TP/DP plan for a GRPO run, from the figures users set in their training config.

    `model` is a known name or a local folder; `gpu` a known name or a GPUSpec.
    On several nodes the server takes nodes x gpus_per_node GPUs
    (num_server_gpus may then be None; see server_cluster).
    Raises PlanError with a message naming the fix for invalid inputs.
    """
    model_spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    gpu_spec = gpu if isinstance(gpu, GPUSpec) else resolve_gpu(gpu)
    prompts = prompt_batch_size(per_device_train_batch_size, num_processes, gradient_accumulation_steps, num_generations)
    workload = Workload(prompts, num_generations, prompt_length, max_completion_length)
    cluster = server_cluster(num_server_gpus, nodes, gpus_per_node, internode_gbs, internode_latency_us)
    return plan_for_workload(model_spec, gpu_spec, workload, cluster, gpu_memory_utilization, max_num_seqs)
