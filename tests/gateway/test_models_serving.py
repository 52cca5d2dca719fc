"""Two models in one server, end to end: `ldm serve --checkpoint TINY --checkpoint sdxl=TINY_SDXL`
(the tiny SD checkpoint as the default, a tiny SDXL beside it) exports both into one repository
and serves them; GET /v1/models (the real `openai` SDK's models.list / retrieve) and the gRPC
ListModels list both with their families; the SDK generates with model="sdxl" and with the
default, and the images are Triton's for the same inputs; an unknown model is 404 / NOT_FOUND
naming it; an SDXL field sent to the SD model is 400 / INVALID_ARGUMENT naming the field;
samplers per model; `ldm generate --model`; the page's model menu."""

import base64
import io
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import openai
from PIL import Image
import pytest

from serving.client.images import ImagesClient, ImagesError
from serving.client.kserve import LdmClient
from serving.triton.server import free_ports

LDM = [sys.executable, "-m", "serving.cli"]
PROMPT = "a red circle above a blue square"
FAST = {"steps": 3}  # tiny models, few steps
SDXL_SIZES = {"original_size": [64, 48], "crop_top_left": [8, 0], "target_size": [32, 32]}


class Served:
    def __init__(self, ports, lines):
        self.triton_http, self.triton_grpc, self.rest_port, self.grpc_port = ports[0], ports[1], ports[3], ports[4]
        self.rest_url, self.grpc_url = f"http://127.0.0.1:{self.rest_port}", f"127.0.0.1:{self.grpc_port}"
        self.kserve_url = f"127.0.0.1:{self.triton_grpc}"
        self.lines = lines


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", kind="sdxl")


