"""Start `fastgrpo vllm-serve` as a subprocess (demo, benchmarks, tests) and stop it cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastgrpo.hardware import pin_to_cores
from fastgrpo.net import free_port


class ServerProcess:
    """The real server in its own process group (so its engines go down with it)."""

    def __init__(self, args: list[str], log_path: str | Path, port: int | None = None,
                 cpu_cores: list[int] | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        command = [sys.executable, "-m", "fastgrpo.cli", "vllm-serve", "--port", str(self.port),
                   "--host", "127.0.0.1", *args]
        self.log.write("$ " + " ".join(command) + "\n")
        self.log.flush()
        env, saved_affinity = {**os.environ, **(env or {})}, None
        if cpu_cores is not None:
            # Give the server exactly these cores: the child inherits our affinity, and binds its DP
            # ranks' workers to disjoint shares of it (serve/engines.py, cpu_binding).
            saved_affinity = pin_to_cores(cpu_cores)
        try:
            self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            if saved_affinity is not None:
                pin_to_cores(saved_affinity)

    def wait_ready(self, timeout: float = 300) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}; its log "
                                   f"({self.log_path}) ends:\n{self.tail()}")
            try:
                response = httpx.get(self.base_url + "/health", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the server was not ready within {timeout:.0f} s; its log ends:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # the engines are children in the same group: none may outlive the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=30)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
