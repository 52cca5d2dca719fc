"""Starting and stopping a real tritonserver process.

Uses `tritonserver` from PATH when there is one (the NGC image), else the one in $LDM_TRITON_DIR
(a trimmed copy of the wheel's server: bin/, lib/, backends/python/ with the stub already in place;
scripts/gpu_carry.sh makes one for the lent GPU machine), else the binary inside the
`nvidia-pytriton` wheel, whose python backend needs the stub for this interpreter's version and
this interpreter's libpython first on the library path (the wheel ships one stub per Python).
A repository exported for GPU also gets the memory pool flags its placement needs.

Every server gets a control secret (serving/triton/control.py) in its environment, and its
state-changing protocols (shared memory, repository, trace and log settings) restricted to a
header whose value is a per-process random key nothing holds: the gateway and the tests need
none of them, and a caller that reaches the ports cannot register memory regions or change the
logs. Inference, health, metadata, model config and statistics stay open on the address bound.
"""

import json
import os
from pathlib import Path
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# Every port this process hands out, so it never hands one out twice: a port checked free and
# released can be free again when the next caller asks, before the server it was meant for binds it
# (a tritonserver takes seconds), and the kernel may offer it again.
_PORTS_LOCK = threading.Lock()
_PORTS_GIVEN: set[int] = set()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports, each free when checked (bound, all at once) and none handed out before by
    this process, so no two callers (a tritonserver, its gateway, a test's own `ldm serve`) ever
    get the same one, whether or not the first has bound it yet. A port handed out before is kept
    bound while the next is asked for, so the kernel offers another."""
    with _PORTS_LOCK:
        sockets, ports = [], []
        try:
            while len(ports) < n:
                if len(sockets) >= n + 1000:
                    raise RuntimeError(f"no {n} free ports not handed out before on {host}")
                s = socket.socket()
                sockets.append(s)
                s.bind((host, 0))
                port = s.getsockname()[1]
                if port not in _PORTS_GIVEN:
                    ports.append(port)
            _PORTS_GIVEN.update(ports)
            return ports
        finally:
            for s in sockets:
                s.close()


def free_port() -> int:
    return free_ports(1)[0]


def _pytriton_dir() -> Path:
    import pytriton  # the nvidia-pytriton wheel

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def _python_backend_dir() -> Path:
    """A backends/ folder whose python backend has the stub for this Python version."""
    source = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {version}")
    backends = Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm-serving")) / f"backends-py{version}"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in (source / "backends" / "python").iterdir():
        if item.is_file() and not (python / item.name).exists():
            shutil.copy2(item, python / item.name)
    if not (python / stub.name).exists():
        shutil.copy2(stub, python / stub.name)
    return backends


def repository_flags(repo) -> list:
    """The flags the repository's placement needs (pipeline.json, written by `ldm export`)."""
    from export.placement import server_flags

    info = Path(repo) / "pipeline" / "1" / "pipeline.json"
    placement = json.loads(info.read_text()).get("placement", {}) if info.is_file() else {}
    if not placement.get("gpu"):
        return []
    import torch

    return server_flags(placement, torch.cuda.device_count())


RESTRICTED_PROTOCOLS = "shared-memory,model-repository,trace,logging"
RESTRICTED_HEADER = "ldm-operator-key"


def restricted_flags() -> list:
    """Triton's flags that put RESTRICTED_PROTOCOLS behind a header value nothing is given."""
    rule = f"{RESTRICTED_PROTOCOLS}:{RESTRICTED_HEADER}={secrets.token_hex(16)}"
    return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]


