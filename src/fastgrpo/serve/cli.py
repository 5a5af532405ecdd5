"""`fastgrpo vllm-serve`: the generation server. Its flags, both spellings, are a contract: docs/server-flags.md."""

import argparse
import logging

from fastgrpo.cliutil import add_flag
from fastgrpo.engine import on_cpu
from fastgrpo.models import resolve_model
from fastgrpo.serve import DEFAULT_MAX_ROLLOUTS
from fastgrpo.serve.engines import DEFAULT_DP_RPC_PORT, ServerSettings, check_devices
from fastgrpo.serve.headless import run_headless
from fastgrpo.transfer.adapters import LORA_RANKS
from fastgrpo.transfer.base import SHARING_BACKENDS


def _optional_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "vllm-serve",
        help="run the generation server (vLLM engines, generate/weight-sync/OpenAI routes)",
        description="Serve a model on vLLM's data parallelism: DP engine cores (ranks) of TP devices each, on "
                    "this machine and, with --headless on the others, on several. The trainer sends prompts "
                    "and, after each optimizer step, its new weights to every rank.",
    )
    add_flag(p, "--model", required=True, help="model name or local path ('default': the embedded SmolLM2-135M-Instruct)")
    add_flag(p, "--revision", default=None, help="model revision (branch, tag or commit)")
    add_flag(p, "--tensor_parallel_size", type=int, default=1, help="devices per DP rank (default 1)")
    add_flag(p, "--data_parallel_size", type=int, default=1,
             help="vLLM's data parallelism: engine cores (DP ranks) on every node together (default 1)")
    nodes = p.add_argument_group("several machines (vLLM's multi-node data parallelism; docs/multi-node.md)")
    add_flag(nodes, "--data_parallel_size_local", type=int, default=None,
             help="DP ranks on this machine (default: all of them)")
    add_flag(nodes, "--data_parallel_start_rank", type=int, default=0,
             help="the first DP rank on this machine (--headless nodes; the head has rank 0)")
    add_flag(nodes, "--data_parallel_address", default=None,
             help="the head's address, as every node reaches it (default 127.0.0.1: one machine)")
    add_flag(nodes, "--data_parallel_rpc_port", type=int, default=DEFAULT_DP_RPC_PORT,
             help=f"the head's port for the other nodes' engines (default {DEFAULT_DP_RPC_PORT}, vLLM's)")
    add_flag(nodes, "--headless", action="store_true",
             help="run this machine's DP ranks for a head elsewhere, without HTTP")
    add_flag(nodes, "--join_timeout", type=float, default=600.0,
             help="seconds the head waits for the other nodes' ranks to join at start (default 600)")
    add_flag(nodes, "--rank_timeout", type=float, default=120.0,
             help="seconds a DP rank may go without answering before the server declares it dead and ends "
                  "every generation in flight with an error (default 120)")
    add_flag(p, "--load_balance", default="tokens", choices=["tokens", "vllm"],
             help="how requests are spread over DP ranks: tokens (default: to the rank with the fewest tokens "
                  "still to generate) or vllm (vLLM's: the fewest requests)")
    add_flag(p, "--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    add_flag(p, "--port", type=int, default=8000, help="port (default 8000)")
    add_flag(p, "--gpu_memory_utilization", type=float, default=0.9,
             help="fraction of device memory for weights, activations and KV cache (default 0.9)")
    add_flag(p, "--dtype", default="auto", help="vLLM dtype: auto, bfloat16, float16, float32 (default auto: the "
             "checkpoint's, but float32 on a CPU without a bf16 unit, which would emulate bf16 slowly)")
    add_flag(p, "--max_model_len", type=int, default=None, help="context limit; smaller means a smaller KV cache")
    add_flag(p, "--enable_prefix_caching", type=_optional_bool, default=None, nargs="?", const=True,
             metavar="BOOL", help="vLLM prefix caching (default: vLLM's choice)")
    add_flag(p, "--enforce_eager", type=_optional_bool, default=None, nargs="?", const=True, metavar="BOOL",
             help="no torch.compile / CUDA graphs (default: eager on CPU, vLLM's default on GPU)")
    add_flag(p, "--max_num_seqs", type=int, default=None, help="most sequences an engine runs at once")
    add_flag(p, "--kv_cache_space", type=int, default=None,
             help="GiB of KV cache per DP rank on vLLM's CPU build (default 1, or VLLM_CPU_KVCACHE_SPACE)")
    add_flag(p, "--kv_after_push", default="recompute", choices=["recompute", "keep"],
             help="requests in flight during a weight push: recompute their keys and values under the new "
                  "weights (default), or keep those computed under the old ones (new requests never reuse them)")
    add_flag(p, "--weight_transfer_backend", default="auto", choices=["auto", "nccl", "ipc", "shm"],
             help="how pushed weights reach the engines: auto (gloo on vLLM's CPU build, NCCL on GPUs), ipc "
                  "(CUDA IPC, for a trainer on this server's own GPU, where NCCL refuses two ranks on one device) "
                  "or shm (shared memory, for a trainer's CPU tensors on this machine); ipc and shm take pushes from "
                  "this machine only, in parts of the trainer's bucket (vllm_weight_sync_bucket_mb) or its largest "
                  "tensor")
    add_flag(p, "--enable_lora", action="store_true",
             help="serve LoRA adapters that trainers push (PUT /adapters/NAME): one per run, beside the base model")
    add_flag(p, "--max_lora_rank", type=int, default=16, choices=LORA_RANKS,
             help="the largest adapter rank served (vLLM's; default 16)")
    add_flag(p, "--max_loras", type=int, default=4,
             help="adapters one batch mixes (vLLM's; default 4): runs sharing the server at once")
    add_flag(p, "--adapter_lease", type=float, default=600.0,
             help="seconds after its owner's last push that another run may take an adapter's name over "
                  "(default 600); until then its pushes and deletes get 409")
    add_flag(p, "--api_key", default=None, help="if set, every route but /health needs 'Authorization: Bearer KEY'")
    add_flag(p, "--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
             help="log level (default info)")
    add_flag(p, "--seed", type=int, default=0, help="engine seed (default 0)")
    add_flag(p, "--request_body_timeout", type=float, default=30.0,
             help="seconds a request body may stall before the server answers 408 and closes (default 30)")
    add_flag(p, "--weight_transfer_any_address", action="store_true",
             help="let /weights/init name any master_address, not only the requester's own IP (for trainers "
                  "behind NAT or a proxy)")
    add_flag(p, "--max_recorded_rollouts", type=int, default=DEFAULT_MAX_ROLLOUTS,
             help="agent rollouts recorded through /rollouts/{id}/v1 kept at once; the oldest are dropped beyond "
                  f"(default {DEFAULT_MAX_ROLLOUTS})")
    api = p.add_argument_group("vLLM's OpenAI API (served from vLLM's own serving layer; docs/server-flags.md)")
    add_flag(api, "--tool_call_parser", default=None, metavar="NAME",
             help="vLLM's tool-call parser for the chat routes (hermes, llama3_json, mistral, ...; vLLM's "
                  "--tool-call-parser); turns on tool_choice 'auto'. Default: none (tool calls stay text)")
    add_flag(api, "--reasoning_parser", default=None, metavar="NAME",
             help="vLLM's reasoning parser (deepseek_r1, qwen3, ...; vLLM's --reasoning-parser)")
    add_flag(api, "--chat_template", default=None, metavar="FILE",
             help="a chat template (a file or the template itself) instead of the tokenizer's")
    p.set_defaults(func=run)


def validate(args) -> None:
    """Fail before starting anything, naming the flag and the fix."""
    checks = [
        (args.tensor_parallel_size >= 1, "--tensor_parallel_size must be >= 1"),
        (args.data_parallel_size >= 1, "--data_parallel_size must be >= 1"),
        (0 < args.gpu_memory_utilization <= 1, "--gpu_memory_utilization must be in (0, 1]"),
        (args.max_model_len is None or args.max_model_len >= 16, "--max_model_len must be >= 16"),
        (1 <= args.port <= 65535, "--port must be in 1..65535"),
        (args.kv_cache_space is None or args.kv_cache_space >= 1, "--kv_cache_space must be a whole number of GiB >= 1"),
        (args.max_num_seqs is None or args.max_num_seqs >= 1, "--max_num_seqs must be >= 1"),
        (args.request_body_timeout > 0, "--request_body_timeout must be > 0 seconds"),
        (args.max_loras >= 1, "--max_loras must be >= 1"),
        (args.adapter_lease > 0, "--adapter_lease must be > 0 seconds"),
        (args.max_recorded_rollouts >= 1, "--max_recorded_rollouts must be >= 1"),
        (args.join_timeout > 0 and args.rank_timeout > 0, "--join_timeout and --rank_timeout must be > 0 seconds"),
        # The engines unpickle what an IPC push sends (CUDA IPC handles, vLLM's form): without a key, any process
        # that reaches the port could run code in them.
        (args.weight_transfer_backend != "ipc" or args.api_key is not None, "--weight_transfer_backend ipc has "
         "the engines unpickle the CUDA IPC handles a push sends, so whoever can call the server could run code "
         "in them: start it with --api_key KEY too (the trainer passes it: GRPOConfig(vllm_server_api_key=KEY))"),
    ]
    dp, local, first = args.data_parallel_size, args.data_parallel_size_local, args.data_parallel_start_rank
    checks.append((args.weight_transfer_backend not in SHARING_BACKENDS or (not args.headless and local in (None, dp)),
                   f"--weight_transfer_backend {args.weight_transfer_backend} has the engines read the trainer's "
                   "memory, so every DP rank must run on the trainer's machine: leave --data_parallel_size_local "
                   "and --headless out, or use nccl (gloo on CPUs) across machines"))
    if local is not None:
        checks.append((1 <= local <= dp, f"--data_parallel_size_local must be in 1..--data_parallel_size ({dp})"))
    if args.headless:
        checks += [
            (local is not None and local < dp, "--headless runs some of the DP ranks: give "
             "--data_parallel_size_local (this machine's) below --data_parallel_size (every node's)"),
            (first >= 1 and first + (local or 0) <= dp, f"--headless needs --data_parallel_start_rank in "
             f"1..{dp - (local or 0)}: the head has the first ranks, and this machine's end at the last"),
            (args.data_parallel_address is not None, "--headless needs --data_parallel_address: the head's "
             "address, which this machine's engines connect to"),
        ]
    else:
        checks += [
            (first == 0, "--data_parallel_start_rank is for --headless nodes: the head (with HTTP) has rank 0"),
            (local is None or local == dp or args.data_parallel_address is not None,
             f"--data_parallel_size_local {local} of {dp}: the other ranks run on other machines, which need "
             "--data_parallel_address (this machine's address, as they reach it)"),
        ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"fastgrpo vllm-serve: error: {message}")
    check_parser_names(args.tool_call_parser, args.reasoning_parser)


def check_parser_names(tool_call_parser: str | None, reasoning_parser: str | None) -> None:
    """vLLM's parsers by name: a name vLLM does not ship fails at start, listing the ones it does."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for flag, name, manager in (("--tool_call_parser", tool_call_parser, ToolParserManager),
                                ("--reasoning_parser", reasoning_parser, ReasoningParserManager)):
        known = sorted(manager.list_registered())
        if name is not None and name not in known:
            raise SystemExit(f"fastgrpo vllm-serve: error: {flag} {name!r} is not one of vLLM's: {', '.join(known)}")


def run(args) -> int:
    # Here, not at the top: the app imports vLLM and FastAPI, which `fastgrpo --help` should not wait for.
    import uvicorn

    from fastgrpo.serve.app import create_app

    validate(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = ServerSettings(
        model=resolve_model(args.model), revision=args.revision,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        data_parallel_size_local=args.data_parallel_size_local, data_parallel_start_rank=args.data_parallel_start_rank,
        data_parallel_address=args.data_parallel_address, data_parallel_rpc_port=args.data_parallel_rpc_port,
        join_timeout_s=args.join_timeout, rank_timeout_s=args.rank_timeout, load_balance=args.load_balance,
        gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype, max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        max_num_seqs=args.max_num_seqs, kv_cache_space=args.kv_cache_space, seed=args.seed,
        kv_after_push=args.kv_after_push, weight_transfer_backend=args.weight_transfer_backend,
        enable_lora=args.enable_lora, max_lora_rank=args.max_lora_rank, max_loras=args.max_loras,
        adapter_lease_s=args.adapter_lease, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, chat_template=args.chat_template,
    )
    try:  # a layout the machine cannot hold, or a backend it has not, fails here, before any engine starts
        check_devices(settings, on_cpu())
        settings.engine_backend(on_cpu())
    except ValueError as exc:
        raise SystemExit(f"fastgrpo vllm-serve: error: {exc}") from None
    if args.headless:
        return run_headless(settings, on_cpu())
    app = create_app(settings, api_key=args.api_key, body_timeout_s=args.request_body_timeout,
                     weight_transfer_any_address=args.weight_transfer_any_address,
                     max_recorded_rollouts=args.max_recorded_rollouts)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=60)
    return 0
