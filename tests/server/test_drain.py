"""Graceful drain of `ldm serve` on SIGTERM, against the real thing: `ldm serve` (tritonserver
and the gateway beside it) in its own process, long generations in flight, then SIGTERM.

The drain stops admitting at once (the gateway is not ready, new requests to Triton get
UNAVAILABLE), the generations in flight finish (or, past the grace, get UNAVAILABLE), every
request gets exactly one final answer, and no process of the tree is left."""

import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

from serving.client.kserve import LdmClient, infer_inputs, request_arrays
from serving.triton.server import PROJECT_ROOT, free_ports
from tests.support.server_metrics import wait_for

LONG = dict(steps=150, height=64, width=64, progress_every=1)  # the tiny model's step cap, largest size


class Serve:
    """`ldm serve` as a child process; its stdout lines are kept for waiting on."""

    def __init__(self, repo, log, grace_s: float, gateway: bool):
        self.http, self.grpc, self.metrics, self.rest, self.gateway_grpc = free_ports(5)
        command = [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            "--repo",
            str(repo),
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
            "--log-file",
            str(log),
            "--drain-grace-s",
            str(grace_s),
        ]
        command += (
            ["--gateway-rest-port", str(self.rest), "--gateway-grpc-port", str(self.gateway_grpc)]
            if gateway
            else ["--no-gateway"]
        )
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip())

    def wait_line(self, prefix: str, timeout: float = 180.0) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line starting {prefix!r}; seen: {self.seen[-20:]}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def tree(self) -> list:
        root = psutil.Process(self.process.pid)
        return [root] + root.children(recursive=True)

    def kill(self):
        for p in self.tree() if self.process.poll() is None else []:
            p.kill()


class Stream:
    """One generation on its own gRPC stream to `pipeline`, recording every response until the
    stream ends (the server exits): so a second final answer would be seen. The stream's own
    end (tritonserver gone) is a transport error, kept apart from the pipeline's answers."""

    def __init__(self, url: str, seed: int):
        self.progress, self.images, self.errors, self.transport_errors = threading.Event(), [], [], []
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._on_response)
        inputs = infer_inputs(request_arrays("a red circle", seed=seed, **LONG))
        self.client.async_stream_infer("pipeline", inputs, request_id=str(seed))

    def _on_response(self, result, error):
        if error is not None and str(error).startswith("[StatusCode."):
            self.transport_errors.append(str(error))  # the stream itself ended (the server exited)
        elif error is not None:
            self.errors.append(str(error))  # the pipeline's coded answer
        elif result.as_numpy("image") is not None:
            self.images.append(result.as_numpy("image"))
        else:
            self.progress.set()

    @property
    def answers(self) -> int:
        return len(self.images) + len(self.errors)

    def close(self):
        self.client.stop_stream()
        self.client.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _status(fn) -> str:
    try:
        fn()
    except Exception as exc:
        status = getattr(exc, "status", None)
        return str(status()) if callable(status) else type(exc).__name__
    return "image"


def _start_streams(serve, n: int) -> list:
    streams = [Stream(f"127.0.0.1:{serve.grpc}", seed) for seed in range(n)]
    for stream in streams:
        assert stream.progress.wait(120), "a generation never started"
    return streams


def _end(serve, streams, tree) -> None:
    """`ldm serve` exits 0, every stream ends, no process of the tree is left."""
    assert serve.process.wait(120) == 0, serve.seen[-20:]
    serve.wait_line("stopped", timeout=10)
    for stream in streams:
        stream.close()
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"


def test_sigterm_stops_admitting_and_finishes_the_generations_in_flight(tiny_repo, tmp_path):
    serve = Serve(tiny_repo, tmp_path / "tritonserver.log", grace_s=120, gateway=True)
    streams = []
    try:
        serve.wait_line("ready", timeout=240)
        assert _ready(f"http://127.0.0.1:{serve.rest}/readyz")
        streams = _start_streams(serve, 4)
        tree = serve.tree()
        assert any(p.name() == "tritonserver" for p in tree) and len(tree) >= 4

        serve.process.send_signal(signal.SIGTERM)
        serve.wait_line("draining: admitting nothing", timeout=60)
        # admits nothing: the gateway reports not ready, new requests to Triton get UNAVAILABLE
        # over its gRPC stream and over HTTP (the unary front), while the four are in flight
        assert wait_for(lambda: not _ready(f"http://127.0.0.1:{serve.rest}/readyz"), timeout=10)
        assert any(s.answers == 0 for s in streams), "the generations ended before the checks: make them longer"
        with (
            LdmClient(f"127.0.0.1:{serve.grpc}") as grpc,
            LdmClient(f"127.0.0.1:{serve.http}", protocol="http") as http,
        ):
            assert _status(lambda: grpc.generate("a red circle", steps=2)) == "UNAVAILABLE"
            assert _status(lambda: http.generate("a red circle", steps=2)) == "UNAVAILABLE"

        line = serve.wait_line("drained in", timeout=120)
        _end(serve, streams, tree)
        for stream in streams:  # each finished, with one image and nothing else
            assert (len(stream.images), stream.errors) == (1, []), line
            assert stream.images[0].shape == (64, 64, 3) and stream.images[0].dtype == np.uint8
    finally:
        serve.kill()


def test_a_grace_shorter_than_the_work_fails_the_rest_with_unavailable_once(tiny_repo, tmp_path):
    serve = Serve(tiny_repo, tmp_path / "tritonserver.log", grace_s=0, gateway=False)
    streams = []
    try:
        serve.wait_line("ready", timeout=240)
        streams = _start_streams(serve, 8)
        tree = serve.tree()
        serve.process.send_signal(signal.SIGTERM)
        serve.wait_line("drained in", timeout=60)
        _end(serve, streams, tree)
        for stream in streams:  # exactly one final answer each, an image or UNAVAILABLE
            assert stream.answers == 1, (stream.images, stream.errors)
            assert all("[UNAVAILABLE] server is shutting down" in e for e in stream.errors), stream.errors
        # 8 x 150 steps at 64x64: the drain (grace 0) comes long before they could all finish
        assert sum(len(s.errors) for s in streams) >= 1
    finally:
        serve.kill()


def test_a_dead_pipeline_stub_stops_the_replica_for_its_supervisor_to_restart(tiny_repo, tmp_path):
    # Triton 2.51 neither restarts a dead python stub nor reports its model unready
    # (tests/server/test_faults.py): `ldm serve` notices and exits 1 with nothing left running
    serve = Serve(tiny_repo, tmp_path / "tritonserver.log", grace_s=120, gateway=False)
    try:
        serve.wait_line("ready", timeout=240)
        tree = serve.tree()
        [stub] = [p for p in tree if any(a.endswith("/pipeline/1/model.py") for a in p.cmdline())]
        check = [sys.executable, "-m", "serving.cli", "stub-check", "--model=pipeline"]  # the k8s liveness probe
        assert (
            subprocess.run(check, capture_output=True, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))).returncode
            == 0
        )
        stub.kill()
        serve.wait_line("the pipeline's python stub", timeout=60)
        assert serve.process.wait(60) == 1
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
        # (other servers of this test session may be running: ask for a model only that one has)
        missing = check[:-1] + ["--model=no-such-model"]
        assert (
            subprocess.run(missing, capture_output=True, env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))).returncode
            == 1
        )
    finally:
        serve.kill()