def server_command_and_env(
    repo, http_port, grpc_port, metrics_port, host="127.0.0.1", log_verbose=0, exit_timeout_s=15, control_secret=None
):
    from serving.triton.control import SECRET_ENV

    env = dict(os.environ)
    if control_secret:
        env[SECRET_ENV] = control_secret
    else:  # no secret: the pipeline refuses every control message
        env.pop(SECRET_ENV, None)
    # the python-backend stub imports the project's code (serving/) from the model files
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    # the stub runs the interpreter found on PATH: this one, with its site-packages
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # torch's OpenMP threads sleep when idle instead of spinning: on cores shared with the other
    # models and the clients, spinning made a tiny-UNet torch call on 2 busy cores 20-80x slower
    # (650-3200 ms against 32-40 ms); ONNX Runtime's sessions turn spinning off for the same reason
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    binary = shutil.which("tritonserver")
    extra = repository_flags(repo)
    if binary is None:
        trimmed = os.environ.get("LDM_TRITON_DIR")
        if trimmed:
            root = Path(trimmed)
            libs, backends = [str(root / "lib")], root / "backends"
        else:
            root = _pytriton_dir()
            libs, backends = (
                [str(root.parent.parent / "nvidia_pytriton.libs"), str(root / "bin")],
                _python_backend_dir(),
            )
        binary = str(root / "bin" / "tritonserver")
        libs = [sysconfig.get_config_var("LIBDIR")] + libs
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, libs + [env.get("LD_LIBRARY_PATH")]))
        extra.append(f"--backend-directory={backends}")
    command = [
        binary,
        f"--model-repository={Path(repo).resolve()}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--allow-metrics=true",
        # on SIGTERM, how long Triton waits for requests in flight (a drain answers them first)
        f"--exit-timeout-secs={int(exit_timeout_s)}",
        f"--log-verbose={log_verbose}",
        *restricted_flags(),
        *extra,
    ]
    return command, env


def wait_until_ok(process, url: str, timeout: float, name: str, log_file=None) -> None:
    """Waits until `url` answers 200; raises when `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {process.returncode} before it was ready" + log_tail(log_file, name)
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} not ready after {timeout:.0f} s" + log_tail(log_file, name))


def log_tail(log_file, name: str, lines: int = 30) -> str:
    if not log_file or not Path(log_file).exists():
        return ""
    return f"\n--- {name} log (tail) ---\n" + "\n".join(
        Path(log_file).read_text(errors="replace").splitlines()[-lines:]
    )


class TritonServer:
    """A tritonserver child process on the given (or free) ports, with a new control secret
    unless given one."""

    def __init__(
        self,
        repo,
        http_port=None,
        grpc_port=None,
        metrics_port=None,
        host="127.0.0.1",
        log_file=None,
        exit_timeout_s: int = 15,
        control_secret: str | None = None,
    ):
        from serving.triton.control import new_secret

        self.repo = Path(repo)
        self.control_secret = control_secret or new_secret()
        self.exit_timeout_s = exit_timeout_s
        self.host = host
        spare = free_ports(3)
        self.http_port = http_port or spare[0]
        self.grpc_port = grpc_port or spare[1]
        self.metrics_port = metrics_port or spare[2]
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self):
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self):
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self):
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self, timeout: float = 180.0) -> "TritonServer":
        command, env = server_command_and_env(
            self.repo,
            self.http_port,
            self.grpc_port,
            self.metrics_port,
            self.host,
            exit_timeout_s=self.exit_timeout_s,
            control_secret=self.control_secret,
        )
        output = open(self.log_file, "ab") if self.log_file else None
        # own process group: a Ctrl-C in the terminal reaches us, and we stop the server ourselves
        self.process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        if output:
            output.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        wait_until_ok(
            self.process, f"http://{self.host}:{self.http_port}/v2/health/ready", timeout, "tritonserver", self.log_file
        )

    def stub_pids(self, model: str = "pipeline") -> list:
        """The live python-backend stub processes of `model` of this server."""
        from serving.triton.stubs import stub_pids

        assert self.process is not None, "a started server"
        return stub_pids(model, group=self.process.pid)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton waits up to its exit timeout for requests in flight), then SIGKILL of
        its whole process group; `timeout` defaults to that exit timeout plus 15 s."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(self.exit_timeout_s + 15 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            pass
        # the python-backend stubs are in the server's process group: no orphans either way
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        return self.process.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
