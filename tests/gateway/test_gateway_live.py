"""Live generations through the gateway against a real tritonserver: REST `/v1/generations`
(server-sent events, steer, DELETE) and the gRPC Session: events in order, steers acknowledged
and reported at a step, cancellation, 404 / 409 / 400 naming the field, the page's routes, and
the server serving on afterwards."""

import asyncio
import base64
import io
import json
import re
import urllib.error
import urllib.request

import grpc
import numpy as np
from PIL import Image as PILImage
import pytest

from serving.client.generations import GenerationError, GenerationsClient
from serving.client.kserve import LdmClient
from serving.gateway.protos import images_pb2, images_pb2_grpc
from tests.support.server_metrics import idle_metrics, metrics, wait_for

PROMPT = "a small green square at the top"
OTHER = "a large red circle on the left"
LONG = {"prompt": PROMPT, "steps": 150, "size": "64x64", "seed": 3}  # runs long enough to act on mid-way


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 240))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


async def collect(live, act=None) -> list:
    """All events of a stream; `act(event)` is awaited for each as it comes."""
    events = []
    async for event in live:
        events.append(event)
        if act is not None:
            await act(event)
    return events


def test_rest_stream_is_created_progress_with_previews_then_tritons_image(gateway, server):
    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            async with client.start({"prompt": PROMPT, "seed": 21, "steps": 6, "size": "32x48"}) as live:
                return live, await collect(live)

    live, events = run(scenario())
    assert re.fullmatch(r"[a-z0-9-]+\.[0-9a-f]{32}", live.id) and live.headers["Content-Type"] == "text/event-stream"
    assert [e.name for e in events] == ["generation.created"] + ["generation.progress"] * 5 + ["generation.completed"]
    assert events[0].data == {"id": live.id, "seed": 21, "total_steps": 6}
    progress = [e.data for e in events[1:-1]]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5] and {p["id"] for p in progress} == {live.id}
    # preview_every defaults to 2
    assert [p["step"] for p in progress if "preview_b64" in p] == [2, 4]
    assert pixels(progress[1]["preview_b64"]).shape == (48, 32, 3)
    done = events[-1].data
    assert done["seed"] == 21 and done["output_format"] == "png" and done["timings"]["total_s"] > 0
    with LdmClient(server.grpc_url) as kserve:
        np.testing.assert_array_equal(
            pixels(done["b64_json"]), kserve.generate(PROMPT, seed=21, steps=6, height=48, width=32)
        )


def test_rest_steer_is_acknowledged_then_reported_at_the_step_that_used_it(gateway):
    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            async with client.start(LONG) as live:
                acks, first_used = [], []

                async def act(event):
                    if event.name == "generation.progress" and not acks:
                        acks.append(
                            (event.data["step"], (await client.steer(live.id, prompt=OTHER, guidance_scale=3.0))[0])
                        )
                    if event.name == "generation.steered" and event.data["steer_id"] == 1:
                        first_used.append(event.data["step"])
                    # the second steer once the first was used (progress events can be buffered
                    # behind the client: a step count alone does not say the first has applied)
                    if event.name == "generation.progress" and len(acks) == 1 and first_used:
                        acks.append((event.data["step"], (await client.steer(live.id, negative_prompt="blurry"))[0]))
                    if event.name == "generation.steered" and event.data["steer_id"] == 2:
                        await client.cancel(live.id)  # seen both: no need to run 150 steps

                return acks, await collect(live, act)

    acks, events = run(scenario())
    (step_1, ack_1), (step_2, ack_2) = acks
    assert ack_1 == {"id": ack_1["id"], "steer_id": 1} and ack_2["steer_id"] == 2
    steered = [e.data for e in events if e.name == "generation.steered"]
    assert [s["steer_id"] for s in steered] == [1, 2]
    # a steer sent after step k was done is first used by step k or later (0-based index k)
    assert steered[0]["step"] >= step_1 and steered[1]["step"] >= step_2 > steered[0]["step"]
    # the steered event comes before the progress event of that step
    names = [(e.name, e.data.get("step")) for e in events]
    first = names.index(("generation.steered", steered[0]["step"]))
    assert names[first + 1] == ("generation.progress", steered[0]["step"] + 1)
    assert events[-1].name == "error" and events[-1].data["error"]["code"] == "cancelled"


