"""The import graph has no cycle and no upward arrow (scripts/code_map.py's layers), so the trainer side
never needs the server package and the reverse."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_down_and_never_cycle():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "code_map.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[run.stdout.find("## Import graph"):run.stdout.find("## Longest")]


def test_the_check_sees_an_upward_import(tmp_path):
    # The check itself can fail: a base module importing the server is caught.
    from importlib import util

    spec = util.spec_from_file_location("code_map", ROOT / "scripts" / "code_map.py")
    code_map = util.module_from_spec(spec)
    spec.loader.exec_module(code_map)
    import ast

    tree = ast.parse("def f():\n    from fastgrpo.serve.app import create_app\n")
    known = {"fastgrpo.net", "fastgrpo.serve.app", "fastgrpo.serve", "fastgrpo"}
    (target,) = code_map.imports("fastgrpo.net", tree, known)
    assert target == "fastgrpo.serve.app"
    assert code_map.layer_of(target) > code_map.layer_of("fastgrpo.net")
