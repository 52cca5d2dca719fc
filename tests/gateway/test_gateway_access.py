"""API keys (hashed at rest), the per-key token bucket, body and image limits, and the gateway's
metrics: units, then a gateway process started with keys and tight limits."""

import json
import re
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.support.server_metrics import wait_for
from serving.client.images import ImagesClient, ImagesError
from serving.gateway.access import ApiKeys, RateLimiter, hash_key, is_loopback, new_key
from serving.gateway.app import GatewayConfig
from serving.gateway.errors import ApiError
from serving.gateway.process import GatewayProcess
from serving.gateway.protos import images_pb2, images_pb2_grpc

PROMPT = "a red circle"


def test_keys_are_stored_hashed_and_identified_by_name():
    key = new_key()
    keys = ApiKeys.parse(f"# comment\nalice {hash_key(key)}\n\n", "keys")
    assert key not in repr(keys) and keys.identify(key) == "alice"
    for wrong in (None, "", key + "x"):
        with pytest.raises(ApiError) as info:
            keys.identify(wrong)
        assert info.value.code == "UNAUTHENTICATED"
    with pytest.raises(ValueError, match="keys:1"):
        ApiKeys.parse("alice plain-text-key", "keys")


def test_keys_load_from_file_and_environment(tmp_path):
    a, b = new_key(), new_key()
    path = tmp_path / "keys"
    path.write_text(f"a {hash_key(a)}\n")
    keys = ApiKeys.load(path, {"LDM_API_KEY_HASHES": f"b {hash_key(b)}"})
    assert keys.identify(a) == "a" and keys.identify(b) == "b"
    assert ApiKeys.load(None, {}) is None


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=4, clock=lambda: now[0])
    limiter.charge("k", 4)
    with pytest.raises(ApiError) as info:
        limiter.charge("k", 1)
    assert info.value.code == "RESOURCE_EXHAUSTED" and info.value.retry_after_s == pytest.approx(0.5)
    limiter.charge("other", 4)  # buckets are per caller
    now[0] = 0.5
    limiter.charge("k", 1)
    now[0] = 100.0
    limiter.charge("k", 4)  # refilled to the burst, not beyond
    with pytest.raises(ApiError):
        limiter.charge("k", 1)


def test_open_gateway_only_on_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    GatewayConfig(host="127.0.0.1").check()
    with pytest.raises(ValueError, match="API keys"):
        GatewayConfig(host="0.0.0.0").check()
    GatewayConfig(host="0.0.0.0", allow_anonymous=True).check()


KEY = new_key()
RATE, BURST = 0.2, 3


@pytest.fixture(scope="module")
def guarded(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "keys").write_text(f"tester {hash_key(KEY)}\n")
    extra = [
        "--api-keys",
        str(folder / "keys"),
        "--rate-limit",
        str(RATE),
        "--burst",
        str(BURST),
        "--max-body-mb",
        "0.01",
        "--max-image-pixels",
        "1024",
    ]
    with GatewayProcess(
        server.grpc_url, log_file=folder / "gateway.log", extra_args=extra, control_secret=server.control_secret
    ) as running:
        yield running


