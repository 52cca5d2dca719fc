"""Control messages (drain, cancel, steer) reach the pipeline only with the control secret, and a
drained engine is not ready, against a real tritonserver and gateway of their own (the drain at
the end stops the engine for good).

The regressions: one KServe message with `drain_grace_s=0` and no key used to stop the engine for
good while Triton's and the gateway's readiness kept saying ready."""

import os
import queue
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.client.kserve import LdmClient, infer_inputs, request_arrays
from serving.triton.control import (
    CONTROL_PARAMETER,
    SECRET_ENV,
    SECRET_FILE_ENV,
    authorised,
    secret_from_env,
    write_secret,
)
from serving.triton.drain import DRAIN_PARAMETER, drain
from serving.triton.forwarding import CANCEL_PARAMETER
from serving.triton.server import PROJECT_ROOT
from tests.support.server_metrics import wait_for


def test_authorised_needs_the_exact_secret():
    assert authorised({CONTROL_PARAMETER: "s3cret"}, "s3cret")
    assert not authorised({CONTROL_PARAMETER: "s3cre"}, "s3cret")
    assert not authorised({}, "s3cret")
    assert not authorised({CONTROL_PARAMETER: 1}, "1")  # Triton parameters may be numbers
    assert not authorised({CONTROL_PARAMETER: ""}, None)  # a process without a secret refuses all


def test_secret_from_env_and_its_file(tmp_path):
    path = write_secret(tmp_path / "control" / "s.secret", "abc")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert secret_from_env({SECRET_FILE_ENV: str(path)}) == "abc"
    assert secret_from_env({SECRET_ENV: "xyz", SECRET_FILE_ENV: str(path)}) == "xyz"
    assert secret_from_env({}) is None


@pytest.fixture(scope="module")
def stack(tiny_repo, tmp_path_factory, triton_servers):
    """A server of this module's own: its last test drains the engine for good."""
    from serving.gateway.process import GatewayProcess

    logs = tmp_path_factory.mktemp("control-logs")
    with (
        triton_servers.running(tiny_repo, "tritonserver-control") as server,
        GatewayProcess(server.grpc_url, log_file=logs / "gateway.log", control_secret=server.control_secret) as gateway,
    ):
        yield server, gateway


def _message(url: str, parameters: dict) -> list:
    """Sends one message on a KServe gRPC stream as any client could; its answers until FINAL."""
    answers = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(
            "pipeline", infer_inputs(request_arrays("x")), parameters=parameters, enable_empty_final_response=True
        )
        got = [answers.get(timeout=60)]
        while got[-1][1] is None and not got[-1][0].get_response().parameters["triton_final_response"].bool_param:
            got.append(answers.get(timeout=60))
        return got
    finally:
        client.stop_stream()
        client.close()


def _refused(answers: list, field: str) -> bool:
    ((result, error),) = answers
    return error is not None and str(error.message()).startswith(f"[PERMISSION_DENIED] {field}:")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ldm_ready(server) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "ready", "--url", server.grpc_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_control_messages_without_the_secret_are_refused_and_the_engine_keeps_serving(stack):
    server, gateway = stack
    for secret in (None, "guessed"):
        extra = {} if secret is None else {CONTROL_PARAMETER: secret}
        assert _refused(_message(server.grpc_url, {DRAIN_PARAMETER: "0", **extra}), DRAIN_PARAMETER)
        assert _refused(_message(server.grpc_url, {CANCEL_PARAMETER: "gen-1", **extra}), CANCEL_PARAMETER)
    with LdmClient(server.grpc_url) as client:  # Triton's port without the secret: no steering
        with pytest.raises(InferenceServerException) as info:
            client.steer("no-such-generation", prompt="a blue square")
        assert info.value.status() == "PERMISSION_DENIED"
        assert client.generate("a red circle", steps=2, height=32, width=32).shape == (32, 32, 3)
    with LdmClient(server.grpc_url, control_secret=server.control_secret) as operator:  # the secret: reaches the engine
        with pytest.raises(InferenceServerException) as info:
            operator.steer("no-such-generation", prompt="a blue square")
        assert info.value.status() == "NOT_FOUND"
    assert _ready(gateway.rest_url + "/readyz") and _ldm_ready(server).returncode == 0


def test_state_changing_triton_apis_are_restricted(stack):
    server, _ = stack
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.update_log_settings({"log_verbose_level": 1})
        with pytest.raises(InferenceServerException, match="restricted"):
            http.register_system_shared_memory("region", "/ldm-probe", 64)
        assert grpc.is_model_ready("pipeline") and http.get_model_config("pipeline")["name"] == "pipeline"
    finally:
        grpc.close()
        http.close()


def test_a_drained_engine_is_not_ready(stack):
    """Last in the module: the drain stops this server's engine for good."""
    server, gateway = stack
    drain(server.grpc_url, 0.0, server.control_secret, log=lambda m: None)
    assert wait_for(lambda: not _ready(gateway.rest_url + "/readyz"), timeout=30)
    probe = _ldm_ready(server)
    assert probe.returncode == 1 and "admits nothing" in probe.stdout
    with LdmClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.generate("a red circle", steps=2)
        assert info.value.status() == "UNAVAILABLE"
