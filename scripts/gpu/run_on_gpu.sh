#!/usr/bin/env bash
# On the lent GPU machine, from the repo root (scripts/gpu/README.md says which call runs what):
#   bash scripts/gpu/run_on_gpu.sh stash         # keep this call's .gpu-carry/part-* in /tmp
#   bash scripts/gpu/run_on_gpu.sh import-check  # install (once) and import vLLM's entry points
#   bash scripts/gpu/run_on_gpu.sh run [ARGS]    # install, import-check, GPU tests, bench (ARGS: the bench's)
# /tmp outlives a call only while the machine stays warm (30 s after each call): make the calls
# back to back.
set -euo pipefail
shopt -s nullglob
CARRY=.gpu-carry
STASH=${GPU_CARRY_STASH:-/tmp/gpu-carry}  # parts and extra wheels, kept between warm calls
SITE=${GPU_CARRY_SITE:-/tmp/site}         # pip --target: the machine's own packages stay as they are
OUT=${OUT:-/tmp/out}                      # the device tool sets OUT; what is written there comes back
mkdir -p "$STASH/extra" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# No network there: fail at once rather than wait on Hugging Face or vLLM's usage stats.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

parts() {  # the stashed parts against the manifest; --all: fail unless every part is there
  python3 - "$STASH" "$@" <<'PY'
import hashlib, json, os, sys
stash = sys.argv[1]
m = json.load(open(os.path.join(stash, "manifest.json")))
have, missing = [], []
for p in m["parts"]:
    f = os.path.join(stash, p["name"])
    ok = os.path.exists(f) and os.path.getsize(f) == p["size"] and \
        hashlib.sha256(open(f, "rb").read()).hexdigest() == p["sha256"]
    if os.path.exists(f) and not ok:  # cut short, or left from another build
        os.remove(f)
        print(f"{p['name']}: not the manifest's, dropped")
    (have if ok else missing).append(p["name"])
extra = sorted(os.listdir(os.path.join(stash, "extra")))
print(f"carry {m['sha256'][:12]}: have {' '.join(have) or 'none'}; missing {' '.join(missing) or 'none'}"
      + (f"; extra {' '.join(extra)}" if extra else ""))
sys.exit(1 if missing and "--all" in sys.argv else 0)
PY
}

