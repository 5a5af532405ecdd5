"""`fastgrpo tp-dp`: which tensor-parallel / data-parallel layout for the generation server.

Prints the prompt batch size, a table of every TP x DP layout (does it fit,
KV cache, sequences per replica, predicted round time and tokens/s) and a
recommendation. The model behind it is `fastgrpo.planner.model` (see docs/tp-dp.md).
This module imports only the standard library at top level; matplotlib and
yaml are imported where they are used.
"""

from __future__ import annotations

import argparse
import json
import sys

from fastgrpo.hardware import usable_cores
from fastgrpo.planner import model as parallel
from fastgrpo.cliutil import add_flag

# Built-in defaults for the batch figures, used when neither the command line
# nor --config gives one. They match TRL's GRPOConfig defaults.
BATCH_DEFAULTS = dict(
    per_device_train_batch_size=8,
    num_processes=1,
    gradient_accumulation_steps=1,
    num_generations=8,
    max_completion_length=256,
    prompt_length=512,
)

# Training-config keys (TRL GRPOConfig / accelerate names) -> our argument names.
CONFIG_KEYS = {
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "num_generations": "num_generations",
    "max_completion_length": "max_completion_length",
    "max_prompt_length": "prompt_length",
    "prompt_length": "prompt_length",
    "num_processes": "num_processes",
    "model": "model",
    "model_name_or_path": "model",
}

CUSTOM_GPU_FLAGS = ("gpu_memory_gib", "gpu_bandwidth_gbs", "gpu_bf16_tflops", "interconnect_gbs")

