"""The documentation: the MkDocs site builds with no warning, the README fits on a screen and links to files
that exist, and every benchmark says where, how and when it was measured."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
README_MAX_LINES = 200


def test_the_site_builds_strict(tmp_path):
    # --strict turns every warning into a failure: a broken link or anchor, a page missing from the nav,
    # an API object mkdocstrings cannot find, a docstring it cannot parse.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    for page in ("index.html", "benchmarks/index.html", "api/config/index.html", "api/trainer/index.html",
                 "api/client/index.html", "api/protocol/index.html", "api/transfer/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # The API pages hold the objects themselves, not just a heading.
    for page, name in [("config", "vllm_weight_sync_bucket_mb"), ("trainer", "sync_weights"),
                       ("client", "update_weights"), ("protocol", "GenerateRequest"), ("transfer", "push_weights")]:
        assert name in (tmp_path / "site" / "api" / page / "index.html").read_text(), (page, name)


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_every_relative_link_in_the_readme_exists():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [link for link in links if not re.match(r"[a-z]+:|#", link)]
    assert relative, "no relative links found: the pattern is wrong"
    missing = [link for link in relative if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_benchmark_names_its_machine_command_and_date():
    sections = re.split(r"^## ", BENCHMARKS.read_text(), flags=re.M)[1:]
    assert len(sections) >= 10, "benchmarks.md lost its sections"
    for section in sections:
        title = section.splitlines()[0]
        for label in ("**Machine:**", "**Command:**", "**Date:**"):
            assert label in section, f"benchmarks.md, {title!r}: no {label}"
        date_line = section.split("**Date:**", 1)[1].splitlines()[0]
        assert re.search(r"\b20\d\d-\d\d(-\d\d)?\b", date_line), f"benchmarks.md, {title!r}: no date"


def test_no_reference_to_a_shared_folder_outside_the_repository():
    # The project stands alone: nothing in it may point at a shared folder beside the checkout.
    needle = "../" + "shared"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    offenders = [name for name in tracked if (ROOT / name).is_file()
                 and needle in (ROOT / name).read_text(errors="ignore")]
    assert not offenders, offenders