stash() {  # idempotent: a part that arrives again replaces its copy
  if [ -f "$CARRY/manifest.json" ]; then cp "$CARRY/manifest.json" "$STASH/"; fi
  if [ ! -f "$STASH/manifest.json" ]; then echo "no manifest: carry .gpu-carry/manifest.json"; exit 2; fi
  for f in "$CARRY"/part-*; do mv -f "$f" "$STASH/"; done
  for f in "$CARRY"/extra/*.whl; do cp -f "$f" "$STASH/extra/"; done
  # The machine's versions come back with the call: what a failed import check is read against.
  python3 -m pip list --format=freeze > "$OUT/pip-freeze.txt" 2>/dev/null || true
  parts
}

install() {  # once per carry: sha256, unpack, pip --target; a later call on a warm machine skips it
  [ -f "$STASH/manifest.json" ] || stash
  parts --all || { echo "resend the missing parts (scripts/gpu/README.md)"; exit 3; }
  local key
  key="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["sha256"])' "$STASH/manifest.json")"
  key="$key $(ls "$STASH/extra" | tr '\n' ' ')"
  if [ "$(cat "$SITE/.carry" 2>/dev/null)" = "$key" ]; then echo "installed already in $SITE"; return; fi
  rm -rf "$STASH/wheels" "$SITE"
  local wheels
  mapfile -t wheels < <(python3 - "$STASH" <<'PY'
import hashlib, io, json, os, re, sys, tarfile
stash = sys.argv[1]
m = json.load(open(os.path.join(stash, "manifest.json")))
data = b"".join(open(os.path.join(stash, p["name"]), "rb").read() for p in m["parts"])
if hashlib.sha256(data).hexdigest() != m["sha256"]:
    sys.exit("the joined parts do not match the manifest's sha256")
with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
    tar.extractall(stash, filter="data")
# An extra wheel replaces a carried one of the same name: two versions would stop pip.
name = lambda f: re.sub(r"[-_.]+", "_", f.split("-")[0]).lower()
extra = {name(f): os.path.join(stash, "extra", f) for f in os.listdir(os.path.join(stash, "extra"))}
carried = [os.path.join(stash, "wheels", w["name"]) for w in m["wheels"]]
print("\n".join([w for w in carried if name(os.path.basename(w)) not in extra] + sorted(extra.values())))
PY
  )
  [ "${#wheels[@]}" -gt 0 ] || { echo "nothing to install"; exit 3; }
  echo "installing ${#wheels[@]} wheels into $SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
  echo "$key" > "$SITE/.carry"
}

dist_info() {  # src/ alone has no metadata, so vLLM would not find fastgrpo's vllm.general_plugins
  python3 - "$SITE" <<'PY'
import os, sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
d = os.path.join(sys.argv[1], f"fastgrpo-{p['version']}.dist-info")
os.makedirs(d, exist_ok=True)
open(os.path.join(d, "METADATA"), "w").write(f"Metadata-Version: 2.1\nName: fastgrpo\nVersion: {p['version']}\n")
groups = {"console_scripts": p.get("scripts", {}), **p.get("entry-points", {})}
open(os.path.join(d, "entry_points.txt"), "w").write(
    "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items()))
PY
}

import_check() {  # every missing module in one call (a file: the check re-runs itself in children)
  cat > "$STASH/import_check.py" <<'PY'
"""Import vLLM's entry points (and fastgrpo's) in a child; a module missing there is stubbed in the
next child, and so on, so that one call names them all. A fresh process each time: a half-imported
vLLM leaves registered torch ops behind, which a second try in the same process trips on."""
import importlib, importlib.abc, importlib.machinery, importlib.metadata, json, subprocess, sys, traceback, types

TARGETS = ["vllm", "vllm.v1.engine.async_llm", "vllm.distributed.weight_transfer.ipc_engine",
           # what fastgrpo's GPU tests and bench import besides
           "vllm.entrypoints.llm", "fastgrpo.serve.app", "fastgrpo.trainer.grpo_trainer", "fastgrpo.run",
           "datasets", "math_verify", "gguf", "uvicorn"]
CUDA_TARGETS = ["vllm._C_stable_libtorch", "vllm.vllm_flash_attn"]  # built for torch 2.11 + CUDA 13
DIST = {"zmq": "pyzmq", "cpuinfo": "py-cpuinfo", "yaml": "pyyaml", "PIL": "pillow", "cv2": "opencv-python-headless"}
MARK = "IMPORT-CHECK "


class Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: a module nothing else finds, if named, is a package of dummy classes."""

    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)

        def attr(name):  # dunders stay absent: the import machinery and inspect probe them
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

        mod.__getattr__ = attr
        return mod

    def exec_module(self, module):
        module.__path__ = []


def child(stubs):
    sys.meta_path.append(Stubs(stubs))
    import torch
    report = {"broken": []}
    for target in TARGETS + (CUDA_TARGETS if torch.cuda.is_available() else []):
        try:
            importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and not any(e.name == n or e.name.startswith(n + ".") for n in stubs):
                print(MARK + json.dumps({"missing": e.name, "target": target}), flush=True)
                sys.exit(3)
            traceback.print_exc()
            report["broken"].append(f"{target}: {e!r}")
        except Exception as e:  # noqa: BLE001 - report it, go on to the next target
            traceback.print_exc()
            report["broken"].append(f"{target}: {type(e).__name__}: {e}")
    fa = sys.modules.get("vllm.vllm_flash_attn.flash_attn_interface")
    if fa is not None:
        report["fa"] = f"FA2 {fa.FA2_AVAILABLE} (stripped), FA3 {fa.FA3_AVAILABLE} {fa.FA3_UNAVAILABLE_REASON or ''}"
        if not fa.FA3_AVAILABLE:
            report["broken"].append("FA3 did not load")
    report["plugins"] = sorted(e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins"))
    print(MARK + json.dumps(report), flush=True)


def main():
    missing = {}
    for _ in range(20):
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(list(missing))],
                             stdout=subprocess.PIPE, text=True).stdout
        lines = [l for l in out.splitlines() if l.startswith(MARK)]
        print("\n".join(l for l in out.splitlines() if not l.startswith(MARK)))
        report = json.loads(lines[-1][len(MARK):]) if lines else {"broken": ["the child died: see above"]}
        if "missing" not in report:
            break
        missing[report["missing"]] = report["target"]
    for name, target in missing.items():
        top = name.split(".")[0]
        print(f"MISSING {name} (pip: {DIST.get(top, top)}), imported on the way to {target}")
    for b in report.get("broken", []):
        print("BROKEN", b + (" (with the missing stubbed)" if missing else ""))
    if "fa" in report:
        print(report["fa"])
    print("vllm.general_plugins:", ", ".join(report.get("plugins", [])))
    ok = not missing and not report.get("broken") and "missing" not in report
    print("import check:", "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    child(json.loads(sys.argv[2])) if sys.argv[1:2] == ["--child"] else main()
PY
  python3 "$STASH/import_check.py"
}

run() {
  install
  dist_info
  import_check 2>&1 | tee "$OUT/import.log"
  python3 -c 'import vllm, torch; print(vllm.__version__, torch.__version__, torch.cuda.get_device_name())' \
    2>&1 | tee "$OUT/versions.log"
  # Each stage has its own limit, inside the call's 600 s, so that the logs come back.
  local rc=0
  timeout -k 10 "${PYTEST_TIMEOUT_S:-280}" python3 -m pytest -m gpu -x -q tests 2>&1 | tee "$OUT/pytest.log" || rc=$?
  timeout -k 10 "${BENCH_TIMEOUT_S:-220}" python3 bench/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench.log" || rc=$?
  echo "run: exit $rc; logs in $OUT"
  return "$rc"
}

case "${1:-}" in
  stash) stash ;;
  import-check) install; dist_info; import_check 2>&1 | tee "$OUT/import.log" ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash scripts/gpu/run_on_gpu.sh stash | import-check | run [bench args]"; exit 2 ;;
esac