EPILOG = """\
examples:
  fastgrpo tp-dp --model Qwen2.5-7B --num_server_gpus 8 --gpu H100-80GB \\
      --per_device_train_batch_size 8 --num_processes 4 --gradient_accumulation_steps 16 \\
      --num_generations 8 --max_completion_length 1024 --prompt_length 512
  fastgrpo tp-dp --config run.yaml --num-server-gpus 4 --gpu A100-80GB --json
  fastgrpo tp-dp --model Llama-3.1-405B --nodes 2 --gpus_per_node 8 --gpu H100-80GB --internode_gbs 50
  fastgrpo tp-dp --model ./my-model --num_server_gpus 2 --gpu custom \\
      --gpu_memory_gib 94 --gpu_bandwidth_gbs 3900 --gpu_bf16_tflops 835 --interconnect_gbs 300
  fastgrpo tp-dp --model default --measure --per_device_train_batch_size 8 \\
      --gradient_accumulation_steps 4 --num_generations 8 --max_completion_length 128 --prompt_length 64

known GPUs: {gpus}
known models: {models} (or a local folder holding config.json; 'default': the embedded SmolLM2-135M-Instruct)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tp-dp",
        help="choose the generation server's tensor/data-parallel layout",
        description=(
            "Predict, for every TP x DP layout of the generation server's GPUs, whether the model "
            "fits and how long a generation round takes, and recommend the fastest. Prompts per "
            "round = per_device_train_batch_size x num_processes x gradient_accumulation_steps / "
            "num_generations. A performance model; --measure also times every layout on the real server. "
            "See docs/tp-dp.md."
        ),
        epilog=EPILOG.format(
            gpus=", ".join(parallel.known_gpu_names()),
            models=", ".join(name.split("/")[-1] for name in parallel.known_model_names()),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flag(parser, "--model", default=None, help="known model name (e.g. Qwen2.5-7B), local folder with config.json, or 'default' (the embedded SmolLM2-135M-Instruct)")
    add_flag(parser, "--config", default=None, help="training config YAML to read the batch figures and model from; flags override it")
    add_flag(parser, "--num_server_gpus", type=int, default=None,
             help="GPUs the generation server gets (TP x DP); CPU cores with --gpu CPU or --measure on a CPU "
                  "machine (default there: the cores this process may use); required otherwise, except with "
                  "--nodes > 1, where it is --nodes x --gpus_per_node and must equal that if given")
    add_flag(parser, "--gpu", default=None,
             help="GPU type: a known name, 'CPU' (one core of vLLM's CPU build), or 'custom' with the figures "
                  "below (default: H100-80GB; CPU with --measure on a CPU machine)")
    batch = parser.add_argument_group("batch figures (default: --config, else TRL's defaults)")
    add_flag(batch, "--per_device_train_batch_size", type=int, default=None, help=f"completions per training process per step (default {BATCH_DEFAULTS['per_device_train_batch_size']})")
    add_flag(batch, "--num_processes", type=int, default=None, help=f"training processes / GPUs (default {BATCH_DEFAULTS['num_processes']})")
    add_flag(batch, "--gradient_accumulation_steps", type=int, default=None, help=f"(default {BATCH_DEFAULTS['gradient_accumulation_steps']})")
    add_flag(batch, "--num_generations", type=int, default=None, help=f"completions per prompt (default {BATCH_DEFAULTS['num_generations']})")
    add_flag(batch, "--max_completion_length", type=int, default=None, help=f"tokens per completion, at most (default {BATCH_DEFAULTS['max_completion_length']})")
    add_flag(batch, "--prompt_length", type=int, default=None, help=f"tokens per prompt, typical or max_prompt_length (default {BATCH_DEFAULTS['prompt_length']})")
    server = parser.add_argument_group("server settings")
    add_flag(server, "--gpu_memory_utilization", type=float, default=parallel.DEFAULT_GPU_MEMORY_UTILIZATION, help="as passed to vllm-serve (default 0.9)")
    add_flag(server, "--max_num_seqs", type=int, default=None, help="vLLM's cap on sequences running at once per replica (default: vLLM's for the GPU)")
    add_flag(server, "--kv_cache_space", type=int, default=None,
             help="CPU only: GiB of KV cache per replica, as passed to vllm-serve (default 1)")
    cluster = parser.add_argument_group("several nodes (TP stays within a node unless the model fits in no node)")
    add_flag(cluster, "--nodes", type=int, default=1,
             help="machines the server runs on; DP ranks are spread over them (default 1)")
    add_flag(cluster, "--gpus_per_node", type=int, default=None, metavar="GPUS",
             help="GPUs of each node the server takes (with --nodes > 1, all of them; default: "
                  "--num_server_gpus / --nodes)")
    add_flag(cluster, "--internode_gbs", type=float, default=None,
             help=f"network bandwidth between nodes per direction, GB/s: nccl-tests' all_reduce bus bandwidth "
                  f"across two nodes (default {parallel.DEFAULT_INTERNODE_GBS:g}: one 400 Gb/s NIC per node)")
    add_flag(cluster, "--internode_latency_us", type=float, default=None,
             help=f"cost of one small all-reduce between 2 GPUs on different nodes, microseconds "
                  f"(default {parallel.DEFAULT_INTERNODE_LATENCY_US:g})")
    custom = parser.add_argument_group("custom GPU figures (with --gpu custom all four are required; with a known GPU they override its figures)")
    add_flag(custom, "--gpu_memory_gib", type=float, default=None, help="device memory, GiB")
    add_flag(custom, "--gpu_bandwidth_gbs", type=float, default=None, help="peak memory bandwidth, GB/s")
    add_flag(custom, "--gpu_bf16_tflops", type=float, default=None, help="dense bf16 peak, TFLOPS")
    add_flag(custom, "--interconnect_gbs", type=float, default=None, help="GPU-to-GPU bandwidth per direction, GB/s (NVLink total / 2, or PCIe)")
    add_flag(custom, "--allreduce_latency_us", type=float, default=None, help="cost of one small all-reduce between 2 GPUs, microseconds (default 20 NVLink-class)")
    output = parser.add_argument_group("output")
    add_flag(output, "--json", action="store_true", help="print one JSON object instead of the table")
    add_flag(output, "--plot", default=None, help="also save a PNG of predicted tokens/s per layout against prompt batch size")
    measure = parser.add_argument_group("measuring (starts the real server in each layout)")
    add_flag(measure, "--measure", action="store_true",
             help="start `fastgrpo vllm-serve` in every candidate layout on this machine's devices, time a round "
                  "of the real shape, print measured beside predicted, and recommend from the measurement")
    add_flag(measure, "--measure_timeout", type=float, default=None,
             help="seconds each layout's server may take to start (default 300)")
    add_flag(measure, "--measure_rounds", type=int, default=1,
             help="timed rounds per layout after the warm-up; the median counts (default 1)")
    add_flag(measure, "--measure_log_dir", default=None,
             help="keep the servers' logs here (default: a temporary folder, kept only if a layout fails)")
    parser.set_defaults(func=run)
    return parser


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def read_training_config(path: str) -> dict:
    """The batch figures and model from a training YAML, under our argument names."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise parallel.PlanError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise parallel.PlanError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise parallel.PlanError(f"--config {path} must be a mapping of settings, got {type(raw).__name__}")
    found = {}
    for key, name in CONFIG_KEYS.items():
        if raw.get(key) is not None and name not in found:
            found[name] = raw[key]
    for name, value in found.items():
        if name != "model" and not isinstance(value, int):
            raise parallel.PlanError(f"--config {path}: {name} must be an integer, got {value!r}")
    return found


