"""The gateway's pieces without a server: Generation, REST parameters, images and masks, errors."""

import io
import struct
import zlib

from google.rpc import error_details_pb2, status_pb2
import grpc
import numpy as np
from PIL import Image as PILImage
import pytest

from serving.gateway import images, rest_params
from serving.gateway.errors import ApiError, from_pipeline
from serving.gateway.generation import Generation, to_array
from serving.gateway.grpc_api import peer_address, status_of

DECLARED = {
    "prompt": "TYPE_STRING",
    "seed": "TYPE_INT64",
    "steps": "TYPE_INT32",
    "guidance_scale": "TYPE_FP32",
    "height": "TYPE_INT32",
    "width": "TYPE_INT32",
    "progress_every": "TYPE_INT32",
    "preview_every": "TYPE_INT32",
}


def test_generation_gives_typed_arrays_with_consecutive_seeds():
    generation = Generation("a cat", {"steps": 7, "guidance_scale": 2.5}, n=3, seed=10, progress_every=1).validate()
    arrays = [generation.arrays(i, DECLARED) for i in range(3)]
    assert [int(a["seed"][0]) for a in arrays] == [10, 11, 12]
    assert arrays[0]["prompt"].dtype == object and arrays[0]["prompt"][0] == b"a cat"
    assert arrays[0]["steps"].dtype == np.int32 and arrays[0]["guidance_scale"].dtype == np.float32
    assert int(arrays[0]["progress_every"][0]) == 1 and "preview_every" not in arrays[0]


@pytest.mark.parametrize(
    "generation, field",
    [
        (Generation("x", n=0), "n"),
        (Generation("x", n=9), "n"),
        (Generation("x", seed=-1), "seed"),
        (Generation("x", n=2, seed=2**63 - 1), "seed"),
        (Generation("x", output_format="gif"), "output_format"),
        (Generation("x", quality=101), "quality"),
    ],
)
def test_generation_checks_what_the_gateway_owns(generation, field):
    with pytest.raises(ApiError) as info:
        generation.validate()
    assert (info.value.code, info.value.field) == ("INVALID_ARG", field)


def test_an_input_the_pipeline_lacks_is_unimplemented():
    generation = Generation("x", {"init_image": np.zeros((8, 8, 3), np.uint8)}).validate()
    with pytest.raises(ApiError) as info:
        generation.arrays(0, DECLARED)
    assert (info.value.code, info.value.field) == ("UNIMPLEMENTED", "init_image")


def test_arrays_follow_the_declared_types_and_ranges():
    assert to_array("keep_unmasked", True, "TYPE_BOOL").dtype == np.bool_
    assert to_array("region_prompts", ["a", "b"], "TYPE_STRING").tolist() == [b"a", b"b"]
    assert to_array("mask", np.ones((4, 4)), "TYPE_UINT8").dtype == np.uint8
    with pytest.raises(ApiError, match="steps"):
        to_array("steps", 2**40, "TYPE_INT32")
    with pytest.raises(ApiError, match="integer"):
        to_array("steps", 2.5, "TYPE_INT32")


def test_rest_params_are_typed_from_json_and_from_forms():
    parsed = rest_params.parse(
        {"prompt": "x", "n": 2, "stream": True, "guidance_scale": 3, "model": "anything"},
        rest_params.GENERATIONS,
        from_form=False,
    )
    assert parsed == {"prompt": "x", "n": 2, "stream": True, "guidance_scale": 3.0, "model": "anything"}
    form = rest_params.parse(
        {"prompt": "x", "n": "2", "keep_unmasked": "true", "strength": "0.5", "image": object()},
        rest_params.EDITS,
        from_form=True,
    )
    assert form["n"] == 2 and form["keep_unmasked"] is True and form["strength"] == 0.5
    for body, field in (
        ({"n": True}, "n"),
        ({"n": 1.5}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"output_format": "gif"}, "output_format"),
        ({"strength": 0.5}, "strength"),
    ):
        with pytest.raises(ApiError) as info:
            rest_params.parse({"prompt": "x", **body}, rest_params.GENERATIONS, from_form=False)
        assert info.value.field == field
    with pytest.raises(ApiError, match="is required"):
        rest_params.parse({}, rest_params.GENERATIONS, from_form=False)
    assert rest_params.parse_size("64x32") == (32, 64) and rest_params.parse_size("auto") is None