def test_rest_delete_cancels_and_later_calls_answer_409(gateway, server):
    # earlier tests' generations, running or queued, are gone (and counted: the metrics are copied all at once)
    assert wait_for(lambda: (lambda m: m["ldm_active_requests"] == m["ldm_queue_length"] == 0)(metrics(server)))
    before = idle_metrics(server)["ldm_cancellations_total"]

    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            async with client.start(LONG) as live:
                answers = []

                async def act(event):
                    if event.name == "generation.progress" and not answers:
                        answers.append(await client.cancel(live.id))

                events = await collect(live, act)
            late = []
            for call in (client.cancel(live.id), client.steer(live.id, prompt=OTHER)):
                with pytest.raises(GenerationError) as info:
                    await call
                late.append(info.value)
            return live, answers, events, late

    live, ((answer, headers),), events, late = run(scenario())
    assert answer == {"id": live.id, "status": "cancelled"}
    assert headers["X-Ldm-Replica"] == headers["X-Ldm-Owner"]
    assert events[-1].name == "error" and events[-1].data["error"]["code"] == "cancelled"
    assert "generation.completed" not in [e.name for e in events]
    assert [(e.status, e.code) for e in late] == [(409, "failed_precondition")] * 2
    # at least: an earlier test's cancelled generation may still be counted meanwhile (exact
    # one-answer counts are tests/server/test_faults.py's)
    assert wait_for(lambda: metrics(server)["ldm_cancellations_total"] >= before + 1), (before, metrics(server))
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] == 0)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/generations/{replica}.0123456789abcdef0123456789abcdef",
        "/v1/generations/no-such-replica.0123456789abcdef0123456789abcdef",
        "/v1/generations/example.com:80%2Fsteal",
    ],
)
def test_unknown_ids_are_404(gateway, path):
    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            replica = (await client.session.get(gateway.rest_url + "/healthz")).headers.get("X-Ldm-Replica")
            url = path.format(replica=replica).removeprefix("/v1/generations/")
            failures = []
            for call in (client.steer(url, prompt=OTHER), client.cancel(url)):
                with pytest.raises(GenerationError) as info:
                    await call
                failures.append(info.value)
            return failures

    for failure in run(scenario()):
        assert failure.status == 404 and failure.code == "not_found", failure.body
        assert failure.body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"n": 2}, "n", "one image"),
        ({"steps": 0}, "steps", "[1, 150]"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"size": "36x32"}, "size", "multiple of 8"),
        ({"output_format": "gif"}, "output_format", "png"),
        ({"colour": "red"}, "colour", "colour"),
        ({"guidance_scale": "high"}, "guidance_scale", "guidance_scale"),
        ({"seed": -1}, "seed", "seed"),
    ],
)
def test_bad_start_is_400_naming_the_field_and_the_gateway_serves_on(gateway, body, param, text):
    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            with pytest.raises(GenerationError) as info:
                async with client.start({"prompt": PROMPT, "steps": 2, **body}):
                    pass
            async with client.start({"prompt": PROMPT, "steps": 2}) as live:
                return info.value, [e.name for e in await collect(live)]

    error, names = run(scenario())
    assert error.status == 400 and error.param == param and text in error.body["error"]["message"], error.body
    assert names[-1] == "generation.completed"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": 3}, "prompt"),
        ({"steps": 4}, "steps"),
        ({}, "body"),
    ],
)
def test_bad_steer_is_400_naming_the_field_and_the_generation_goes_on(gateway, fields, param):
    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            async with client.start({**LONG, "steps": 12}) as live:
                errors = []

                async def act(event):
                    if event.name == "generation.progress" and not errors:
                        with pytest.raises(GenerationError) as info:
                            await client.steer(live.id, **fields)
                        errors.append(info.value)

                return errors, await collect(live, act)

    (error,), events = run(scenario())
    assert error.status == 400 and error.param == param, error.body
    assert events[-1].name == "generation.completed"


def test_steer_refused_by_the_pipeline_names_the_field(gateway):
    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            async with client.start(LONG) as live:
                errors = []

                async def act(event):
                    if event.name == "generation.progress" and not errors:
                        with pytest.raises(GenerationError) as info:
                            await client.steer(live.id, guidance_scale=1e9)
                        errors.append(info.value)
                        await client.cancel(live.id)

                await collect(live, act)
                return errors

    (error,) = run(scenario())
    assert error.status == 400 and error.param == "guidance_scale", error.body