def resolve_inputs(args: argparse.Namespace) -> dict:
    """Command line over --config over built-in defaults."""
    from_config = read_training_config(args.config) if args.config else {}
    inputs = {}
    for name in [*BATCH_DEFAULTS, "model"]:
        value = getattr(args, name)
        if value is None:
            value = from_config.get(name, BATCH_DEFAULTS.get(name))
        inputs[name] = value
    if inputs["model"] is None:
        raise parallel.PlanError("no model: pass --model NAME_OR_PATH (or a --config with `model` / `model_name_or_path`)")
    inputs["model"] = resolve_model_argument(inputs["model"])
    return inputs


def resolve_model_argument(model: str) -> str:
    """'default' (or the embedded model's name) -> the embedded model's local folder; anything else as given."""
    from fastgrpo import models

    if model in ("default", models.DEFAULT_MODEL_NAME):
        try:
            return models.default_model_path()
        except RuntimeError as e:
            raise parallel.PlanError(str(e)) from None
    return model


def resolve_num_server_gpus(args: argparse.Namespace, gpu: parallel.GPUSpec, on_cpu: bool | None) -> int | None:
    """--num_server_gpus, or the devices at hand where that is what it means (CPU cores; GPUs with --measure).

    With --nodes or --gpus_per_node the count is theirs to settle (parallel.server_cluster): as given.
    """
    if args.num_server_gpus is not None or args.nodes != 1 or args.gpus_per_node is not None:
        return args.num_server_gpus
    if on_cpu or (on_cpu is None and parallel.is_cpu(gpu.name)):
        return len(usable_cores())
    if on_cpu is False:
        from fastgrpo.planner.measure import detect_devices

        count = detect_devices(on_cpu=False)
        if count:
            return count
    raise parallel.PlanError("pass --num_server_gpus: how many GPUs the generation server gets (TP x DP)")


