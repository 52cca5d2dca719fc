"""Live generations' pieces without a server: the bounded live table (404 vs 409, per caller),
generation ids, the replica routing table (no URL ever taken from an id), and the JSON body
of /v1/generations read as a GenerateRequest, a steer's as a Steer (and its pipeline inputs)."""

import base64
import io
import re

import numpy as np
from PIL import Image as PILImage
import pytest

from serving.gateway import grpc_api
from serving.gateway.errors import FAILED_PRECONDITION, NOT_FOUND, ApiError
from serving.gateway.live import LiveGeneration, LiveTable, is_id, new_id
from serving.gateway.replicas import Replicas, parse_peers
from serving.gateway.protos import images_pb2
from serving.gateway.rest_live import to_request, to_steer_message


def code_of(call) -> str:
    with pytest.raises(ApiError) as info:
        call()
    return info.value.code


def test_live_table_answers_unknown_404_finished_409_and_stays_bounded():
    table = LiveTable(max_live=2, max_finished=3)
    first = table.add(LiveGeneration(new_id("r1"), "key-a"))
    assert table.get(first.id, "key-a") is first
    assert code_of(lambda: table.get(first.id, "key-b")) == NOT_FOUND  # another key's: unknown to it
    assert code_of(lambda: table.get("r1.nope", "key-a")) == NOT_FOUND
    table.add(LiveGeneration(new_id("r1"), "key-a"))
    assert code_of(lambda: table.add(LiveGeneration(new_id("r1"), "key-a"))) == "UNAVAILABLE"
    table.finish(first)
    assert len(table) == 1
    assert code_of(lambda: table.get(first.id, "key-a")) == FAILED_PRECONDITION
    assert code_of(lambda: table.get(first.id, "key-b")) == NOT_FOUND
    finished = [first.id]
    for _ in range(3):  # the record of finished ids forgets the oldest
        live = table.add(LiveGeneration(new_id("r1"), "key-a"))
        table.finish(live)
        finished.append(live.id)
    assert code_of(lambda: table.get(finished[0], "key-a")) == NOT_FOUND
    assert code_of(lambda: table.get(finished[-1], "key-a")) == FAILED_PRECONDITION


def test_a_cancel_before_the_stream_opens_cancels_it_when_attached():
    class Stream:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    live, stream = LiveGeneration("r.x", ""), Stream()
    live.cancel()
    live.attach(stream)
    assert stream.cancelled and live.triton_ids() == ["r.x-0"]


def test_ids_name_their_replica_and_128_random_bits():
    ids = {new_id("replica-0") for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"replica-0\.[0-9a-f]{32}", i) and is_id(i) for i in ids)
    # anything else names no generation, and is never part of a URL the gateway calls
    token = "0" * 32
    for text in (f"r1.{token}/../admin", f"r1.{token}?x=1", f"R1.{token}", f"r1.{token[:-1]}", f"a.b.{token}", token):
        assert not is_id(text), text


def test_owner_urls_come_from_the_peer_table_or_one_dns_label_under_the_peer_domain():
    table = Replicas("r0", parse_peers("r1=http://10.0.0.2:8080/, r2=http://10.0.0.3:8080"))
    assert table.is_mine("r0.abc") and not table.is_mine("r1.abc")
    assert table.url_of("r1.abc") == "http://10.0.0.2:8080"
    for foreign in ("r9.abc", "evil.com:80.abc", "10.0.0.9:8080/x.abc", "R1.abc", ".abc"):
        assert code_of(lambda foreign=foreign: table.url_of(foreign)) == NOT_FOUND, foreign
    dns = Replicas("pod-a", peer_domain="ldm-triton-peers.ns.svc.cluster.local", peer_port=8080)
    assert dns.url_of("pod-b-7f9c.abc") == "http://pod-b-7f9c.ldm-triton-peers.ns.svc.cluster.local:8080"
    for foreign in ("evil.com.abc", "a_b.abc", "x@y.abc", "-a.abc", "a" * 64 + ".abc"):
        # the owner part stops at the first dot, and must be one DNS label
        owner_url = None
        try:
            owner_url = dns.url_of(foreign)
        except ApiError as error:
            assert error.code == NOT_FOUND
        assert owner_url is None or owner_url.startswith(f"http://{foreign.split('.')[0]}.ldm-triton-peers.ns.svc"), (
            owner_url
        )


