"""The REST front's OpenAPI document is its contract, checked against a real tritonserver and
gateway: the server-sent events match their declared schemas, 405 answers say `Allow`, and a
schema-driven fuzzer (schemathesis, all its checks, the stateful phase following the document's
links) finds nothing within a bounded run."""

import asyncio
import json
from pathlib import Path
import subprocess
import sys
import urllib.error
import urllib.request

import jsonschema_rs
import pytest

from serving.client.generations import GenerationsClient

PROMPT = "a small green square at the top"
EXAMPLES = 10  # per operation and phase: the run stays within about a minute on two cores
# the documented "retry" answers (503) are not server errors; where the document cannot say all
# a generation needs (a real image in a base64 field, a prompt schedule's grammar, sizes in the
# served model's multiples), a schema-valid request may still be refused 400
FUZZ_CONFIG = Path(__file__).resolve().parents[1] / "openapi_fuzz.toml"


def fetch_document(gateway) -> dict:
    with urllib.request.urlopen(gateway.rest_url + "/openapi.json", timeout=30) as response:
        return json.loads(response.read())


def event_validators(document: dict, path: str, status: str = "200") -> dict:
    """Event name -> a validator of its data, from the text/event-stream schema of `path`'s POST
    answer (one object per event: its name, and its data's contentSchema)."""
    answer = document["paths"][path]["post"]["responses"][status]
    validators = {}
    for event in answer["content"]["text/event-stream"]["schema"]["oneOf"]:
        name, data = event["properties"]["event"]["const"], event["properties"]["data"]
        validators[name] = jsonschema_rs.validator_for({**data["contentSchema"], "components": document["components"]})
    return validators


def test_server_sent_events_match_their_declared_schemas(gateway):
    document = fetch_document(gateway)
    live = event_validators(document, "/v1/generations")
    images = event_validators(document, "/v1/images/generations")

    async def scenario():
        async with GenerationsClient(gateway.rest_url) as client:
            # long enough to steer mid-way (events may reach the client late), then to its image
            async with client.start({"prompt": PROMPT, "steps": 150, "size": "32x32", "preview_every": 50}) as running:
                seen = []
                async for event in running:
                    seen.append(event)
                    if event.name == "generation.progress" and event.data["step"] == 1:
                        await client.steer(running.id, prompt="a large red circle")
            body = {"prompt": PROMPT, "steps": 4, "size": "32x32", "stream": True, "partial_images": 2}
            async with client.session.post(gateway.rest_url + "/v1/images/generations", json=body) as response:
                text = await response.text()
            return seen, text

    seen, text = asyncio.run(asyncio.wait_for(scenario(), 240))
    assert {e.name for e in seen} == {
        "generation.created",
        "generation.progress",
        "generation.steered",
        "generation.completed",
    }
    for event in seen:
        live[event.name].validate(event.data)
    blocks = [block.split("\n", 1) for block in text.strip().split("\n\n")]
    names = [name.removeprefix("event: ") for name, _ in blocks]
    assert names[-1] == "image_generation.completed" and "image_generation.partial_image" in names
    for name, data in blocks:
        images[name.removeprefix("event: ")].validate(json.loads(data.removeprefix("data: ")))


def test_a_method_a_path_does_not_take_is_405_with_allow(gateway):
    request = urllib.request.Request(gateway.rest_url + "/v1/images/generations", method="GET")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 405 and "POST" in info.value.headers["Allow"]
    assert json.loads(info.value.read())["error"]["code"] == "invalid_arg"


def test_a_schema_driven_fuzzer_finds_nothing(gateway, tmp_path):
    """schemathesis (tests/openapi_fuzz.toml) over the published document: every check, every
    phase (examples, coverage, fuzzing, and the stateful phase following the document's links),
    EXAMPLES examples each."""
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(FUZZ_CONFIG),
        "run",
        gateway.rest_url + "/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(EXAMPLES),
        "--workers",
        "1",
        "--request-timeout",
        "120",
        "--seed",
        "1",
        "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its cache stays there
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1], run.stdout[-4000:]
