"""The REST front's OpenAPI document is its contract, checked against a real tritonserver and
gateway: the server-sent events match their declared schemas, 405 answers say `Allow`, and a
schema-driven fuzzer (schemathesis, all its checks, the stateful phase following the document's
links) finds nothing within a bounded run."""
import asyncio
import json
import urllib.error
import urllib.request

import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from serving.client.generations import GenerationsClient

PROMPT = "a small green square at the top"
EXAMPLES = 8  # per operation and phase: the run stays within about a minute on two cores


def fetch_document(gateway) -> dict:
    with urllib.request.urlopen(gateway.rest_url + "/openapi.json", timeout=30) as response:
        return json.loads(response.read())


def event_validators(document: dict, path: str, status: str = "200") -> dict:
    """Event name -> a validator of its data, from the x-ldm-events of `path`'s POST answer."""
    answer = document["paths"][path]["post"]["responses"][status]
    events = answer["content"]["text/event-stream"]["x-ldm-events"]
    return {name: jsonschema_rs.validator_for({**schema, "components": document["components"]}) for name, schema in events.items()}


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
    assert {e.name for e in seen} == {"generation.created", "generation.progress", "generation.steered", "generation.completed"}
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


@pytest.fixture(scope="module")
def contract(gateway):
    """The published document, loaded by schemathesis with every check on. The documented
    "retry" answers (503: queue full, timeout_s passed) are not server errors."""
    config = SchemathesisConfig.from_dict({
        "generation": {"max-examples": EXAMPLES, "database": "none"},
        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
    })
    return schemathesis.openapi.from_url(gateway.rest_url + "/openapi.json", config=config)


contract_schema = schemathesis.pytest.from_fixture("contract")


@contract_schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_the_fuzzer_finds_nothing(case):
    case.call_and_validate(timeout=120)


def test_the_fuzzer_finds_nothing_following_the_links(contract):
    contract.as_state_machine().run(settings=hypothesis.settings(
        max_examples=EXAMPLES, stateful_step_count=4, deadline=None, database=None,
        suppress_health_check=list(hypothesis.HealthCheck)))
