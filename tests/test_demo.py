"""The demo's generation path: a real vLLM engine (CPU build here) on a tiny fixture model."""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_generates_with_real_vllm_on_tiny_model(tiny_qwen2):
    result = subprocess.run(
        [sys.executable, "-m", "fastgrpo.cli", "demo", "--model", tiny_qwen2,
         "--num-questions", "2", "--num_generations", "3", "--max_completion_length", "16"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert len(re.findall(r"^### What is \d+ \+ \d+\?", out, flags=re.M)) == 2
    assert len(re.findall(r"^  \[\d\] ", out, flags=re.M)) == 6  # 2 questions x 3 completions
    summary = re.search(r"^6 completions, (\d+) tokens in ([\d.]+) s: (\d+) tokens/s \(vLLM, cpu\)$", out, flags=re.M)
    assert summary, out[-2000:]
    tokens = int(summary.group(1))
    assert 0 < tokens <= 6 * 16


def test_cli_version_and_help():
    from fastgrpo import __version__
    for args, expected in ((["--version"], f"fastgrpo {__version__}"), (["--help"], "demo")):
        result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and expected in result.stdout
