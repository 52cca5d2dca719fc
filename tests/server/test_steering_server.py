"""Steering through a real tritonserver (gRPC streaming, tritonclient): the steer's answer, the
stream's steer_applied, the coded refusals, and the server serving on."""

import threading
import uuid

import pytest
from tritonclient.utils import InferenceServerException

from serving.client.kserve import LdmClient

A, B = "a red circle on the left", "a blue square at the top"


def steered_generation(server, steer, steps=150, **fields):
    """Runs a generation and steers it (`steer(client, id)` -> steer id) once it has streamed 3
    steps. Returns (generation, steer id, its request id).
    A generation that outruns its steer (FAILED_PRECONDITION on a busy machine) is run again."""
    for _ in range(3):
        request_id = f"steer-test-{uuid.uuid4().hex}"
        started, result = threading.Event(), {}

        def on_progress(generation, started=started):
            if len(generation.progress) >= 3:
                started.set()

        def run(result=result, request_id=request_id, on_progress=on_progress):
            with LdmClient(server.grpc_url, control_secret=server.control_secret) as client:
                result["generation"] = client.run(
                    A, on_progress=on_progress, request_id=request_id, seed=5, steps=steps, progress_every=1, **fields
                )

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert started.wait(60)
            with LdmClient(server.grpc_url, control_secret=server.control_secret) as steerer:
                try:
                    steer_id = steer(steerer, request_id)
                except InferenceServerException as exc:
                    if exc.status() == "FAILED_PRECONDITION":
                        continue
                    raise
        finally:
            thread.join(120)
        return result["generation"], steer_id, request_id
    pytest.fail("the generation finished before each of 3 steers")


def test_steer_is_answered_and_its_first_step_reported_in_the_stream(server):
    generation, steer_id, request_id = steered_generation(server, lambda c, rid: c.steer(rid, prompt=B))
    assert steer_id == 1
    assert len(generation.steered) == 1
    ((applied_id, first_step),) = generation.steered
    assert applied_id == 1 and 3 <= first_step < 150
    # the step's own progress response carries it: step count = index + 1
    assert (first_step + 1, 150) in generation.progress
    assert generation.image.shape == (32, 32, 3)
    with LdmClient(server.grpc_url, control_secret=server.control_secret) as client:
        # the same switch as a prompt schedule, served alone as the steered generation was
        scheduled = client.generate(f"[{A}:{B}:{first_step}]", seed=5, steps=150)
        assert scheduled.tobytes() == generation.image.tobytes()
        with pytest.raises(InferenceServerException) as info:
            client.steer(request_id, prompt=B)
        assert info.value.status() == "FAILED_PRECONDITION" and "has finished" in info.value.message()


def test_steer_with_guidance_only_and_two_steers(server):
    def two_steers(client, request_id):
        first = client.steer(request_id, guidance_scale=1.0)
        assert client.steer(request_id, negative_prompt="a green triangle") == first + 1
        return first

    generation, steer_id, _ = steered_generation(server, two_steers)
    assert steer_id == 1
    assert sorted(i for i, _ in generation.steered) == [1, 2]
    assert all(step >= 3 for _, step in generation.steered)


def test_unknown_and_invalid_steers_are_refused_and_the_server_serves_on(server):
    with LdmClient(server.grpc_url, control_secret=server.control_secret) as client:
        with pytest.raises(InferenceServerException) as info:
            client.steer("no-such-generation", prompt=B)
        assert (
            info.value.status() == "NOT_FOUND" and "no generation with id 'no-such-generation'" in info.value.message()
        )
        for fields, field in (
            (dict(guidance_scale=99.0), "guidance_scale"),
            (dict(prompt="[a:b"), "prompt"),
            ({}, "steer"),
        ):
            with pytest.raises(InferenceServerException) as info:
                client.steer("no-such-generation", **fields)
            assert info.value.status() == "INVALID_ARG" and info.value.message().startswith(f"{field}: "), (
                info.value.message()
            )
        assert client.generate("a blue circle", steps=3, seed=1).shape == (32, 32, 3)


def test_prompt_schedule_runs_through_the_server(server):
    with LdmClient(server.grpc_url, control_secret=server.control_secret) as client:
        scheduled = client.generate(f"[{A}:{B}:2]", steps=4, seed=3)
        plain = client.generate(A, steps=4, seed=3)
        assert scheduled.shape == (32, 32, 3) and scheduled.tobytes() != plain.tobytes()
        with pytest.raises(InferenceServerException) as info:
            client.generate("a [red:blue] circle", steps=4)
        assert info.value.status() == "INVALID_ARG" and "prompt schedule syntax" in info.value.message()
