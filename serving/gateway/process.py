"""Starting and stopping a gateway process (what `ldm serve`, `ldm bench` and the tests use)."""
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
import urllib.request

from serving.triton.server import PROJECT_ROOT, free_port


class GatewayProcess:
    """`ldm gateway` as a child process on the given (or free) ports."""

    def __init__(self, triton_url: str, rest_port=None, grpc_port=None, host="127.0.0.1", log_file=None, extra_args=()):
        self.triton_url = triton_url
        self.host = host
        self.rest_port = rest_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.log_file = log_file
        self.extra_args = list(extra_args)
        self.process = None

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list:
        return [sys.executable, "-m", "serving.cli", "gateway", "--triton", self.triton_url, "--host", self.host,
                "--rest-port", str(self.rest_port), "--grpc-port", str(self.grpc_port), *self.extra_args]

    def start(self, timeout: float = 60.0, ready: bool = True) -> "GatewayProcess":
        """Starts it; waits until it answers (and, with `ready`, until its pipeline is ready)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        output = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(self.command(), env=env, stdout=output, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if output:
            output.close()
        try:
            self.wait(ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait(self, ready: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        path = "/readyz" if ready else "/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ldm gateway exited with code {self.process.returncode}" + self._log_tail())
            try:
                with urllib.request.urlopen(self.rest_url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"ldm gateway not {'ready' if ready else 'answering'} after {timeout:.0f} s" + self._log_tail())

    def _log_tail(self) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return ""
        return "\n--- gateway log (tail) ---\n" + "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-30:])

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM (the gateway drains, 30 s at most by default), then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