def grpc_session(gateway, messages, on_event, metadata=()):
    """Runs a Session: `messages` feeds the call (a queue.Queue of SessionRequest, None ends
    it); on_event(event, send) sees each event. Returns (events, final status code); a call that
    ends with an error has it as its last event."""
    import queue

    inbox = queue.Queue()
    for message in messages:
        inbox.put(message)

    def requests():
        while (message := inbox.get()) is not None:
            yield message

    events = []
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        call = images_pb2_grpc.ImagesStub(channel).Session(requests(), metadata=metadata, timeout=240)
        try:
            for event in call:
                events.append(event)
                on_event(event, inbox.put)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            events.append(error)
        finally:
            inbox.put(None)
    return events, code


def start(**fields):
    return images_pb2.SessionRequest(start=images_pb2.GenerateRequest(**fields))


def test_grpc_session_steers_reports_the_step_and_cancels(gateway):
    sent = []

    def on_event(event, send):
        kind = event.WhichOneof("event")
        if kind == "progress" and not sent:
            sent.append(event.progress.step)
            send(images_pb2.SessionRequest(steer=images_pb2.Steer(prompt=OTHER)))
        if kind == "steered":
            send(images_pb2.SessionRequest(steer=images_pb2.Steer(guidance_scale=float("nan"))))
        if kind == "steer_ack" and event.steer_ack.sequence == 2:
            send(images_pb2.SessionRequest(cancel=images_pb2.Cancel()))

    events, code = grpc_session(gateway, [start(prompt=PROMPT, steps=150, height=64, width=64, seed=4)], on_event)
    assert code == grpc.StatusCode.CANCELLED
    kinds = [e.WhichOneof("event") for e in events[:-1]]
    assert kinds[0] == "started" and kinds[1] == "progress" and "image" not in kinds
    started = events[0].started
    assert re.fullmatch(r"[a-z0-9-]+\.[0-9a-f]{32}", started.generation_id) and (started.seed, started.total_steps) == (
        4,
        150,
    )
    acks = [e.steer_ack for e in events[:-1] if e.WhichOneof("event") == "steer_ack"]
    assert (acks[0].sequence, acks[0].steer_id, acks[0].error_code) == (1, 1, "")
    assert (acks[1].sequence, acks[1].steer_id, acks[1].error_code, acks[1].field) == (
        2,
        0,
        "INVALID_ARGUMENT",
        "guidance_scale",
    )
    (steered,) = [e.steered for e in events[:-1] if e.WhichOneof("event") == "steered"]
    assert steered.steer_id == 1 and steered.step >= sent[0]


def test_grpc_session_without_steers_is_the_streams_image(gateway):
    events, code = grpc_session(gateway, [start(prompt=PROMPT, steps=4, seed=8)], lambda *_: None)
    assert code == grpc.StatusCode.OK
    assert [e.WhichOneof("event") for e in events] == ["started", "progress", "progress", "progress", "image"]
    with LdmClient(gateway.triton_url) as kserve:
        expected = kserve.generate(PROMPT, seed=8, steps=4)
    np.testing.assert_array_equal(np.asarray(PILImage.open(io.BytesIO(events[-1].image.data)).convert("RGB")), expected)


@pytest.mark.parametrize(
    "first, field",
    [
        (start(prompt=PROMPT, steps=0), "steps"),
        (start(prompt=PROMPT, steps=2, n=2), "n"),
        (images_pb2.SessionRequest(steer=images_pb2.Steer(prompt=OTHER)), "start"),
    ],
)
def test_grpc_session_bad_start_is_invalid_argument_naming_the_field(gateway, first, field):
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    events, code = grpc_session(gateway, [first], lambda *_: None)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(events[-1])
    (detail,) = status.details
    violation = error_details_pb2.BadRequest()
    detail.Unpack(violation)
    assert violation.field_violations[0].field == field
    events, code = grpc_session(gateway, [start(prompt=PROMPT, steps=2)], lambda *_: None)
    assert code == grpc.StatusCode.OK


def test_page_routes_serve_the_static_folder_only(gateway):
    def get(path):
        try:
            with urllib.request.urlopen(gateway.rest_url + path, timeout=10) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type", ""), error.read()

    status, kind, body = get("/static/README.txt")
    assert status == 200 and b"URL layout" in body
    from serving.gateway.rest_live import STATIC

    status, kind, body = get("/")
    if (STATIC / "index.html").is_file():
        assert status == 200 and kind.startswith("text/html")
    else:
        assert status == 404
    for path in ("/static/../rest_live.py", "/static/%2e%2e/rest_live.py", "/static/"):
        assert get(path)[0] in (403, 404), path