def png(mode, size, colour) -> bytes:
    buffer = io.BytesIO()
    PILImage.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_masks_follow_openais_alpha_rule_else_luminance():
    rgba = PILImage.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # transparent: repaint
    rgba.putpixel((1, 0), (10, 20, 30, 128))  # half transparent: kept, as OpenAI says "fully transparent"
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    mask = images.Upload(buffer.getvalue(), "mask", mask=True).decode()
    assert mask.tolist() == [[255, 0, 0, 0], [0, 0, 0, 0]]
    assert images.Upload(png("L", (3, 3), 200), "mask", mask=True).decode().tolist() == [[200] * 3] * 3


def test_uploads_are_checked_from_their_header_before_decoding():
    with pytest.raises(ApiError) as info:
        images.Upload(png("RGB", (40, 40), (0, 0, 0)), "init_image").declare(1024)
    assert info.value.code == "TOO_LARGE" and info.value.field == "init_image"
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(buffer, format="BMP")
    with pytest.raises(ApiError, match="PNG, JPEG or WebP"):
        images.Upload(buffer.getvalue(), "init_image").declare(1024)
    with pytest.raises(ApiError, match="a side over 16 pixels"):
        images.Upload(png("L", (17, 1), 0), "mask").declare(1024, max_side=16)
    for output_format in ("png", "jpeg", "webp"):
        upload = images.Upload(images.encode(np.zeros((8, 6, 3), np.uint8), output_format), "x")
        assert upload.declare(100) == 48 and (upload.width, upload.height) == (6, 8)
        assert upload.decode().shape == (8, 6, 3)


def test_pipeline_errors_keep_their_code_and_field():
    error = from_pipeline("[INVALID_ARG] steps: must be in [1, 150], got 0")
    assert (error.code, error.field, error.message) == ("INVALID_ARG", "steps", "must be in [1, 150], got 0")
    assert from_pipeline("[UNAVAILABLE] server overloaded, retry later: queue full").code == "UNAVAILABLE"
    assert from_pipeline("something else").code == "INTERNAL"