@pytest.fixture(scope="module")
def served(tiny_checkpoint, sdxl_checkpoint, tmp_path_factory):
    """`ldm serve` with both checkpoints on free ports, until the module's tests are done."""
    folder = tmp_path_factory.mktemp("two-models")
    ports = free_ports(5)
    command = LDM + [
        "serve",
        "--checkpoint",
        str(tiny_checkpoint),
        "--checkpoint",
        f"sdxl={sdxl_checkpoint}",
        "--repo",
        str(folder / "repo"),
        "--http-port",
        str(ports[0]),
        "--grpc-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--gateway-rest-port",
        str(ports[3]),
        "--gateway-grpc-port",
        str(ports[4]),
        "--log-file",
        str(folder / "triton.log"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:  # each line as ldm serve prints it; "ready" once both are up
            lines.append(line)
            if line.startswith("ready"):
                break
        assert lines and lines[-1].startswith("ready"), "ldm serve exited early:\n" + "".join(lines)
        yield Served(ports, lines)
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def sdk(served):
    with openai.OpenAI(base_url=served.rest_url + "/v1", api_key="unused-without-keys", max_retries=0) as client:
        yield client


def pixels(data) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def get(served, path):
    try:
        with urllib.request.urlopen(served.rest_url + path, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(served, path, body):
    request = urllib.request.Request(
        served.rest_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_ldm_serve_exports_both_and_v1_models_lists_them_with_their_families(served, sdk):
    said = "".join(served.lines)
    assert "models: tiny (sd, default) = " in said and ", sdxl (sdxl) = " in said
    listed = sdk.models.list()
    assert [(m.id, m.family, m.default) for m in listed.data] == [("tiny", "sd", True), ("sdxl", "sdxl", False)]
    status, raw = get(served, "/v1/models")
    assert status == 200 and raw["object"] == "list"
    for entry in raw["data"]:
        assert entry["object"] == "model" and entry["owned_by"] and isinstance(entry["created"], int)
        assert entry["native_size"] == 32 and entry["max_size"] == 64 and entry["default_sampler"] == "ddim"
        assert {"txt2img", "img2img"} <= set(entry["tasks"])
    model = sdk.models.retrieve("sdxl")
    assert (model.id, model.family, model.object) == ("sdxl", "sdxl", "model")
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("nope")
    assert "'nope'" in info.value.body["message"] and info.value.body["code"] == "model_not_found"


def test_the_sdk_generates_with_each_model_and_the_images_are_tritons(served, sdk):
    def generate(**model):
        result = sdk.images.generate(prompt=PROMPT, size="32x32", extra_body={"seed": 3, **FAST}, **model)
        return pixels(result.data[0].b64_json)

    default, named_default, openai_name, sdxl = (
        generate(),
        generate(model="tiny"),
        generate(model="dall-e-2"),
        generate(model="sdxl"),
    )
    with LdmClient(served.kserve_url) as kserve:
        np.testing.assert_array_equal(default, kserve.generate(PROMPT, seed=3, height=32, width=32, **FAST))
        np.testing.assert_array_equal(sdxl, kserve.generate(PROMPT, model="sdxl", seed=3, height=32, width=32, **FAST))
    np.testing.assert_array_equal(named_default, default)
    np.testing.assert_array_equal(openai_name, default)
    assert not np.array_equal(sdxl, default)


def test_an_unknown_model_is_404_or_not_found_naming_it(served, sdk):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.images.generate(prompt=PROMPT, model="sdxl-turbo", extra_body=FAST)
    body = info.value.body
    assert body["param"] == "model" and body["code"] == "model_not_found"
    assert "'sdxl-turbo'" in body["message"] and "tiny, sdxl" in body["message"]
    with pytest.raises(openai.NotFoundError, match="sdxl-turbo"):
        sdk.images.edit(
            image=("in.png", png(np.zeros((32, 32, 3), np.uint8)), "image/png"),
            prompt=PROMPT,
            model="sdxl-turbo",
            extra_body=FAST,
        )
    status, body = post(served, "/v1/generations", {"prompt": PROMPT, "model": "sdxl-turbo", **FAST})
    assert status == 404 and body["error"]["param"] == "model" and "'sdxl-turbo'" in body["error"]["message"]
    with ImagesClient(served.grpc_url) as client:
        with pytest.raises(ImagesError) as grpc_info:
            client.generate(PROMPT, model="sdxl-turbo", **FAST)
    assert (grpc_info.value.code, grpc_info.value.field) == ("NOT_FOUND", "model")
    assert "'sdxl-turbo'" in grpc_info.value.message


def test_sdxl_fields_condition_the_sdxl_model_and_are_refused_naming_the_field_for_sd(served, sdk):
    for field, value in SDXL_SIZES.items():
        with pytest.raises(openai.BadRequestError) as info:
            sdk.images.generate(prompt=PROMPT, size="32x32", extra_body={field: value, **FAST})
        assert info.value.body["param"] == field and "sdxl" in info.value.body["message"]
    with ImagesClient(served.grpc_url) as client:
        with pytest.raises(ImagesError) as grpc_info:
            client.generate(PROMPT, original_size=(64, 64), **FAST)
        assert (grpc_info.value.code, grpc_info.value.field) == ("INVALID_ARGUMENT", "original_size")
        via_grpc = client.generate(PROMPT, model="sdxl", seed=4, height=32, width=32, **SDXL_SIZES, **FAST)[0].array()
    result = sdk.images.generate(
        prompt=PROMPT, model="sdxl", size="32x32", extra_body={"seed": 4, **SDXL_SIZES, **FAST}
    )
    conditioned = pixels(result.data[0].b64_json)
    plain = pixels(
        sdk.images.generate(prompt=PROMPT, model="sdxl", size="32x32", extra_body={"seed": 4, **FAST}).data[0].b64_json
    )
    with LdmClient(served.kserve_url) as kserve:
        expected = kserve.generate(PROMPT, model="sdxl", seed=4, height=32, width=32, **SDXL_SIZES, **FAST)
    np.testing.assert_array_equal(conditioned, expected)
    np.testing.assert_array_equal(via_grpc, expected)
    assert not np.array_equal(conditioned, plain)  # the time ids reach the UNet


def test_an_edit_names_its_model_too(served, sdk):
    y, x = np.mgrid[0:32, 0:32]
    picture = np.stack([x * 8, y * 8, 255 - x * 8], -1).astype(np.uint8)
    result = sdk.images.edit(
        image=("in.png", png(picture), "image/png"),
        prompt=PROMPT,
        model="sdxl",
        extra_body={"seed": 2, "strength": 0.6, **FAST},
    )
    with LdmClient(served.kserve_url) as kserve:
        expected = kserve.generate(PROMPT, model="sdxl", init_image=picture, strength=0.6, seed=2, **FAST)
    np.testing.assert_array_equal(pixels(result.data[0].b64_json), expected)


def test_grpc_list_models_and_generate_with_a_model(served, sdk):
    with ImagesClient(served.grpc_url) as client:
        listed = client.models()
        assert [(m["id"], m["family"], m["is_default"]) for m in listed] == [
            ("tiny", "sd", True),
            ("sdxl", "sdxl", False),
        ]
        assert listed[1]["native_size"] == 32 and listed[1]["default_sampler"] == "ddim"
        image = client.generate(PROMPT, model="sdxl", seed=6, height=32, width=32, **FAST)[0]
        assert [s["name"] for s in client.samplers(model="sdxl") if s["fits_served_model"]]
        with pytest.raises(ImagesError) as info:
            client.samplers(model="nope")
        assert info.value.code == "NOT_FOUND"
    rest = sdk.images.generate(prompt=PROMPT, model="sdxl", size="32x32", extra_body={"seed": 6, **FAST})
    np.testing.assert_array_equal(image.array(), pixels(rest.data[0].b64_json))


def test_samplers_and_live_generations_take_the_model(served):
    status, samplers = get(served, "/v1/samplers?model=sdxl")
    assert status == 200 and samplers["default_sampler"] == "ddim"
    assert {s["name"]: s["fits_served_model"] for s in samplers["data"]}["flow_match_euler"] is False
    status, body = get(served, "/v1/samplers?model=nope")
    assert status == 404 and body["error"]["param"] == "model"
    status, events = post(
        served,
        "/v1/generations",
        {"prompt": PROMPT, "model": "sdxl", "seed": 6, "size": "32x32", "preview_every": 0, **FAST},
    )
    assert status == 200 and "event: generation.completed" in events


def test_ldm_generate_model_and_sdxl_sizes_through_the_gateway_and_kserve(served, tmp_path):
    sizes = ["--original-size", "64", "48", "--crop-top-left", "8", "0", "--target-size", "32", "32"]
    for protocol, url in (("gateway", served.grpc_url), ("kserve", served.kserve_url)):
        done = subprocess.run(
            LDM
            + [
                "generate",
                PROMPT,
                "-o",
                str(tmp_path / f"{protocol}.png"),
                "--seed",
                "4",
                "--steps",
                "3",
                "--height",
                "32",
                "--width",
                "32",
                "--model",
                "sdxl",
                *sizes,
                "--protocol",
                protocol,
                "--url",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    with LdmClient(served.kserve_url) as kserve:
        expected = kserve.generate(PROMPT, model="sdxl", seed=4, height=32, width=32, **SDXL_SIZES, **FAST)
    for protocol in ("gateway", "kserve"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{protocol}.png").convert("RGB")), expected)
    unknown = subprocess.run(
        LDM + ["generate", PROMPT, "-o", str(tmp_path / "x.png"), "--model", "nope", "--url", served.grpc_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr and "'nope'" in unknown.stderr


def test_the_page_picks_a_model_from_v1_models(served):
    from tests.support.page_browser import chromium, missing, open_page, start

    if missing() is not None:
        pytest.skip(missing())
    with chromium() as browser:
        page = open_page(browser, served.rest_url + "/")
        page.wait_for_selector("#model[data-loaded=true]", state="attached")
        page.wait_for_selector("#sampler[data-loaded=true]", state="attached")
        options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent])")
        assert options == [["tiny", "tiny (sd, 32 px, default)"], ["sdxl", "sdxl (sdxl, 32 px)"]]
        assert page.input_value("#model") == "tiny"
        with page.expect_request(lambda r: "/v1/samplers?model=sdxl" in r.url):
            page.select_option("#model", "sdxl")
        with page.expect_request(lambda r: r.url.endswith("/v1/generations") and r.method == "POST") as sent:
            start(page, PROMPT, seed=5, steps=3, guidance=5.0, size="32x32")
        page.locator("#gallery .card").first.wait_for()
        assert json.loads(sent.value.post_data)["model"] == "sdxl"
        shown = page.get_attribute("#gallery .card img", "src")
        assert shown.startswith("blob:")
        assert not page.evaluate("window.__page.errors")


def png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
