"""`fastgrpo demo`: GRPO on the embedded SmolLM2-135M-Instruct, learning arithmetic, in server mode.

Runs where the machine computes fastest: with no GPU, the server on vLLM's CPU build
and the trainer on the CPU; with two or more GPUs, the server on the first and the
trainer on the second; with one, both share it (weights over CUDA IPC).

Starts `fastgrpo vllm-serve` as a subprocess, waits for it, trains, stops it, and
leaves in the output folder the metrics (metrics.jsonl), a plot of reward and
completion length per step (reward.png) and the trained model (model/).
"""

import argparse

from fastgrpo.cliutil import add_flag


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="GRPO-train the embedded model on arithmetic with a vLLM server (what `make demo` runs)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--model", default="default", help="model name or path (default: embedded SmolLM2-135M-Instruct)")
    add_flag(parser, "--max_steps", type=int, default=None, help="optimizer steps (default 30)")
    add_flag(parser, "--output_dir", default=None, help="where results go (default outputs/demo)")
    add_flag(parser, "--async", dest="async_generation", action="store_true",
             help="generate the next round while training on this one (async_generation, staleness 1)")
    from fastgrpo.run import DEMO_TASKS

    add_flag(parser, "--task", default="arithmetic", choices=sorted(DEMO_TASKS),
             help="arithmetic: one answer per question (default); feedback: multi-turn, the model is told 'too "
                  "high' or 'too low' and tries again, up to 3 times")
    add_flag(parser, "--lora", action="store_true",
             help="train LoRA adapters (rank 16, attention and MLP projections) and push only them")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastgrpo.placement import PlacementError, detect_placement, use_trainer_device
    from fastgrpo.run import DEMO_LORA, DEMO_TASKS, demo_spec, print_summary, train

    try:
        placement = detect_placement()
    except PlacementError as exc:
        raise SystemExit(f"fastgrpo demo: error: {exc}") from None
    print(f"devices: {placement.describe()}")
    use_trainer_device(placement)
    spec = dict(demo_spec(placement), model=args.model)
    spec.update(DEMO_TASKS[args.task])
    if args.max_steps is not None:
        spec["max_steps"] = args.max_steps
    if args.output_dir is not None:
        spec["output_dir"] = args.output_dir
    if args.async_generation:
        spec["async_generation"] = True
    if args.lora:
        spec.update(DEMO_LORA)
        if args.output_dir is None:
            spec["output_dir"] = spec["output_dir"] + "-lora"
    print_summary(train(spec))
    return 0