def resolve_gpu_from_args(args: argparse.Namespace, on_cpu: bool | None = None) -> parallel.GPUSpec:
    """The --gpu figures. With --measure on a CPU machine (on_cpu True): the CPU row."""
    figures = {name: getattr(args, name) for name in CUSTOM_GPU_FLAGS}
    if on_cpu:
        return parallel.cpu_device(1, args.kv_cache_space)
    name = args.gpu or "H100-80GB"
    if name.lower() == "custom":
        missing = [f"--{name}" for name, value in figures.items() if value is None]
        if missing:
            raise parallel.PlanError(f"--gpu custom needs {', '.join(missing)} (see --help)")
        return parallel.custom_gpu(
            memory_gib=figures["gpu_memory_gib"],
            bandwidth_gbs=figures["gpu_bandwidth_gbs"],
            bf16_tflops=figures["gpu_bf16_tflops"],
            interconnect_gbs=figures["interconnect_gbs"],
            allreduce_latency_us=args.allreduce_latency_us or 20.0,
        )
    gpu = parallel.resolve_gpu(name)
    if parallel.is_cpu(gpu.name) and args.kv_cache_space is not None:
        gpu = parallel.cpu_device(1, args.kv_cache_space)
    overrides = dict(
        memory_gib=figures["gpu_memory_gib"],
        bandwidth_gbs=figures["gpu_bandwidth_gbs"],
        bf16_tflops=figures["gpu_bf16_tflops"],
        interconnect_gbs=figures["interconnect_gbs"],
        allreduce_latency_us=args.allreduce_latency_us,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return gpu
    return parallel.GPUSpec(**{**gpu.__dict__, **overrides, "name": gpu.name + " (custom figures)"})


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _format_layout_row(est: parallel.LayoutEstimate) -> list[str]:
    if not est.valid:
        return [est.label, "invalid", "", "", "", "", "", est.reason]
    if not est.fits:
        return [est.label, "no", f"{est.weights_gib_per_device:.1f}", "", "", "", "", est.reason]
    sequences = f"{est.sequences_per_replica} ({est.concurrent_sequences_per_replica})"
    return [
        est.label,
        "yes",
        f"{est.weights_gib_per_device:.1f}",
        f"{est.kv_cache_gib_per_replica:.1f}",
        sequences,
        f"{est.seconds_per_round:.1f}",
        f"{est.tokens_per_second:,.0f}",
        "",
    ]


TP_LINK_NAMES = {"none": "-", "intra-node": "in node", "inter-node": "across nodes"}


def _node_cells(est: parallel.LayoutEstimate, plan: parallel.TPDPPlan) -> tuple[list[str], str]:
    """The columns a plan on several nodes adds: (replica span and TP link, weight push)."""
    span = f"{est.nodes_per_replica} node{'s' if est.nodes_per_replica > 1 else ''}"
    link_gbs = {"intra-node": plan.gpu.interconnect_gbs, "inter-node": plan.cluster.internode_gbs}.get(est.tp_link)
    link = TP_LINK_NAMES[est.tp_link] + (f" ({link_gbs:g} GB/s)" if link_gbs else "")
    push = f"{est.weight_push_seconds:.2f}" if est.usable else ""
    return [span, link], push


def _layout_table(plan: parallel.TPDPPlan) -> list[str]:
    header = ["layout", "fits", "weights/GPU GiB", "KV/replica GiB", "seqs/replica (at once)", "round s", "tokens/s", "note"]
    rows = [header] + [_format_layout_row(est) for est in plan.layouts]
    if plan.several_nodes:
        # After the layout: where a replica sits; before the note: the weight push, apart from the round.
        cells = [(["replica spans", "TP link"], "push s")] + [_node_cells(est, plan) for est in plan.layouts]
        rows = [row[:1] + span_link + row[1:-1] + [push] + row[-1:] for row, (span_link, push) in zip(rows, cells)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip() for row in rows]


def _recommended_flags(plan: parallel.TPDPPlan) -> str:
    rec = plan.recommended
    flags = f"--tensor_parallel_size {rec.tensor_parallel_size} --data_parallel_size {rec.data_parallel_size}"
    if not plan.several_nodes:
        return flags
    best = next(est for est in plan.layouts if est.tensor_parallel_size == rec.tensor_parallel_size)
    if best.nodes_per_replica > 1:
        return f"{flags} (each replica's TP group spans {best.nodes_per_replica} nodes)"
    return f"{flags} ({best.replicas_per_node} per node: vLLM's --data-parallel-size-local {best.replicas_per_node})"


def format_plan(plan: parallel.TPDPPlan, inputs: dict) -> str:
    w, m, g = plan.workload, plan.model, plan.gpu
    links = f"{g.interconnect_gbs:g} GB/s link"
    if plan.several_nodes:
        links += (f" within a node, {plan.cluster.internode_gbs:g} GB/s and {plan.cluster.internode_latency_us:g} us "
                  f"between nodes")
    lines = [
        f"Prompt batch size: {inputs['per_device_train_batch_size']} x {inputs['num_processes']} x "
        f"{inputs['gradient_accumulation_steps']} / {w.num_generations} = {w.prompt_batch_size} prompts per round "
        f"({w.sequences} completions of up to {w.max_completion_length} tokens, prompts of {w.prompt_length})",
        f"Model: {m.name} ({m.param_count / 1e9:.2f}B parameters, {m.weight_bytes / parallel.GIB:.1f} GiB of weights)",
        f"Server: {parallel.describe_server(plan.num_server_gpus, g.name, plan.cluster)} ({g.memory_gib:g} GiB, "
        f"{g.bandwidth_gbs:g} GB/s, {g.bf16_tflops:g} TFLOPS bf16, {links}), "
        f"gpu_memory_utilization {plan.gpu_memory_utilization:g}, max_num_seqs {plan.max_num_seqs}",
        "",
        *_layout_table(plan),
        "",
    ]
    if plan.recommended:
        lines.append(f"Recommended: {_recommended_flags(plan)}")
        lines.append(f"  {plan.recommended.reason}")
    else:
        lines.append("Recommended: none; no layout fits.")
    if plan.warnings:
        lines.append("Warnings:")
        lines.extend(f"  - {warning}" for warning in plan.warnings)
    return "\n".join(lines)


def plot_plan(plan: parallel.TPDPPlan, path: str) -> None:
    """Predicted tokens/s of each layout against the prompt batch size (the user's batch marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    current = plan.workload.prompt_batch_size
    top = max(512, 8 * current)
    batch_sizes = [2**k for k in range(0, top.bit_length()) if 2**k <= top]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for tp, dp in parallel.candidate_layouts(plan.num_server_gpus, plan.gpus_per_node):
        xs, ys = [], []
        for batch in batch_sizes:
            workload = parallel.Workload(batch, plan.workload.num_generations, plan.workload.prompt_length,
                                         plan.workload.max_completion_length)
            est = parallel.estimate_layout(plan.model, plan.gpu, workload, tp, dp,
                                           plan.gpu_memory_utilization, plan.max_num_seqs, plan.cluster)
            if est.usable:
                xs.append(batch)
                ys.append(est.tokens_per_second)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=f"TP={tp}, DP={dp}")
    ax.axvline(current, color="gray", linestyle="--", linewidth=1, label=f"your batch ({current})")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("prompt batch size (prompts per round)")
    ax.set_ylabel("predicted completion tokens/s")
    server = parallel.describe_server(plan.num_server_gpus, plan.gpu.name, plan.cluster)
    ax.set_title(
        f"{plan.model.name.split('/')[-1]} on {server}, "
        f"{plan.workload.prompt_length}+{plan.workload.max_completion_length} tokens, "
        f"{plan.workload.num_generations} per prompt",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.measure:
        return run_measure(args)
    if args.measure_timeout is not None or args.measure_log_dir is not None or args.measure_rounds != 1:
        print("fastgrpo tp-dp: error: --measure_timeout, --measure_rounds and --measure_log_dir go with --measure",
              file=sys.stderr)
        return 2
    try:
        inputs = resolve_inputs(args)
        gpu = resolve_gpu_from_args(args)
        num_server_gpus = resolve_num_server_gpus(args, gpu, on_cpu=None)
        plan = plan_from(args, inputs, gpu, num_server_gpus)
    except parallel.PlanError as e:
        print(f"fastgrpo tp-dp: error: {e}", file=sys.stderr)
        return 2
    return emit(args, plan, plot_plan, lambda: format_plan(plan, inputs))


def emit(args: argparse.Namespace, result, plot, text) -> int:
    """Write --plot, then print --json or the table; 2 when the plot cannot be written."""
    if args.plot:
        try:
            plot(result, args.plot)
        except OSError as e:
            print(f"fastgrpo tp-dp: error: cannot write --plot {args.plot}: {e.strerror}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(text())
        if args.plot:
            print(f"Plot saved to {args.plot}")
    return 0


def internode_figures(args: argparse.Namespace) -> dict:
    """--internode_gbs and --internode_latency_us where given (plan_tp_dp has the defaults); only for several nodes."""
    given = {name: getattr(args, name) for name in ("internode_gbs", "internode_latency_us")}
    given = {name: value for name, value in given.items() if value is not None}
    if given and args.nodes == 1:
        raise parallel.PlanError("--internode_gbs and --internode_latency_us go with --nodes > 1 "
                                 "(one node has no network between its GPUs)")
    return given


def plan_from(args: argparse.Namespace, inputs: dict, gpu, num_devices: int | None):
    return parallel.plan_tp_dp(
        inputs["model"],
        num_devices,
        gpu,
        max_completion_length=inputs["max_completion_length"],
        prompt_length=inputs["prompt_length"],
        per_device_train_batch_size=inputs["per_device_train_batch_size"],
        num_processes=inputs["num_processes"],
        gradient_accumulation_steps=inputs["gradient_accumulation_steps"],
        num_generations=inputs["num_generations"],
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        **internode_figures(args),
    )


def run_measure(args: argparse.Namespace) -> int:
    """--measure: predict, then start the real server in every candidate layout and time it."""
    from fastgrpo.planner import measure as tp_dp_measure
    from fastgrpo.engine import on_cpu as engine_on_cpu

    def progress(message: str) -> None:
        print(f"[tp-dp --measure] {message}", file=sys.stderr, flush=True)

    if args.nodes > 1:
        print(f"fastgrpo tp-dp: error: --measure starts the server on this machine only and cannot start it on "
              f"other nodes (--nodes {args.nodes}): measure one node's layouts with --nodes 1 "
              f"(--num_server_gpus = that node's GPUs), or drop --measure for the prediction", file=sys.stderr)
        return 2
    try:
        inputs = resolve_inputs(args)
        cpu = engine_on_cpu()
        if cpu and args.gpu and not parallel.is_cpu(args.gpu):
            progress(f"vLLM here is the CPU build: predicting with the CPU figures, not --gpu {args.gpu}")
        if not cpu and args.kv_cache_space is not None:
            raise parallel.PlanError("--kv_cache_space is for vLLM's CPU build; on GPUs use --gpu_memory_utilization")
        gpu = resolve_gpu_from_args(args, on_cpu=cpu)
        num_devices = resolve_num_server_gpus(args, gpu, on_cpu=cpu)
        plan = plan_from(args, inputs, gpu, num_devices)
        # On CPU the server's --gpu_memory_utilization is a fraction of host memory; pass it only if chosen.
        utilization = args.gpu_memory_utilization
        if cpu and utilization == parallel.DEFAULT_GPU_MEMORY_UTILIZATION:
            utilization = None
        result = tp_dp_measure.measure(
            plan,
            inputs["model"],
            on_cpu=cpu,
            timeout=args.measure_timeout or tp_dp_measure.DEFAULT_MEASURE_TIMEOUT,
            rounds=args.measure_rounds,
            kv_cache_space=args.kv_cache_space,
            gpu_memory_utilization=utilization,
            max_num_seqs=args.max_num_seqs,
            log_dir=args.measure_log_dir,
            progress=progress,
        )
    except parallel.PlanError as e:
        print(f"fastgrpo tp-dp: error: {e}", file=sys.stderr)
        return 2
    code = emit(args, result, tp_dp_measure.plot_measurement,
                lambda: tp_dp_measure.format_measurement(result, inputs))
    if code:
        return code
    if result.failed:
        print(f"fastgrpo tp-dp: error: {len(result.failed)} layout(s) failed to measure: "
              f"{', '.join(c.label for c in result.failed)} (see above)", file=sys.stderr)
        return 1
    return 0