def rest(gateway, body, key=None, raw=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(
        gateway.rest_url + "/v1/images/generations", data=raw or json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_keys_limits_and_metrics_through_a_guarded_gateway(guarded):
    status, _, body = rest(guarded, {"prompt": PROMPT, "steps": 2})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with ImagesClient(guarded.grpc_url) as anonymous, pytest.raises(ImagesError) as info:
        anonymous.generate(PROMPT, steps=2)
    assert info.value.code == "UNAUTHENTICATED"

    status, _, body = rest(guarded, None, KEY, raw=json.dumps({"prompt": "x" * 20_000}).encode())
    assert status == 413 and body["error"]["param"] == "body"
    with ImagesClient(guarded.grpc_url, api_key=KEY) as client, pytest.raises(ImagesError) as info:
        client.generate(PROMPT, steps=2, init_image=np.zeros((40, 40, 3), np.uint8))  # 1600 > 1024 pixels
    assert (info.value.code, info.value.field) == (
        "INVALID_ARGUMENT",
        "init_image",
    ) and "1024 pixels" in info.value.message

    # the bucket holds BURST default images (one work unit each: the pipeline's default steps,
    # size and guidance): two requests of 2 and 1 images pass, the next is refused
    status, _, body = rest(guarded, {"prompt": PROMPT, "n": 2}, KEY)
    assert status == 200 and len(body["data"]) == 2
    with ImagesClient(guarded.grpc_url, api_key=KEY) as client:
        assert len(client.generate(PROMPT)) == 1
    status, headers, body = rest(guarded, {"prompt": PROMPT}, KEY)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded" and int(headers["Retry-After"]) >= 1
    channel = grpc.insecure_channel(guarded.grpc_url)
    with pytest.raises(grpc.RpcError) as info:
        images_pb2_grpc.ImagesStub(channel).Generate(
            images_pb2.GenerateRequest(prompt=PROMPT), metadata=(("authorization", f"Bearer {KEY}"),)
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rpc_status.from_call(info.value).details
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
    channel.close()

    def scrape():
        text = urllib.request.urlopen(guarded.rest_url + "/metrics").read().decode()
        return text, {(m["route"], m["code"]): float(v) for m, v in _samples(text, "ldm_gateway_requests_total")}

    # a call's outcome is counted as its handler ends, which may be just after the client has it
    assert wait_for(lambda: ("grpc.Generate", "RESOURCE_EXHAUSTED") in scrape()[1])
    text, counts = scrape()
    assert counts[("rest.generations", "UNAUTHENTICATED")] == 1 and counts[("grpc.Generate", "UNAUTHENTICATED")] == 1
    assert counts[("rest.generations", "OK")] == 1 and counts[("grpc.Generate", "OK")] == 1
    assert (
        counts[("rest.generations", "RESOURCE_EXHAUSTED")] == 1 and counts[("grpc.Generate", "RESOURCE_EXHAUSTED")] == 1
    )
    images = {m["route"]: float(v) for m, v in _samples(text, "ldm_gateway_images_total")}
    assert images == {"rest.generations": 2.0, "grpc.Generate": 1.0}
    in_flight = {m["route"]: float(v) for m, v in _samples(text, "ldm_gateway_in_flight_requests")}
    assert set(in_flight.values()) == {0.0}
    assert "ldm_gateway_request_seconds_bucket" in text and "ldm_gateway_queue_wait_seconds" in text


def test_the_sampler_list_needs_a_key_too(guarded):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(guarded.rest_url + "/v1/samplers", timeout=30)
    assert info.value.code == 401
    request = urllib.request.Request(guarded.rest_url + "/v1/samplers", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert len(json.loads(response.read())["data"]) == 8
    with ImagesClient(guarded.grpc_url) as anonymous, pytest.raises(ImagesError) as refused:
        anonymous.samplers()
    assert refused.value.code == "UNAUTHENTICATED"
    with ImagesClient(guarded.grpc_url, api_key=KEY) as client:
        assert len(client.samplers()) == 8


def _samples(text, name):
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        yield labels, match.group(2)


def test_without_a_ready_pipeline_requests_are_unavailable_with_retry_after(tmp_path):
    """A gateway whose Triton is not there (yet): not ready, health NOT_SERVING, 503 + Retry-After."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.triton.server import free_ports

    nobody, rest_port, grpc_port = free_ports(3)
    gateway = GatewayProcess(f"127.0.0.1:{nobody}", rest_port, grpc_port, log_file=tmp_path / "gateway.log").start(
        ready=False
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(gateway.rest_url + "/readyz")
        assert info.value.code == 503
        status, headers, body = rest(gateway, {"prompt": PROMPT})
        assert status == 503 and int(headers["Retry-After"]) >= 1 and body["error"]["code"] == "unavailable"
        channel = grpc.insecure_channel(gateway.grpc_url)
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="ldm.v1.Images"))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with ImagesClient(gateway.grpc_url) as client, pytest.raises(ImagesError) as error:
            client.generate(PROMPT)
        assert error.value.code == "UNAVAILABLE"
        channel.close()
    finally:
        gateway.stop()


def test_new_key_prints_a_key_and_its_hashed_line_and_open_gateways_stay_on_loopback():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "gateway", "--new-key", "alice"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    key = re.search(r"key .*: (\S+)", done.stdout).group(1)
    line = re.search(r"key file:\s+(alice sha256:[0-9a-f]{64})", done.stdout).group(1)
    assert ApiKeys.parse(line, "printed").identify(key) == "alice" and key not in line
    refused = subprocess.run(
        [sys.executable, "-m", "serving.cli", "gateway", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--allow-anonymous" in refused.stderr


def test_a_steer_or_delete_forwarded_to_a_gone_owner_is_404(tmp_path):
    """A live generation dies with its replica's gateway: forwarding to an owner whose address
    refuses the connection answers 404 (a retry never reaches it), not 503 forever."""
    from serving.triton.server import free_ports

    nobody, gone, rest_port, grpc_port = free_ports(4)
    gateway = GatewayProcess(
        f"127.0.0.1:{nobody}",
        rest_port,
        grpc_port,
        log_file=tmp_path / "gateway.log",
        extra_args=["--replica-name", "here", "--peers", f"gone=http://127.0.0.1:{gone}"],
    ).start(ready=False)
    try:
        generation = "gone." + "0" * 32
        for method, path, body in (
            ("POST", f"/v1/generations/{generation}/steer", b'{"prompt": "a blue square"}'),
            ("DELETE", f"/v1/generations/{generation}", None),
        ):
            request = urllib.request.Request(
                gateway.rest_url + path, data=body, method=method, headers={"Content-Type": "application/json"}
            )
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=30)
            answer = json.loads(info.value.read())
            assert info.value.code == 404 and "replica gone is gone" in answer["error"]["message"], answer
            assert info.value.headers["X-Ldm-Owner"] == "here"
    finally:
        gateway.stop()