def test_grpc_status_carries_a_field_violation():
    status = status_of(ApiError("INVALID_ARG", "must be in [1, 150], got 0", "steps"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    decoded = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    decoded.details[0].Unpack(bad)
    assert (bad.field_violations[0].field, bad.field_violations[0].description) == (
        "steps",
        "must be in [1, 150], got 0",
    )


def test_callers_without_keys_are_their_address_not_their_connection():
    assert peer_address("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_address("ipv6:[::1]:40000") == "::1"
    assert peer_address("unix:/tmp/socket") == "unix:/tmp/socket"


def test_sampler_fields_pass_through_from_rest_json_and_forms_and_from_grpc():
    from serving.gateway import grpc_api
    from serving.gateway.protos import images_pb2

    parsed = rest_params.parse(
        {"prompt": "x", "sampler": "DPM++ 2M Karras", "sigma_schedule": "karras", "guidance_interval": [0.2, 1]},
        rest_params.GENERATIONS,
        from_form=False,
    )
    assert parsed["sampler"] == "DPM++ 2M Karras" and parsed["guidance_interval"] == [0.2, 1.0]
    for text in ("0.2,0.8", "[0.2, 0.8]", ["0.2", "0.8"]):  # `lo,hi`, JSON, or the field twice
        form = rest_params.parse(
            {"prompt": "x", "image": object(), "guidance_interval": text}, rest_params.EDITS, from_form=True
        )
        assert form["guidance_interval"] == [0.2, 0.8]
    for body, field in (
        ({"guidance_interval": [0.2]}, "guidance_interval"),
        ({"guidance_interval": "0.2"}, "guidance_interval"),
        ({"guidance_interval": [0.1, float("nan")]}, "guidance_interval"),
        ({"sigma_schedule": "exponential"}, "sigma_schedule"),
        ({"sampler": 3}, "sampler"),
    ):
        with pytest.raises(ApiError) as info:
            rest_params.parse({"prompt": "x", **body}, rest_params.GENERATIONS, from_form=False)
        assert info.value.field == field
    request = images_pb2.GenerateRequest(prompt="x", sampler="Euler a", guidance_interval=[0.25, 0.75])
    generation = grpc_api.to_generation(request, streaming=False)
    assert generation.inputs == {"sampler": "Euler a", "guidance_interval": [0.25, 0.75]}
    declared = {**DECLARED, "sampler": "TYPE_STRING", "guidance_interval": "TYPE_FP32"}
    arrays = generation.validate().arrays(0, declared)
    assert arrays["guidance_interval"].dtype == np.float32 and arrays["guidance_interval"].shape == (2,)
    assert arrays["sampler"].tolist() == [b"Euler a"]
    with pytest.raises(ApiError) as info:  # its tensor is [2]: refused here, not by Triton's shape check
        grpc_api.to_generation(images_pb2.GenerateRequest(prompt="x", guidance_interval=[0.5]), False).validate()
    assert info.value.field == "guidance_interval"
    assert from_pipeline("[INVALID_ARG] sampler: unknown sampler 'x'; valid: ddim, euler").field == "sampler"


def test_the_sampler_list_says_what_fits_the_served_model_and_its_default():
    import json

    from serving.gateway.pipeline import PipelineModel
    from serving.gateway.samplers import rest_list, served_samplers

    def model(**parameters):
        return PipelineModel({}, parameters)

    epsilon = json.dumps({"_class_name": "DDIMScheduler", "prediction_type": "epsilon"})
    served = served_samplers(model(scheduler_config=epsilon))
    listed = rest_list(served)
    assert listed["object"] == "list" and len(listed["data"]) == 8
    fits = {s["name"]: s["fits_served_model"] for s in listed["data"]}
    assert fits.pop("flow_match_euler") is False and all(fits.values())
    assert (listed["default_sampler"], listed["default_sigma_schedule"]) == ("ddim", "default")
    dpm = next(s for s in listed["data"] if s["name"] == "dpmpp_2m")
    assert (
        dpm["object"] == "sampler"
        and "DPM++ 2M Karras" in dpm["a1111_names"]
        and dpm["sigma_schedules"] == ["default", "karras"]
    )
    configured = served_samplers(model(scheduler_config=epsilon, default_sampler="DPM++ 2M Karras"))
    assert configured.default == ("dpmpp_2m", "karras")
    flow = served_samplers(model(scheduler_config=json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"})))
    assert [s["name"] for s in flow.samplers if s["fits_served_model"]] == ["flow_match_euler"]
    assert flow.default == ("flow_match_euler", "default")
    unknown = served_samplers(model())  # an export older than samplers: fit not known
    assert unknown.default is None and all("fits_served_model" not in s for s in unknown.samplers)
    assert served_samplers(None).default is None


@pytest.mark.parametrize("size", ["\u00b2x64", "64x\u0663", "9" * 5000 + "x64", "64x64x64", "x64", ""])
def test_sizes_are_ascii_digits_within_reason(size):
    with pytest.raises(ApiError) as info:
        rest_params.parse_size(size)
    assert (info.value.code, info.value.field) == ("INVALID_ARG", "size")


def test_lone_surrogates_are_invalid_before_anything_is_charged():
    with pytest.raises(ApiError) as info:
        Generation("x", {"region_prompts": ["a", "b\ud800"]}).validate()
    assert (info.value.code, info.value.field) == ("INVALID_ARG", "region_prompts")


def test_a_decompression_bomb_header_is_too_large_not_an_error():
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # 4e8 pixels declared, none there
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ApiError) as info:
        images.Upload(data, "init_image").declare(2**40)  # Pillow's own limit (twice 89M pixels) says so
    assert (info.value.code, info.value.field) == ("TOO_LARGE", "init_image")


def test_an_uncoded_error_in_a_handler_is_the_documented_json_with_the_request_id():
    """The middleware's guard, in a real aiohttp server whose handler fails in a way nobody coded."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from serving.gateway.pipeline import PipelineClient
    from serving.gateway.rest_api import build_app
    from serving.gateway.service import ImageService

    async def scenario():
        app = build_app(ImageService(PipelineClient("127.0.0.1:1")))

        async def broken(request):
            raise RuntimeError("nobody coded this")

        app.router.add_get("/broken", broken)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/broken", headers={"X-Request-Id": "probe-1"})
            return response.status, response.headers.get("X-Request-Id"), await response.json()

    status, rid, body = asyncio.run(scenario())
    assert status == 500 and rid == "probe-1"
    assert (
        body["error"]["code"] == "internal" and "probe-1" in body["error"]["message"] and body["error"]["param"] is None
    )