@pytest.mark.parametrize("text", ["r1", "r1=ftp://x", "R1=http://x", "a b=http://x"])
def test_bad_peer_entries_are_refused(text):
    with pytest.raises(ValueError):
        parse_peers(text)


def test_bad_replica_name_is_refused():
    with pytest.raises(ValueError):
        Replicas("my.host")


def test_rest_body_reads_as_a_generate_request_with_rest_spellings():
    request = to_request(
        {
            "prompt": "a cat",
            "size": "64x32",
            "output_format": "webp",
            "seed": 7,
            "regions": [{"prompt": "sky"}],
            "region_mode": "attention",
            "init_image": "AAEC",
        }
    )
    assert (request.width, request.height, request.seed) == (64, 32, 7)
    assert request.output_format == 3 and request.region_mode == 2 and request.init_image == b"\x00\x01\x02"
    assert (request.progress_every, request.preview_every) == (1, 2)
    assert request.regions[0].prompt == "sky"


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "size": "64x64", "width": 64}, "size"),
        ({"prompt": "x", "steps": "many"}, "steps"),
        ({"prompt": "x", "regions": [{"mask": 5}]}, "regions.mask"),
        ({"prompt": "x", "task": "paint"}, "task"),
        ({"prompt": "x", "colour": 1}, "colour"),
        ({"prompt": "x", "region_mode": {}}, "region_mode"),
        ({"prompt": "x", "timeout_s": False}, "timeout_s"),
        ({"prompt": "x", "steps": None}, "steps"),
        ({"prompt": "x", "regions": [{"prompt": None}]}, "regions.prompt"),
    ],
)
def test_rest_body_errors_name_the_field(body, field):
    with pytest.raises(ApiError) as info:
        to_request(body)
    assert info.value.field == field, info.value


def mask_png(size, right_half: bool) -> bytes:
    pixels = np.zeros((size, size), np.uint8)
    pixels[:, size // 2 :] = 255 if right_half else 0
    pixels[:, : size // 2] = 0 if right_half else 255
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_steer_body_reads_as_a_steer_and_becomes_pipeline_inputs():
    png = mask_png(8, right_half=True)
    steer = to_steer_message(
        {
            "prompt": "a cat",
            "regions": [{"prompt": "sky", "negative_prompt": "sea"}, {"prompt": "grass", "negative_prompt": ""}],
            "region_divisions": "1,1",
            "region_mode": "attention",
            "base_prompt_weight": 0.4,
            "mask": base64.b64encode(png).decode(),
        }
    )
    with pytest.raises(ApiError) as info:  # one region without a negative prompt, the other with one
        grpc_api.to_steer(steer)
    assert info.value.field == "regions.negative_prompt"
    steer.regions[1].negative_prompt = "mud"
    inputs = grpc_api.to_steer(steer)
    assert inputs["prompt"] == "a cat" and "negative_prompt" not in inputs and "guidance_scale" not in inputs
    assert inputs["region_prompts"] == ["sky", "grass"] and inputs["region_negative_prompts"] == ["sea", "mud"]
    assert (inputs["region_divisions"], inputs["region_mode"]) == ("1,1", "attention")
    assert inputs["base_prompt_weight"] == pytest.approx(0.4)
    mask = inputs["mask"].decode()  # an Upload: the service checks its header, then decodes it
    assert mask.shape == (8, 8) and mask[0, 7] == 255 and mask[0, 0] == 0
    assert grpc_api.to_steer(images_pb2.Steer(guidance_scale=0.0)) == {"guidance_scale": 0.0}


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "body"),
        ({"seed": 3}, "seed"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"region_mode": "pixel"}, "region_mode"),
        ({"regions": [{"mask": 5}]}, "regions.mask"),
        ({"mask": 5}, "mask"),
    ],
)
def test_steer_body_errors_name_the_field(body, field):
    with pytest.raises(ApiError) as info:
        to_steer_message(body)
    assert info.value.field == field, info.value
