"""The gateway's gRPC API (ldm.v1.Images) against a real tritonserver: images equal to Triton's
own for the same seeds, streams, coded errors with field violations, health, reflection, and
cancellation reaching the engine."""

import io
import queue

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from google.protobuf import descriptor_pb2
import numpy as np
from PIL import Image as PILImage
import pytest

from serving.client.images import ImagesClient, ImagesError
from serving.client.kserve import LdmClient
from serving.gateway.protos import images_pb2, images_pb2_grpc
from tests.support.server_metrics import idle_metrics, metrics, wait_for

PROMPT = "a large red circle on the left"


@pytest.fixture
def client(gateway):
    with ImagesClient(gateway.grpc_url) as c:
        yield c


def test_n_images_are_tritons_images_for_consecutive_seeds(client, server):
    images = client.generate(PROMPT, n=3, seed=40, steps=5)
    assert [(i.index, i.seed, i.format, i.width, i.height) for i in images] == [
        (k, 40 + k, "png", 32, 32) for k in range(3)
    ]
    with LdmClient(server.grpc_url) as kserve:
        for image in images:
            np.testing.assert_array_equal(image.array(), kserve.generate(PROMPT, seed=image.seed, steps=5))


def test_jpeg_and_webp_outputs(client):
    for output_format, pil_name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        (image,) = client.generate(PROMPT, seed=1, steps=3, output_format=output_format, quality=80)
        assert PILImage.open(io.BytesIO(image.data)).format == pil_name and image.format == output_format


def test_stream_reports_progress_and_previews_then_each_image(client):
    events = list(client.stream(PROMPT, n=2, seed=3, steps=6, preview_every=3, height=48, width=48))
    images = [e for e in events if hasattr(e, "data")]
    progress = [e for e in events if not hasattr(e, "data")]
    assert sorted(i.index for i in images) == [0, 1] and all(i.width == 48 for i in images)
    for index in (0, 1):
        mine = [p for p in progress if p.index == index]
        assert [p.step for p in mine] == [1, 2, 3, 4, 5] and all(p.total_steps == 6 for p in mine)
        previews = [p for p in mine if p.preview]
        assert [p.step for p in previews] == [3]
        assert PILImage.open(io.BytesIO(previews[0].preview)).size == (48, 48)


@pytest.mark.parametrize(
    "fields, code, field",
    [
        (dict(steps=0), "INVALID_ARGUMENT", "steps"),
        (dict(n=9), "INVALID_ARGUMENT", "n"),
        (dict(height=36), "INVALID_ARGUMENT", "height"),
        (dict(quality=0), "INVALID_ARGUMENT", "quality"),
        (dict(init_image=np.zeros((32, 32, 3), np.uint8), strength=1.5), "INVALID_ARGUMENT", "strength"),
        (dict(regions=[{"prompt": "a cat"}]), "INVALID_ARGUMENT", "region_divisions"),
        (dict(init_image=b"not an image"), "INVALID_ARGUMENT", "init_image"),
    ],
)
def test_errors_are_status_codes_naming_the_field(client, fields, code, field):
    with pytest.raises(ImagesError) as info:
        client.generate(PROMPT, steps=fields.pop("steps", 2), **fields)
    assert (info.value.code, info.value.field) == (code, field), info.value
    assert client.generate(PROMPT, steps=2)[0].width == 32


def test_health_follows_the_pipeline_and_reflection_lists_the_service(gateway):
    channel = grpc.insecure_channel(gateway.grpc_url)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ldm.v1.Images"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (listing,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in listing.list_services_response.service}
    assert {"ldm.v1.Images", "grpc.health.v1.Health"} <= names
    (found,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="ldm.v1.Images")])
    )
    served = descriptor_pb2.FileDescriptorProto.FromString(found.file_descriptor_response.file_descriptor_proto[0])
    assert served == descriptor_pb2.FileDescriptorProto.FromString(images_pb2.DESCRIPTOR.serialized_pb)
    channel.close()


def test_request_id_is_returned_and_taken_from_the_client(gateway):
    channel = grpc.insecure_channel(gateway.grpc_url)
    stub = images_pb2_grpc.ImagesStub(channel)
    response, call = stub.Generate.with_call(
        images_pb2.GenerateRequest(prompt=PROMPT, steps=2), metadata=(("x-request-id", "my-request-7"),)
    )
    assert response.request_id == "my-request-7"
    assert ("x-request-id", "my-request-7") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as info:  # errors carry it too
        stub.Generate(images_pb2.GenerateRequest(prompt=PROMPT, steps=0), metadata=(("x-request-id", "bad-8"),))
    assert ("x-request-id", "bad-8") in info.value.trailing_metadata()
    channel.close()


def test_cancelling_a_stream_cancels_the_generation(gateway, server):
    before = idle_metrics(server)
    channel = grpc.insecure_channel(gateway.grpc_url)
    stub = images_pb2_grpc.ImagesStub(channel)
    call = stub.GenerateStream(images_pb2.GenerateRequest(prompt=PROMPT, steps=150, n=2, seed=1, height=64, width=64))
    seen = queue.Queue()
    for event in call:
        seen.put(event)
        if event.progress.step >= 2:
            break
    call.cancel()
    assert wait_for(lambda: metrics(server)["ldm_cancellations_total"] == before["ldm_cancellations_total"] + 2)
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] == 0)
    channel.close()