def test_openapi_documents_the_live_endpoints(gateway):
    spec = json.loads(urllib.request.urlopen(gateway.rest_url + "/openapi.json").read())
    paths = spec["paths"]
    assert "post" in paths["/v1/generations"] and "post" in paths["/v1/generations/{id}/steer"]
    assert "delete" in paths["/v1/generations/{id}"]
    body = spec["components"]["schemas"]["LiveGenerationRequest"]
    assert {"prompt", "size", "progress_every", "preview_every", "seed", "steps", "guidance_scale"} <= set(
        body["properties"]
    )
    assert "n" not in body["properties"]
    assert set(spec["components"]["schemas"]["SteerRequest"]["properties"]) == {
        "prompt",
        "negative_prompt",
        "guidance_scale",
        "regions",
        "region_divisions",
        "base_prompt_weight",
        "region_mode",
        "mask",
        "loras",
    }
    responses = paths["/v1/generations/{id}/steer"]["post"]["responses"]
    assert {"202", "400", "404", "409"} <= set(responses)


def test_closing_the_stream_cancels_the_generation(gateway, server):
    before = idle_metrics(server)["ldm_cancellations_total"]

    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            async with client.start(LONG) as live:
                async for event in live:
                    if event.name == "generation.progress":
                        break  # leaving the block closes the connection
            # in a thread: the loop must run to close the connection
            assert await asyncio.to_thread(wait_for, lambda: metrics(server)["ldm_cancellations_total"] == before + 1)
            with pytest.raises(GenerationError) as info:
                await client.steer(live.id, prompt=OTHER)
            return info.value

    assert run(scenario()).status == 409
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] == 0)


def mask_png(size: int, right_half: bool) -> bytes:
    pixels = np.zeros((size, size), np.uint8)
    if right_half:
        pixels[:, size // 2 :] = 255
    else:
        pixels[:, : size // 2] = 255
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_rest_steer_replaces_the_regions_and_a_bad_region_mask_is_400(gateway):
    regions = {"regions": [{"prompt": "a red circle"}, {"prompt": "a blue square"}], "region_divisions": "1,1"}

    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            async with client.start({**LONG, "steps": 40}) as live:
                answers, errors = [], []

                async def act(event):
                    if event.name == "generation.progress" and not answers:
                        answers.append(await client.steer(live.id, **regions))
                        with pytest.raises(GenerationError) as info:
                            await client.steer(
                                live.id,
                                regions=[{"prompt": "a cat", "mask": base64.b64encode(mask_png(32, True)).decode()}],
                            )  # the generation is 64x64
                        errors.append(info.value)

                return answers, errors, await collect(live, act)

    ((answer, _),), (error,), events = run(scenario())
    assert answer["steer_id"] == 1
    assert error.status == 400 and error.param == "regions.mask" and "[1, 64, 64]" in error.body["error"]["message"]
    assert [e.data["steer_id"] for e in events if e.name == "generation.steered"] == [1]
    assert events[-1].name == "generation.completed"


def test_grpc_session_steers_an_inpainting_mask(gateway):
    picture = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        picture, format="PNG"
    )
    sent = []

    def on_event(event, send):
        if event.WhichOneof("event") == "progress" and not sent:
            sent.append(event.progress.step)
            send(images_pb2.SessionRequest(steer=images_pb2.Steer(mask=mask_png(64, right_half=False))))

    first = start(prompt=PROMPT, steps=60, seed=5, init_image=picture.getvalue(), mask=mask_png(64, right_half=True))
    events, code = grpc_session(gateway, [first], on_event)
    assert code == grpc.StatusCode.OK, events[-1]
    (ack,) = [e.steer_ack for e in events if e.WhichOneof("event") == "steer_ack"]
    assert (ack.steer_id, ack.error_code) == (1, ""), ack
    (steered,) = [e.steered for e in events if e.WhichOneof("event") == "steered"]
    image = np.asarray(PILImage.open(io.BytesIO(events[-1].image.data)).convert("RGB"))
    # pasted back by the new mask: its kept (right) half is the input's
    original = np.asarray(PILImage.open(picture).convert("RGB"))
    np.testing.assert_array_equal(image[:, 32:], original[:, 32:])
    assert steered.step >= sent[0] and not np.array_equal(image[:, :32], original[:, :32])
