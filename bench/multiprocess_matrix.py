"""Several training processes against one: the layout matrix, as a table.

Each layout trains a tiny Qwen2 in server mode (the real `fastgrpo vllm-serve`, vLLM's CPU build) under
`accelerate launch` (gloo) and, where the layout must not change the mathematics, once more as one process
holding every row; it compares advantages, gradients and losses step by step. Every launch runs under a
wall-clock limit and a rank that hangs dumps its stacks (tests/scripts/train_layout.py), so a hang is a
failed row that says where each rank waited. FSDP2 on CPUs: accelerate enables FSDP only on GPUs, so the
script flips that one gate (see train_layout.fsdp_on_cpu); the sharding is torch's real FSDP2 over gloo.
DeepSpeed ZeRO-3 is not in the matrix: it is not part of the CPU install (docs/multi-process.md).

    python bench/multiprocess_matrix.py [--only SUBSTRING] [--json out.json]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scripts"))

from layouts import GRAD_RTOL, MATRIX, run_layout  # noqa: E402

from fastgrpo.models import build_tiny_model  # noqa: E402
from fastgrpo.serve.launcher import ServerProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the layouts whose name contains this")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    layouts = [m for m in MATRIX if not args.only or args.only in m.name]
    folder = Path(tempfile.mkdtemp(prefix="fastgrpo-matrix-"))
    model = build_tiny_model(folder / "tiny", arch="qwen2")
    servers = {}
    for lora in sorted({m.lora_server for m in layouts}):
        extra = ["--enable_lora", "--max_lora_rank", "8"] if lora else []
        servers[lora] = ServerProcess(["--model", model, "--dtype", "float32", "--max-model-len", "256", *extra],
                                      folder / f"server-{int(lora)}.log")
    rows = []
    try:
        for server in servers.values():
            server.wait_ready()
        for i, layout in enumerate(layouts):
            port = int(servers[layout.lora_server].base_url.rsplit(":", 1)[1])
            row = run_layout(layout, model, port, folder / f"layout-{i}")
            rows.append(row)
            print(f"{'pass' if row['passed'] else 'FAIL'}  {layout.name}  ({row['seconds']:.0f} s)", flush=True)
            if not row["passed"]:
                print(row.get("error", ""), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print()
    print(f"| layout | processes x rows | steps | wall s (split run) | max advantage diff | gradient rel. diff "
          f"(< {GRAD_RTOL:g}) | loss rel. diff | result |")
    print("|---|---|---|---|---|---|---|---|")
    for row, layout in zip(rows, layouts):
        if "gradient" in row:
            numbers = f"{row['advantage']:.1e} | {row['gradient']:.1e} | {row['loss']:.1e}"
        else:
            numbers = f"- | - | - ({layout.why_not_exact or 'see error'})"
        result = "pass" if row["passed"] else ("HANG" if row["hung"] else "FAIL")
        print(f"| {layout.name} | {row['processes']} x {row['rows_per_process']} | {row.get('steps', '-')} | "
              f"{row['seconds']:.0f} | {numbers} | {result} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.exit(0 if all(r["passed"] for r in rows) else 1)


if __name__ == "__main__":
    main()
