"""Local replicas for the load-balancing test and demo: `ldm serve` processes on loopback
ports, their Prometheus metrics, and a way to crash one the way a pod dies.

A replica is `ldm serve` plus what it starts: tritonserver (with its python-backend stubs) and
the gateway, the replica's public gRPC address, as in a pod. Its processes are recorded by PID
once it is ready, and crashing or stopping it signals exactly those PIDs.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from serving.triton.server import free_ports
from tests.lb.tools import REPO


@dataclass
class Replica:
    name: str
    http_port: int  # Triton's
    triton_grpc_port: int
    metrics_port: int
    rest_port: int  # the gateway's
    grpc_port: int  # the gateway's gRPC API: what the load balancer and the clients use
    log_path: Path
    proc: subprocess.Popen | None = None
    killed_at: float | None = None
    _members: list = field(default_factory=list, repr=False)

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, repo: Path, checkpoint: Path | None = None, env: dict | None = None) -> "Replica":
        # `python -m serving.cli` rather than the `ldm` script: the script may belong to another
        # checkout's install; this runs the code of the tree the caller imports.
        command = [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            "--repo",
            str(repo),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.triton_grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--gateway-rest-port",
            str(self.rest_port),
            "--gateway-grpc-port",
            str(self.grpc_port),
        ]
        if checkpoint is not None:
            command += ["--checkpoint", str(checkpoint)]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log.close()
        return self

    def ready(self) -> bool:
        """The gateway is ready, which it is once its Triton's pipeline is."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.ready():
                self._members = self._group_members()
                return
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready within {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _group_members(self) -> list:
        """The recorded processes plus any current descendants of `ldm serve`."""
        members = {p.pid: p for p in self._members}
        try:
            parent = psutil.Process(self.proc.pid)
            for p in [parent] + parent.children(recursive=True):
                members.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        return list(members.values())

    def crash(self, timeout_s: float = 10) -> float:
        """SIGKILL every process of the replica at once (server, stubs, launcher), as an OOM kill
        or a lost node would. Returns time.time() once its gRPC port refuses connections; the
        dead processes are reaped later, by stop()."""
        members = self._group_members()
        for p in members:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.grpc_port), timeout=0.2).close()
            except OSError:
                break
            time.sleep(0.01)
        self.killed_at = time.time()
        return self.killed_at

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (`ldm serve` shuts tritonserver down), then SIGKILL whatever is left."""
        if self.proc is None:
            return
        members = self._group_members()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(members, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def metric(self, name: str, model: str = "pipeline") -> float | None:
        """Sum of a Triton metric over the model's versions; None if unreachable/absent."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        values = [
            float(m.group(1))
            for m in re.finditer(
                rf'^{re.escape(name)}{{[^}}]*model="{re.escape(model)}"[^}}]*}} ([0-9.eE+-]+)$', text, re.M
            )
        ]
        return sum(values) if values else None


def start_replicas(
    n: int, repo: Path, workdir: Path, timeout_s: float = 120, checkpoint: Path | None = None
) -> list[Replica]:
    """Start n replicas concurrently and wait until all are ready; on failure stop them all.
    Each gateway is told its name and its peers' REST URLs (env LDM_REPLICA_NAME, LDM_PEERS),
    as a pod is (deploy/k8s), so a steer or DELETE reaching the wrong one is forwarded."""
    workdir.mkdir(parents=True, exist_ok=True)
    replicas = []
    try:
        ports = free_ports(5 * n)
        fleet = [Replica(f"replica-{i}", *ports[5 * i : 5 * i + 5], workdir / f"replica-{i}.log") for i in range(n)]
        peers = ",".join(f"{r.name}=http://127.0.0.1:{r.rest_port}" for r in fleet)
        for r in fleet:
            replicas.append(r.start(repo, checkpoint, env={"LDM_REPLICA_NAME": r.name, "LDM_PEERS": peers}))
        for r in replicas:
            r.wait_ready(timeout_s)
    except BaseException:
        stop_all(replicas)
        raise
    return replicas


def stop_all(replicas: list[Replica]) -> None:
    for r in replicas:
        r.stop()
