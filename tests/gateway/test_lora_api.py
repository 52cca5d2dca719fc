"""LoRA adapters through the public API, end to end against a real tritonserver and gateway (with
API keys: an admin key and a user key): a repository exported with `lora_dir` (adapter `c`
registered at start) and a 1 MB max_lora_file_mb; two adapters uploaded through REST
(POST /v1/loras, multipart); 16 concurrent requests through the real `openai` SDK mixing them by
`loras` and by `<lora:name:w>` tags, each equal to byte to what the in-process pipeline gives for
that request alone (and that to diffusers' load_lora_weights + set_adapters, <= 1/255); the
requests shared UNet calls; gRPC ListLoras / LoadLora / UnloadLora and typed Generate; KServe's
lora_names / lora_weights; `ldm generate --lora`; and the refusals (unknown adapter, NaN or out of
range weight, too many, an upload over the limit, not safetensors, another model's layers, a
non-admin key, DELETE or replacing an adapter a running generation uses: 409); a live generation
steered to other adapters."""

import asyncio
import base64
import io
import json
import shutil

import numpy as np
import openai
from PIL import Image
import pytest
import requests

from tests.support.server_metrics import idle_metrics, metrics, wait_for

PROMPT = "a red circle"
STEPS = 6
SIZE = "32x32"
ADMIN, USER = "ldm-test-admin-key", "ldm-test-user-key"
# (loras field, tags added to the prompt, (weight of a, weight of b, weight of c)) per adapter set
SETS = [
    ([], "", (0.0, 0.0, 0.0)),
    ([{"name": "a"}], "", (1.0, 0.0, 0.0)),
    ([{"name": "b", "weight": 0.7}], "", (0.0, 0.7, 0.0)),
    ([{"name": "a", "weight": 0.8}, {"name": "b", "weight": -0.5}], "", (0.8, -0.5, 0.0)),
    ([], " <lora:a:0.8> <lora:b:-0.5>", (0.8, -0.5, 0.0)),  # by tags only
    ([{"name": "b", "weight": -0.5}], " <lora:a:0.8>", (0.8, -0.5, 0.0)),  # a field and a tag
    ([{"name": "c", "weight": 1.5}], "", (0.0, 0.0, 1.5)),  # the folder's adapter
    ([], " <lora:c:-1>", (0.0, 0.0, -1.0)),
]


def pixels(data) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


class Served:
    def __init__(self, server, gateway, repo, params, files, folder):
        self.server, self.gateway, self.repo, self.params, self.files, self.folder = (
            server,
            gateway,
            repo,
            params,
            files,
            folder,
        )
        self.rest_url = gateway.rest_url

    def call(self, method, path, key=USER, headers=(), **kwargs):
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **dict(headers)}
        return requests.request(method, self.rest_url + path, headers=headers, timeout=120, **kwargs)

    def upload(self, name, data, filename=None, key=ADMIN, model=None):
        form = {"name": name} if name else {}
        if model is not None:
            form["model"] = model
        return self.call("POST", "/v1/loras", key, files={"file": (filename or f"{name}.safetensors", data)}, data=form)

    def generate(self, prompt=PROMPT, seed=0, **body):
        return self.call(
            "POST",
            "/v1/images/generations",
            json={"prompt": prompt, "size": SIZE, "steps": STEPS, "seed": seed, **body},
        )


