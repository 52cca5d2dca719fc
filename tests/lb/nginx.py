"""Run Debian's nginx as a local gRPC (or REST) load balancer over the replicas' gateways
(loopback only).

Renders deploy/nginx/ldm-grpc-lb.conf.template (NginxRestLB: ldm-rest-lb.conf.template) into a
private prefix directory and runs nginx in the foreground as a child process, so stopping it
is one signal to one PID.
"""

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from serving.triton.server import free_port
from tests.lb.tools import REPO, find

TEMPLATE = REPO / "deploy" / "nginx" / "ldm-grpc-lb.conf.template"
REST_TEMPLATE = REPO / "deploy" / "nginx" / "ldm-rest-lb.conf.template"
# A replica that failed once is skipped for this long, then probed with one request.
FAIL_TIMEOUT_S = 10


def render(prefix: Path, listen_port: int, backend_ports: list[int], template: Path = TEMPLATE) -> str:
    servers = "\n        ".join(
        f"server 127.0.0.1:{p} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;" for p in backend_ports
    )
    # @NAME@ placeholders, since nginx's own variables use $.
    values = {"PREFIX": str(prefix), "LISTEN": f"127.0.0.1:{listen_port}", "UPSTREAM_SERVERS": servers}
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    if "@" in re.sub(r"#.*", "", text):
        raise ValueError("unfilled placeholder in nginx template")
    return text


class NginxGrpcLB:
    """`with NginxGrpcLB(workdir, [p1, p2]) as lb:` then call `lb.url` (host:port)."""

    template = TEMPLATE

    def __init__(self, workdir: Path, backend_ports: list[int], port: int | None = None):
        self.prefix = Path(workdir).resolve()
        self.backend_ports = list(backend_ports)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def start(self, timeout_s: float = 15.0) -> "NginxGrpcLB":
        nginx = find("nginx")
        if nginx is None:
            raise FileNotFoundError("nginx not installed (bash deploy/ci-setup.sh)")
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(render(self.prefix, self.port, self.backend_ports, self.template))
        # -e: error log before the config is read (else nginx tries /var/log/nginx first).
        base = [nginx, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"), "-c", str(conf)]
        subprocess.run(base + ["-t", "-q"], check=True, capture_output=True, text=True)
        self.proc = subprocess.Popen(
            base + ["-g", "daemon off; master_process on;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nginx did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        # SIGQUIT = graceful shutdown of master and its worker; SIGKILL to the master only if
        # it hangs (the worker then exits on its own when the master's pipe closes).
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "NginxGrpcLB":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_entries(self) -> list[dict]:
        """Parsed access-log lines: end and start time, status, grpc status, upstream list."""
        if not self.access_log.exists():
            return []
        pattern = re.compile(
            r"^(?P<t>[\d.]+) (?P<uri>\S+) status=(?P<status>\d+) grpc=(?P<grpc>\S*) "
            r"grpc_headers=(?P<grpc_headers>\S*) rt=(?P<rt>[\d.]+) upstream=(?P<upstream>.*) upstream_status=(?P<ustatus>.*)$"
        )
        entries = []
        for line in self.access_log.read_text().splitlines():
            m = pattern.match(line)
            if m:
                d = m.groupdict()
                d["t"] = float(d["t"])  # when the call ended
                d["start"] = d["t"] - float(d["rt"])  # when nginx received it
                # the call's grpc-status wherever it was sent; "" when none reached the client
                d["grpc"] = next((g for g in (d["grpc"], d.pop("grpc_headers")) if g not in ("", "-")), "")
                # "a:1, b:2" when nginx moved the call to another replica.
                d["upstreams"] = re.findall(r"\d+\.\d+\.\d+\.\d+:\d+", d["upstream"])
                entries.append(d)
        return entries


class NginxRestLB(NginxGrpcLB):
    """The same over the gateways' REST ports; `lb.rest_url` is http://host:port."""

    template = REST_TEMPLATE

    @property
    def rest_url(self) -> str:
        return f"http://{self.url}"
