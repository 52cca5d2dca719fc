"""The gateway under hostile input, against a real tritonserver and gateway (with keys and a rate
limit): images are checked from their headers before anything is decoded (the issue's probe of
16 lossless WebP masks of 4096² leaves memory flat and /healthz fast), every refusal is the
documented JSON or gRPC status with the request id, and nothing refused is charged."""

import asyncio
import base64
import collections
import http.client
import io
import json
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import grpc
from PIL import Image
import pytest

from serving.client.generations import GenerationsClient
from serving.gateway.access import hash_key, new_key
from serving.gateway.process import GatewayProcess
from serving.gateway.protos import images_pb2, images_pb2_grpc
from test_gateway_live import grpc_session

PROMPT = "a small green square at the top"
KEY, PROBE_KEY = new_key(), new_key()  # PROBE_KEY: the tests that run generations (on `probing`)
BURST = 2  # KEY's whole bucket in work units: BURST default images pass only if no refusal before them was charged
MEMORY_BOUND_MB, HEALTHZ_BOUND_S = 100, 0.1  # the issue's bounds for the probe


@pytest.fixture(scope="module")
def guarded(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening")
    (folder / "keys").write_text(f"tester {hash_key(KEY)}\nprober {hash_key(PROBE_KEY)}\n")
    extra = ["--api-keys", str(folder / "keys"), "--rate-limit", "0.001", "--burst", str(BURST)]
    with GatewayProcess(server.grpc_url, log_file=folder / "gateway.log", extra_args=extra) as running:
        yield running


@pytest.fixture(scope="module")
def probing(server, tmp_path_factory):
    """The same keys without a rate limit: PROBE_KEY's generations (work units: a long one costs
    more than `guarded`'s whole bucket)."""
    folder = tmp_path_factory.mktemp("probing")
    (folder / "keys").write_text(f"tester {hash_key(KEY)}\nprober {hash_key(PROBE_KEY)}\n")
    with GatewayProcess(
        server.grpc_url, log_file=folder / "gateway.log", extra_args=["--api-keys", str(folder / "keys")]
    ) as running:
        yield running


def huge_mask() -> str:
    """A 4096x4096 lossless WebP of a few dozen bytes, base64."""
    buffer = io.BytesIO()
    Image.new("L", (4096, 4096), 255).save(buffer, format="WEBP", lossless=True, method=0, quality=0)
    return base64.b64encode(buffer.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose pixels are missing."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def post(gateway, path, raw: bytes, key=KEY, content_type="application/json", headers=None):
    """(status, headers, JSON body) of a POST."""
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {key}", **(headers or {})}
    request = urllib.request.Request(gateway.rest_url + path, data=raw, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def assert_error(answer, status: int, param: str | None):
    """The documented error shape, naming `param`, with a request id."""
    code, headers, body = answer
    assert code == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body
    assert headers.get("X-Request-Id") and headers["Content-Type"].startswith("application/json")


def replica_of(gateway) -> str:
    with urllib.request.urlopen(gateway.rest_url + "/healthz", timeout=10) as response:
        return response.headers["X-Ldm-Replica"]


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def measured(gateway, probe):
    """Runs probe() while /healthz is asked again and again: (its answer, the gateway's peak
    resident memory above its memory before, in MB, the slowest /healthz answer in s)."""
    pid = gateway.process.pid
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak (VmHWM) to the resident memory now
    before_kb = status_kb(pid, "VmRSS")
    latencies, sampling, done = [], threading.Event(), threading.Event()

    def sample():
        connection = http.client.HTTPConnection(gateway.host, gateway.rest_port, timeout=30)
        while not done.is_set():
            start = time.monotonic()
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            latencies.append(time.monotonic() - start)
            sampling.set()
        connection.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert sampling.wait(30)
        answer = probe()
        # at least one /healthz asked after the probe's answer: one overlapping its last part
        counted = len(latencies)
        while len(latencies) <= counted and sampler.is_alive():
            sampling.clear()
            sampling.wait(5)
    finally:
        done.set()
        sampler.join(60)
    growth_mb = (status_kb(pid, "VmHWM") - before_kb) / 1024
    return answer, growth_mb, max(latencies)


def test_the_issues_probe_16_huge_masks_to_an_unknown_id_leaves_memory_flat_and_healthz_fast(probing):
    mask = huge_mask()
    body = json.dumps({"regions": [{"prompt": "x", "mask": mask}] * 16}).encode()
    assert len(body) < 15_000
    unknown = f"{replica_of(probing)}.{'0' * 32}"
    answer, growth_mb, slowest_s = measured(
        probing, lambda: post(probing, f"/v1/generations/{unknown}/steer", body, key=PROBE_KEY)
    )
    assert_error(answer, 404, None)
    print(f"probe: +{growth_mb:.1f} MB peak, slowest /healthz {slowest_s * 1000:.1f} ms")
    assert growth_mb <= MEMORY_BOUND_MB and slowest_s <= HEALTHZ_BOUND_S


def test_huge_masks_for_a_running_generation_are_refused_from_their_headers(probing):
    """The owner's own generation: 16 regions are over the pipeline's 8; 8 masks of 4096² are
    over the request's pixel budget. Neither is decoded; the generation runs on."""
    mask = huge_mask()

    async def scenario():
        async with GenerationsClient(probing.rest_url, api_key=PROBE_KEY) as client:
            async with client.start({"prompt": PROMPT, "steps": 150, "size": "64x64", "seed": 1}) as live:
                answers = []
                for regions in (16, 8):
                    body = json.dumps({"regions": [{"prompt": "x", "mask": mask}] * regions}).encode()
                    path = f"/v1/generations/{live.id}/steer"
                    answers.append(
                        await asyncio.to_thread(
                            measured, probing, lambda path=path, body=body: post(probing, path, body, key=PROBE_KEY)
                        )
                    )
                await client.cancel(live.id)
                return answers

    (count, count_mb, _), (pixels, pixels_mb, _) = asyncio.run(asyncio.wait_for(scenario(), 240))
    assert_error(count, 400, "regions.prompt")
    assert "at most 8 regions" in count[2]["error"]["message"]
    assert_error(pixels, 413, "regions.mask")
    # memory only: /healthz's time here is shared with the running generation on the same cores
    assert max(count_mb, pixels_mb) <= MEMORY_BOUND_MB


def refused(gateway, method: str, request):
    """(status code, fields named by its BadRequest, request id) of a refused gRPC call
    (Generate, or GenerateStream read to its end)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with grpc.insecure_channel(gateway.grpc_url) as channel:
        call = getattr(images_pb2_grpc.ImagesStub(channel), method)
        with pytest.raises(grpc.RpcError) as info:
            answer = call(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
            if method == "GenerateStream":
                list(answer)
    fields = []
    for detail in rpc_status.from_call(info.value).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return info.value.code(), fields, dict(info.value.trailing_metadata() or ()).get("x-request-id")


def test_hostile_inputs_are_coded_errors_naming_the_field_and_nothing_refused_is_charged(guarded):
    generations = "/v1/images/generations"
    assert_error(post(guarded, generations, json.dumps({"prompt": PROMPT, "size": "\u00b2x64"}).encode()), 400, "size")
    assert_error(
        post(guarded, generations, json.dumps({"prompt": PROMPT, "size": "9" * 5000 + "x64"}).encode()), 400, "size"
    )
    # a lone surrogate, as JSON may spell it; json.dumps writes it escaped
    assert_error(post(guarded, generations, b'{"prompt": "a \\ud800 cat", "steps": 2}'), 400, "prompt")
    assert_error(post(guarded, "/v1/generations", b'{"prompt": "a \\ud800 cat", "steps": 2}'), 400, "prompt")
    # refused by the pipeline (its prompt schedule), after the gateway admitted it
    answer = post(guarded, generations, json.dumps({"prompt": f"[a:b:{'9' * 400}]", "steps": 2}).encode())
    assert_error(answer, 400, "prompt")
    assert "too large" in answer[2]["error"]["message"]
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(post(guarded, generations, deep), 400, "body")
    assert_error(post(guarded, "/v1/generations", deep), 400, "body")
    bomb = png_header_only(20_000, 20_000)
    boundary = "hardening"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{PROMPT}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bomb.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + bomb
        + f"\r\n--{boundary}--\r\n".encode()
    )
    assert_error(
        post(guarded, "/v1/images/edits", form, content_type=f"multipart/form-data; boundary={boundary}"), 413, "image"
    )
    live = {"prompt": PROMPT, "steps": 2, "init_image": base64.b64encode(bomb).decode()}
    assert_error(post(guarded, "/v1/generations", json.dumps(live).encode()), 413, "init_image")

    for request, field in (
        (images_pb2.GenerateRequest(prompt=PROMPT, steps=2, task=99), "task"),
        (images_pb2.GenerateRequest(prompt=PROMPT, steps=2, output_format=7), "output_format"),
        (
            images_pb2.GenerateRequest(prompt=PROMPT, steps=2, region_mode=5, regions=[images_pb2.Region(prompt="x")]),
            "region_mode",
        ),
        (images_pb2.GenerateRequest(prompt=PROMPT, steps=2, init_image=bomb), "init_image"),
        (images_pb2.GenerateRequest(prompt=f"[a:b:{'9' * 400}]", steps=2), "prompt"),
    ):
        for method in ("Generate", "GenerateStream"):
            code, fields, rid = refused(guarded, method, request)
            assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]) and rid, (method, field)

    # every token is still there: a request for the whole bucket passes
    status, _, body = post(
        guarded, generations, json.dumps({"prompt": PROMPT, "n": BURST}).encode()
    )  # one work unit each
    assert status == 200 and len(body["data"]) == BURST, body


def test_a_session_acknowledges_hostile_steers_and_still_hears_its_cancel(probing):
    """A decompression-bomb mask and an unknown enum value are acknowledged INVALID_ARGUMENT
    naming the field (the reader reads on), and the later cancel ends the call CANCELLED."""
    hostile = [
        images_pb2.Steer(mask=png_header_only(20_000, 20_000)),
        images_pb2.Steer(region_mode=9, regions=[images_pb2.Region(prompt="x")], region_divisions="1"),
    ]

    def on_event(event, send):
        kind = event.WhichOneof("event")
        if kind == "progress" and event.progress.step == 1:
            for steer in hostile:
                send(images_pb2.SessionRequest(steer=steer))
        if kind == "steer_ack" and event.steer_ack.sequence == len(hostile):
            send(images_pb2.SessionRequest(cancel=images_pb2.Cancel()))

    start = images_pb2.GenerateRequest(prompt=PROMPT, steps=150, height=64, width=64, seed=2)
    events, code = grpc_session(
        probing,
        [images_pb2.SessionRequest(start=start)],
        on_event,
        metadata=(("authorization", f"Bearer {PROBE_KEY}"),),
    )
    acks = [
        (e.steer_ack.sequence, e.steer_ack.error_code, e.steer_ack.field)
        for e in events
        if not isinstance(e, grpc.RpcError) and e.WhichOneof("event") == "steer_ack"
    ]
    assert acks == [(1, "INVALID_ARGUMENT", "mask"), (2, "INVALID_ARGUMENT", "region_mode")]
    assert code == grpc.StatusCode.CANCELLED


def test_a_sessions_reader_survives_an_uncoded_steer_failure_and_dies_loudly(server):
    """The Session against a real tritonserver, in this process, with a fault injected where
    nobody coded an error: a steer whose reading raises is acknowledged INTERNAL and the reader
    reads on (the later cancel ends the call CANCELLED); a message stream that itself raises
    ends the call INTERNAL with the request id, not a call that runs on deaf."""
    from serving.gateway import grpc_api, grpc_session
    from serving.gateway.errors import ApiError
    from serving.gateway.pipeline import PipelineClient
    from serving.gateway.service import ImageService
    from serving.gateway.telemetry import Outcome

    start = images_pb2.SessionRequest(start=images_pb2.GenerateRequest(prompt=PROMPT, steps=150, height=64, width=64))

    def faulty_steer(steer):
        raise RuntimeError("a fault nobody coded")

    async def run(messages):
        """The call's events and the ApiError it ended with; messages(arrived) feeds it, arrived[kind]
        is set once an event of that kind came."""
        service = ImageService(PipelineClient(server.grpc_url))
        assert await service.pipeline.load_model()
        service.ready = True
        events, ended, arrived = [], None, collections.defaultdict(asyncio.Event)
        try:
            async for event in grpc_session.session(
                service,
                messages(arrived),
                "tester",
                "rid-1",
                Outcome(),
                lambda request: grpc_api.to_generation(request, True),
                faulty_steer,
                grpc_api.to_message,
            ):
                events.append(event)
                arrived[event.WhichOneof("event")].set()
        except ApiError as error:
            ended = error
        finally:
            await service.pipeline.close()
        return events, ended

    async def steer_then_cancel(arrived):
        yield start
        await arrived["progress"].wait()
        yield images_pb2.SessionRequest(steer=images_pb2.Steer(prompt="x"))
        await arrived["steer_ack"].wait()
        yield images_pb2.SessionRequest(cancel=images_pb2.Cancel())

    events, ended = asyncio.run(asyncio.wait_for(run(steer_then_cancel), 120))
    (ack,) = [e.steer_ack for e in events if e.WhichOneof("event") == "steer_ack"]
    assert ack.error_code == "INTERNAL" and "rid-1" in ack.error_message
    assert ended is not None and ended.code == "CANCELLED"

    async def breaks_after_start(arrived):
        yield start
        await arrived["progress"].wait()
        raise RuntimeError("the transport broke in a way nobody coded")

    events, ended = asyncio.run(asyncio.wait_for(run(breaks_after_start), 120))
    assert ended is not None and ended.code == "INTERNAL" and "rid-1" in ended.message
    assert not any(e.WhichOneof("event") == "image" for e in events)
