"""A map of the code a newcomer reads first: sizes, longest functions, and the import graph.

    python scripts/code_map.py                # the working tree
    python scripts/code_map.py --rev 666703d  # a commit (extracted with git archive)
    python scripts/code_map.py --check        # exit 1 on an import cycle or an upward import

Imports are read from the source (AST), at any depth: a function-level import is an
arrow like any other, so it cannot hide a cycle. Layers are listed below; an arrow
may point to its own layer or a lower one, and the trainer side and the server side
never point at each other (both talk through `fastgrpo.protocol` and HTTP).
"""

import argparse
import ast
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

# Lowest first. A module belongs to the first entry that is it or a package above it.
LAYERS = [
    ("base", ["fastgrpo.vllm_compat", "fastgrpo.hardware", "fastgrpo.net", "fastgrpo.models", "fastgrpo.quiet_gloo",
              "fastgrpo.cpu_lora", "fastgrpo.cliutil"]),
    # What both sides share: the weight transfer, vLLM engines in-process, the wire protocol, and the chat
    # format (the server records chat rollouts in the trainer's format).
    ("shared", ["fastgrpo.transfer", "fastgrpo.engine", "fastgrpo.placement", "fastgrpo.protocol",
                "fastgrpo.rollouts.chat", "fastgrpo.rollouts.tool_calls"]),
    ("client", ["fastgrpo.client", "fastgrpo.rollouts"]),
    ("trainer", ["fastgrpo.config", "fastgrpo.trainer", "fastgrpo.rewards"]),
    ("server", ["fastgrpo.serve"]),
    ("apps", ["fastgrpo.tasks", "fastgrpo.run", "fastgrpo.train_cli", "fastgrpo.demo", "fastgrpo.planner",
              "fastgrpo.cli", "fastgrpo"]),
]
TRAINER_SIDE = {"client", "trainer"}
SERVER_SIDE = {"server"}

# The five places issue 26 names, as (label, module, function or class.method).
WATCHED = [
    ("GRPOTrainer.__init__", "fastgrpo.trainer.grpo_trainer", "GRPOTrainer.__init__"),
    ("GRPOTrainer._generate_and_score", "fastgrpo.trainer.grpo_trainer", "GRPOTrainer._generate_and_score"),
    ("create_app", "fastgrpo.serve.app", "create_app"),
    ("grpo_loss", "fastgrpo.trainer.loss", "grpo_loss"),
    ("GRPOConfig._check", "fastgrpo.config", "GRPOConfig._check"),
]


def modules(src: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((src / "fastgrpo").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix != "fastgrpo" and (module == prefix or module.startswith(prefix + ".")):
                return rank
    return len(LAYERS) - 1  # the package itself (fastgrpo/__init__.py): the top


def imports(module: str, tree: ast.AST, known: set[str]) -> set[str]:
    """The fastgrpo modules `module` imports, at any depth."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fastgrpo import vllm_compat` names a module; `from fastgrpo import __version__` the package.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("fastgrpo") and name != module:
                targets.add(name)
    return targets


def functions(tree: ast.AST):
    """(qualified name, lines, parameters) of every function and method."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                args = child.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                count -= bool(args.args and args.args[0].arg in ("self", "cls"))
                yield name, child.end_lineno - child.lineno + 1, count
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
    yield from walk(tree, "")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def extract(rev: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="code_map-"))
    data = subprocess.run(["git", "archive", rev, "src", "README.md"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=BytesIO(data)).extractall(root, filter="data")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="a git revision to map instead of the working tree")
    parser.add_argument("--check", action="store_true", help="exit 1 on a cycle or an upward import")
    parser.add_argument("--top", type=int, default=0, help="list only the N modules with the longest functions")
    args = parser.parse_args()
    root = extract(args.rev) if args.rev else Path(__file__).resolve().parents[1]
    mods = modules(root / "src")
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in mods.items()}
    graph = {m: imports(m, t, set(mods)) for m, t in trees.items()}
    lines = {m: len(p.read_text().splitlines()) for m, p in mods.items()}

    print(f"# {args.rev or 'working tree'}: {len(mods)} modules, {sum(lines.values()):,} lines under src/, "
          f"README {len((root / 'README.md').read_text().splitlines())} lines\n")
    print("## The five places\n")
    print("| what | module lines | function lines | parameters |\n| --- | --- | --- | --- |")
    for label, module, qualname in WATCHED:
        found = {n: (ln, c) for n, ln, c in functions(trees[module])} if module in trees else {}
        ln, count = found.get(qualname, ("gone", "-"))
        print(f"| {label} | {lines.get(module, 'gone')} | {ln} | {count} |")
    trainer = trees.get("fastgrpo.trainer.grpo_trainer")
    if trainer is not None:
        cls = next(n for n in ast.walk(trainer) if isinstance(n, ast.ClassDef) and n.name == "GRPOTrainer")
        methods = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        print(f"\nGRPOTrainer: {len(methods)} methods, {cls.end_lineno - cls.lineno + 1} lines")

    up, across = [], []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = layer_of(src), layer_of(dst)
            if b > a:
                up.append((src, dst))
            sides = {LAYERS[a][0], LAYERS[b][0]}
            if sides & TRAINER_SIDE and sides & SERVER_SIDE:
                across.append((src, dst))
    found_cycles = cycles(graph)
    print("\n## Import graph\n")
    print("Layers, lowest first: " + "; ".join(f"{name} ({', '.join(p)})" for name, p in LAYERS))
    print(f"\ncycles: {len(found_cycles)}")
    for comp in found_cycles:
        print("  - " + " <-> ".join(comp))
    print(f"upward imports: {len(up)}")
    for src, dst in up:
        print(f"  - {src} -> {dst} ({LAYERS[layer_of(src)][0]} -> {LAYERS[layer_of(dst)][0]})")
    print(f"trainer side <-> server side: {len(across)}")
    for src, dst in across:
        print(f"  - {src} -> {dst}")

    print("\n## Longest function per module\n")
    rows = []
    for m in sorted(mods):
        funcs = list(functions(trees[m]))
        name, ln, _ = max(funcs, key=lambda f: f[1]) if funcs else ("-", 0, 0)
        rows.append((m, lines[m], name, ln))
    if args.top:
        rows = sorted(rows, key=lambda r: -r[3])[:args.top]
    print("| module | lines | longest function | its lines |\n| --- | --- | --- | --- |")
    for m, n, name, ln in rows:
        print(f"| {m} | {n} | {name} | {ln} |")
    return 1 if args.check and (found_cycles or up or across) else 0


if __name__ == "__main__":
    sys.exit(main())
