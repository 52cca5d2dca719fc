"""Starting and stopping a gateway process (what `ldm serve`, `ldm bench` and the tests use)."""

import os
import signal
import subprocess
import sys

from serving.triton.control import SECRET_ENV
from serving.triton.server import PROJECT_ROOT, free_ports, wait_until_ok


class GatewayProcess:
    """`ldm gateway` as a child process on the given (or free) ports."""

    def __init__(
        self,
        triton_url: str,
        rest_port=None,
        grpc_port=None,
        host="127.0.0.1",
        log_file=None,
        extra_args=(),
        control_secret: str | None = None,
    ):
        self.triton_url = triton_url
        self.control_secret = control_secret  # the pipeline's (serving/triton/control.py): steers need it
        self.host = host
        spare = free_ports(2)
        self.rest_port = rest_port or spare[0]
        self.grpc_port = grpc_port or spare[1]
        self.log_file = log_file
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list:
        return [
            sys.executable,
            "-m",
            "serving.cli",
            "gateway",
            "--triton",
            self.triton_url,
            "--host",
            self.host,
            "--rest-port",
            str(self.rest_port),
            "--grpc-port",
            str(self.grpc_port),
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0, ready: bool = True) -> "GatewayProcess":
        """Starts it; waits until it answers (and, with `ready`, until its pipeline is ready)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        if self.control_secret:
            env[SECRET_ENV] = self.control_secret
        output = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(
            self.command(), env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        if output:
            output.close()
        try:
            self.wait(ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait(self, ready: bool, timeout: float) -> None:
        wait_until_ok(
            self.process, self.rest_url + ("/readyz" if ready else "/healthz"), timeout, "ldm gateway", self.log_file
        )

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