@pytest.fixture(scope="module")
def lora_files(tiny_checkpoint, tmp_path_factory):
    from tests.support.loras import ADAPTERS, write_lora

    root = tmp_path_factory.mktemp("lora-files")
    return {name: write_lora(tiny_checkpoint, root / name, *spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def served(tiny_checkpoint, lora_files, tmp_path_factory, triton_servers):
    """A server of this module's own: its tests upload, replace and delete adapters in it."""
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.gateway.access import hash_key
    from serving.gateway.process import GatewayProcess

    folder = tmp_path_factory.mktemp("lora-api")
    lora_dir = folder / "loras"
    lora_dir.mkdir()
    shutil.copy(lora_files["a"], lora_dir / "c.safetensors")  # registered at start, named by its stem
    params = {**pipeline_parameters(lora_dir=str(lora_dir)), "max_lora_file_mb": 1}
    repo = folder / "repo"
    write_repository(tiny_checkpoint, repo, pipeline_parameters=params, log=lambda *a: None)
    keys = folder / "keys"
    keys.write_text(f"admin {hash_key(ADMIN)} admin\nuser {hash_key(USER)}\n")
    with triton_servers.running(repo, "tritonserver-lora-api") as server:
        with GatewayProcess(
            server.grpc_url,
            log_file=folder / "gateway.log",
            control_secret=server.control_secret,
            extra_args=["--api-keys", str(keys)],
        ) as gateway:
            yield Served(server, gateway, repo, params, lora_files, folder)


@pytest.fixture(scope="module")
def local(served, tmp_path_factory):
    """The same repository's pipeline in this process (ONNX Runtime), with the same adapters."""
    from serving.core.config import PipelineConfig
    from serving.core.service import PipelineAssets, PipelineService
    from serving.models.adapters import read_adapter
    from serving.models.onnx import local_variants

    own = tmp_path_factory.mktemp("local-loras")  # its uploads beside its own copy of the folder
    shutil.copy(served.files["a"], own / "c.safetensors")
    params = {**served.params, "lora_dir": str(own)}
    svc = PipelineService(
        PipelineAssets.read(served.repo / "pipeline" / "1"),
        PipelineConfig.parse({k: str(v) for k, v in params.items()}),
        local_variants(served.repo),
        lora_reader=read_adapter,
    )
    for name in ("a", "b"):
        svc.load_lora(name, served.files[name].read_bytes())
    return svc


def uploaded(served):
    """The adapters the first test uploads (a, b), uploaded when a test runs without it."""
    held = {e["id"] for e in served.call("GET", "/v1/loras").json()["data"]}
    for name in {"a", "b"} - held:
        assert served.upload(name, served.files[name].read_bytes()).status_code == 200
    return served


def alone(svc, prompt, seed, loras) -> np.ndarray:
    from tests.support.image_inputs import generate

    fields = {}
    if loras:
        fields = dict(
            lora_names=[lora["name"] for lora in loras],
            lora_weights=np.array([lora.get("weight", 1.0) for lora in loras], np.float32),
        )
    return generate(svc, prompt, seed=seed, steps=STEPS, height=32, width=32, **fields)


def test_uploads_by_an_admin_key_then_sixteen_mixed_requests_each_equal_the_request_alone(
    served, local, tiny_checkpoint
):
    listed = served.call("GET", "/v1/loras").json()
    assert listed == {"object": "list", "data": [{"id": "c", "object": "lora", "model": "tiny", "resident": False}]}
    refused = served.upload("a", served.files["a"].read_bytes(), key=USER)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied", refused.text
    assert served.upload("a", b"x", key=None).status_code == 401
    # named by the file's stem; then with a name given for diffusers' own file name
    answer = served.upload(None, served.files["a"].read_bytes(), filename="a.safetensors")
    assert answer.status_code == 200 and answer.json() == {
        "id": "a",
        "object": "lora",
        "model": "tiny",
        "resident": False,
    }
    assert (
        served.upload("b", served.files["b"].read_bytes(), filename="pytorch_lora_weights.safetensors").status_code
        == 200
    )
    assert [e["id"] for e in served.call("GET", "/v1/loras").json()["data"]] == ["a", "b", "c"]
    assert served.call("GET", "/v1/loras/b").json()["model"] == "tiny"

    requests_ = [(SETS[i % len(SETS)], i) for i in range(16)]
    before = idle_metrics(served.server)

    async def crowd():
        async with openai.AsyncOpenAI(
            base_url=served.rest_url + "/v1", api_key=USER, max_retries=0, timeout=300
        ) as sdk:
            calls = [
                sdk.images.generate(
                    prompt=PROMPT + tags,
                    size=SIZE,
                    extra_body={"seed": seed, "steps": STEPS, **({"loras": loras} if loras else {})},
                )
                for (loras, tags, _), seed in requests_
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(crowd())
    assert wait_for(
        lambda: metrics(served.server)["ldm_images_completed_total"] >= before["ldm_images_completed_total"] + 16
    )
    after = metrics(served.server)
    rows, steps = (after[k] - before[k] for k in ("ldm_unet_rows_total", "ldm_unet_steps_total"))
    assert rows > 2 * steps, rows / steps  # requests with different adapters shared UNet calls
    images = [pixels(a.data[0].b64_json) for a in answers]
    for ((loras, tags, _weights), seed), image in zip(requests_, images):
        expected = alone(local, PROMPT + tags, seed, loras)
        assert image.tobytes() == expected.tobytes(), (loras, tags, seed)
    # the same adapter set by fields, by tags or both gives the same image (seeds 3, 4, 5 differ: compare alone)
    assert alone(local, PROMPT + SETS[4][1], 3, []).tobytes() == images[3].tobytes()
    assert alone(local, PROMPT + SETS[5][1], 3, SETS[5][0]).tobytes() == images[3].tobytes()
    assert not np.array_equal(images[0], images[8])  # seeds 0 and 8, no adapter: differ by seed only
    check_against_diffusers(tiny_checkpoint, served.files, requests_, images)


def check_against_diffusers(checkpoint, files, requests_, images):
    """Each adapter set's first request against diffusers' pipeline with the same adapters
    (load_lora_weights, set_adapters) run alone; `c` is a copy of `a`."""
    import torch
    from diffusers import StableDiffusionPipeline

    from serving.core.sampler import noise_generator

    reference = StableDiffusionPipeline.from_pretrained(checkpoint)
    reference.set_progress_bar_config(disable=True)
    for name in ("a", "b"):
        reference.load_lora_weights(str(files[name]), adapter_name=name)
    for ((_, tags, (a, b, c)), seed), image in list(zip(requests_, images))[: len(SETS)]:
        reference.set_adapters(["a", "b"], [a + c, b])
        latents = torch.from_numpy(noise_generator(seed).standard_normal((4, 8, 8), dtype=np.float32))[None]
        expected = reference(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            height=32,
            width=32,
            latents=latents,
            output_type="np",
        ).images[0]
        error = np.abs((expected * 255).round() - image).mean()
        assert error <= 1.0, (tags, (a, b, c), error)


def test_grpc_lists_loads_and_unloads_and_generates_with_loras_as_rest_kserve_and_the_cli_do(served, tmp_path):
    from serving.cli import main
    from serving.client.images import ImagesClient, ImagesError
    from serving.client.kserve import LdmClient

    uploaded(served)
    fields = dict(seed=5, steps=STEPS, height=32, width=32)
    with (
        ImagesClient(served.gateway.grpc_url, api_key=ADMIN) as admin,
        ImagesClient(served.gateway.grpc_url, api_key=USER) as user,
    ):
        assert {a["id"] for a in user.loras()} >= {"a", "b", "c"}
        assert admin.load_lora("g", served.files["b"]) == {"id": "g", "model": "tiny", "resident": False}
        with pytest.raises(ImagesError) as info:
            user.load_lora("h", served.files["b"])
        assert info.value.code == "PERMISSION_DENIED"
        assert "g" in [a["id"] for a in user.loras("tiny")]
        by_grpc = user.generate(PROMPT, loras=[("g", 0.7)], **fields)[0].array()
        for bad, field in (([("zz", 1.0)], "loras[0].name"), ([("a", float("nan"))], "loras[0].weight")):
            with pytest.raises(ImagesError) as info:
                user.generate(PROMPT, loras=bad, **fields)
            assert (info.value.code, info.value.field) == ("INVALID_ARGUMENT", field), info.value
        assert "loaded: a, b, c, g" in user_error(user, [("zz", 1.0)])
        admin.unload_lora("g")
        with pytest.raises(ImagesError) as info:
            admin.unload_lora("g")
        assert (info.value.code, info.value.field) == ("NOT_FOUND", "name")
        assert "g" not in [a["id"] for a in user.loras()]
    by_rest = pixels(served.generate(loras=[{"name": "b", "weight": 0.7}], seed=5).json()["data"][0]["b64_json"])
    assert by_grpc.tobytes() == by_rest.tobytes()  # g was b's file
    with LdmClient(served.server.grpc_url) as kserve:  # Triton's own port: lora_names / lora_weights
        by_kserve = kserve.generate(PROMPT, loras=["b:0.7"], **fields)
    assert by_kserve.tobytes() == by_rest.tobytes()
    out = tmp_path / "cli.png"
    assert (
        main(
            [
                "generate",
                PROMPT,
                "--lora",
                "b:0.7",
                "--seed",
                "5",
                "--steps",
                str(STEPS),
                "--height",
                "32",
                "--width",
                "32",
                "--url",
                served.gateway.grpc_url,
                "--api-key",
                USER,
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert pixels(out.read_bytes()).tobytes() == by_rest.tobytes()


def user_error(client, loras) -> str:
    from serving.client.images import ImagesError

    try:
        client.generate(PROMPT, loras=loras, steps=STEPS, height=32, width=32)
    except ImagesError as error:
        return error.message
    raise AssertionError("not refused")


def refusal(response, status, param):
    body = response.json()
    assert response.status_code == status and body["error"]["param"] == param, (status, param, response.text)
    return body["error"]["message"]


def test_refusals_name_the_field(served, tmp_path):
    from safetensors.numpy import save

    uploaded(served)
    message = refusal(served.generate(loras=[{"name": "zz"}]), 400, "loras[0].name")
    assert "no adapter named 'zz'; loaded: a, b, c" in message
    assert "no adapter named 'zz'" in refusal(served.generate(prompt=PROMPT + " <lora:zz:1>"), 400, "prompt")
    nan = served.call(
        "POST",
        "/v1/images/generations",
        data='{"prompt": "x", "steps": 2, "loras": [{"name": "a", "weight": NaN}]}',
        headers={"Content-Type": "application/json"},
    )
    assert "finite number in [-4.0, 4.0], got nan" in refusal(nan, 400, "loras[0].weight")
    assert "[-4.0, 4.0], got 5.0" in refusal(
        served.generate(loras=[{"name": "a", "weight": 5}]), 400, "loras[0].weight"
    )
    assert "got -4.5" in refusal(served.generate(prompt=PROMPT + " <lora:a:-4.5>"), 400, "prompt")
    many = [{"name": n} for n in ("a", "b", "c")] * 2
    assert "at most 4 per request" in refusal(served.generate(loras=many[:5]), 400, "loras")
    assert "named twice" in refusal(served.generate(loras=[{"name": "a"}, {"name": "a"}]), 400, "loras[1].name")
    assert refusal(served.generate(loras=[{"name": "a", "colour": 1}]), 400, "loras[0].colour")
    # the edits form takes `name:weight,...`
    image = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image, format="PNG")
    edit = served.call(
        "POST",
        "/v1/images/edits",
        files={"image": ("i.png", image.getvalue())},
        data={"prompt": PROMPT, "steps": "2", "loras": "a:0.5,zz:1"},
    )
    assert "loaded: a, b, c" in refusal(edit, 400, "loras[1].name")
    # uploads: over the 1 MB limit (before the pipeline reads it), not safetensors, another model's layers, a bad name
    assert "at most 1048576 bytes" in refusal(served.upload("big", b"\0" * (2 * 2**20)), 413, "file")
    assert "not a LoRA file" in refusal(served.upload("junk", b"not a safetensors file"), 400, "file")
    other = save(
        {
            "unet.down_blocks.9.attentions.0.proj_in.lora.down.weight": np.zeros((2, 32), np.float32),
            "unet.down_blocks.9.attentions.0.proj_in.lora.up.weight": np.zeros((32, 2), np.float32),
        }
    )
    message = refusal(served.upload("other", other), 400, "file")
    assert "layer unet.down_blocks.9.attentions.0.proj_in is not a layer" in message and ".partial" not in message
    assert "letters, digits" in refusal(served.upload("a b", served.files["a"].read_bytes()), 400, "name")
    assert refusal(served.call("POST", "/v1/loras", ADMIN, files={"name": (None, "x")}), 400, "file")
    assert refusal(served.call("POST", "/v1/loras", ADMIN, data={"name": "x"}), 400, "body")  # not multipart
    assert refusal(served.call("GET", "/v1/loras?model=nope"), 404, "model")
    assert refusal(served.call("DELETE", "/v1/loras/zz", ADMIN), 404, "name")
    assert refusal(served.call("DELETE", "/v1/loras/a", USER), 403, None) is not None
    assert [e["id"] for e in served.call("GET", "/v1/loras").json()["data"]] == ["a", "b", "c"]  # nothing changed


def test_an_adapter_a_running_generation_uses_is_neither_removed_nor_replaced(served):
    from serving.client.generations import GenerationError, GenerationsClient

    uploaded(served)

    async def scenario():
        async with GenerationsClient(served.rest_url, api_key=USER) as client:
            body = {"prompt": PROMPT, "size": SIZE, "steps": 150, "loras": [{"name": "b", "weight": 0.5}]}
            async with client.start(body) as running:
                async for event in running:
                    if event.name == "generation.progress":
                        break
                deleted = await asyncio.to_thread(served.call, "DELETE", "/v1/loras/b", ADMIN)
                replaced = await asyncio.to_thread(served.upload, "b", served.files["a"].read_bytes())
                steered, _ = await client.steer(running.id, loras=[{"name": "a", "weight": 0.5}])  # from its next step
                with pytest.raises(GenerationError) as refused:
                    await client.steer(running.id, loras=[{"name": "zz"}])
                await client.cancel(running.id)
            return deleted, replaced, steered, refused.value

    deleted, replaced, steered, refused = asyncio.run(asyncio.wait_for(scenario(), 180))
    assert steered["steer_id"] == 1
    assert (refused.status, refused.param) == (400, "loras[0].name") and "loaded: a, b, c" in str(refused)
    assert "used by a running generation" in refusal(deleted, 409, None)
    assert refusal(replaced, 409, None)
    assert wait_for(lambda: served.call("DELETE", "/v1/loras/b", ADMIN).status_code == 200, timeout=60)
    assert [e["id"] for e in served.call("GET", "/v1/loras").json()["data"]] == ["a", "c"]
    assert "loaded: a, c" in refusal(served.generate(loras=[{"name": "b"}]), 400, "loras[0].name")
    assert served.upload("b", served.files["b"].read_bytes()).status_code == 200  # back, for whatever runs next


def test_the_pages_picker_lists_the_adapters_and_sends_the_chosen_ones(served, local):
    from tests.support.page_browser import chromium, missing, open_page, page_errors, start

    if missing():
        pytest.skip(missing())
    uploaded(served)
    with chromium() as browser:
        page = open_page(browser, served.rest_url + "/")
        page.click("details:has(#api_key) summary")  # the lists need the key
        page.fill("#api_key", USER)
        page.dispatch_event("#api_key", "change")
        page.wait_for_selector("#lora_list .lora[data-name=c]")
        assert page.eval_on_selector_all("#lora_list .lora", "rows => rows.map(r => r.dataset.name)") == ["a", "b", "c"]
        page.check("#lora_a")
        page.fill("#lora_list .lora[data-name=b] input[type=number]", "-0.5")  # a weight typed checks its box
        with page.expect_request("**/v1/generations") as sent:
            start(page, PROMPT, seed=3, steps=STEPS, guidance=5.0, size=SIZE)
        assert json.loads(sent.value.post_data)["loras"] == [{"name": "a", "weight": 1}, {"name": "b", "weight": -0.5}]
        page.wait_for_function("document.getElementById('status').dataset.state === 'done'")
        shown = page.eval_on_selector("#gallery .card img", "img => img.src")
        raw = page.evaluate("async (url) => Array.from(new Uint8Array(await (await fetch(url)).arrayBuffer()))", shown)
        assert page.text_content("#gallery .card .params").count("a:1, b:-0.5") == 1
        assert page_errors(page) == []
        page.context.close()
    expected = alone(local, PROMPT, 3, [{"name": "a", "weight": 1.0}, {"name": "b", "weight": -0.5}])
    assert pixels(bytes(raw)).tobytes() == expected.tobytes()  # the page's image is the request's, alone
