"""The LoRA API's pieces without a server: `loras` as each front spells it (REST JSON and forms,
gRPC, KServe arrays, the clients' NAME:WEIGHT), admin keys, the pipeline's LoRA messages and how
their refusals are coded, field names of the pipeline's errors, the streamed upload, the OpenAPI
document, and `ldm serve --lora-dir`'s checks."""

import argparse
import asyncio
import json

from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
import numpy as np
import pytest

from serving.gateway import loras as gateway_loras, rest_params
from serving.gateway.access import Access, ApiKeys, hash_key
from serving.gateway.errors import ApiError, from_pipeline
from serving.gateway.generation import Generation, lora_inputs
from serving.gateway.pipeline import lora_refusal
from serving.triton import loras


def test_rest_loras_from_json_and_from_forms():
    parse = rest_params.parse_loras
    assert parse([{"name": "a"}, {"name": "b", "weight": -0.5}], from_form=False) == [("a", 1.0), ("b", -0.5)]
    assert parse("a:0.8, b", from_form=True) == [("a", 0.8), ("b", 1.0)]
    assert parse(['[{"name": "a", "weight": 2}]', "c:1"], from_form=True) == [("a", 2.0), ("c", 1.0)]
    for value, from_form, field in (
        ({"name": "a"}, False, "loras"),
        (["a"], False, "loras[0]"),
        ([{"weight": 1}], False, "loras[0].name"),
        ([{"name": "a", "weight": "x"}], False, "loras[0].weight"),
        ([{"name": "a", "weight": True}], False, "loras[0].weight"),
        ([{"name": "a", "scale": 1}], False, "loras[0].scale"),
        ("a:x", True, "loras[0].weight"),
        ("[nope", True, "loras"),
    ):
        with pytest.raises(ApiError) as info:
            parse(value, from_form)
        assert (info.value.code, info.value.field) == ("INVALID_ARG", field), value
    parsed = rest_params.parse({"prompt": "x", "loras": [{"name": "a"}]}, rest_params.GENERATIONS, from_form=False)
    assert parsed["loras"] == [("a", 1.0)]


def test_generation_sends_lora_names_and_weights_and_names_a_prompt_tag_refusal_prompt():
    declared = {"prompt": "TYPE_STRING", "seed": "TYPE_INT64", "lora_names": "TYPE_STRING", "lora_weights": "TYPE_FP32"}
    generation = Generation("x <lora:zz:1>", lora_inputs([("a", 0.8), ("b", float("nan"))]), seed=1).validate()
    arrays = generation.arrays(0, declared)
    assert arrays["lora_names"].tolist() == [b"a", b"b"] and arrays["lora_weights"].dtype == np.float32
    assert np.isnan(arrays["lora_weights"][1])  # the pipeline refuses it, naming loras[1].weight
    assert lora_inputs([]) == {}
    own = generation.refused(
        from_pipeline("[INVALID_ARG] loras[1].weight: must be a finite number in [-4.0, 4.0], got nan")
    )
    assert (own.field, own.message) == ("loras[1].weight", "must be a finite number in [-4.0, 4.0], got nan")
    tag = generation.refused(from_pipeline("[INVALID_ARG] loras[2].name: no adapter named 'zz'; loaded: a, b"))
    assert tag.field == "prompt" and "loras[2].name" in tag.message and "no adapter named 'zz'" in tag.message
    with pytest.raises(ApiError) as info:
        lora_inputs([("", 1.0)])
    assert info.value.field == "loras[0].name"


def test_pipeline_field_paths_and_lora_refusals():
    assert from_pipeline("[INVALID_ARG] region_prompts[1]: at most 16 tokens").field == "region_prompts[1]"
    assert from_pipeline("[INVALID_ARG] not a field: x").field is None
    gone = lora_refusal("[NOT_FOUND] name: no adapter named 'x'; loaded: a")
    assert (gone.code, gone.field, gone.message) == ("NOT_FOUND", "name", "no adapter named 'x'; loaded: a")
    assert lora_refusal("[NOT_FOUND] model: no model named 'm'").field == "model"
    big = lora_refusal("[TOO_LARGE] file: 9 bytes; at most 8 bytes per adapter file")
    assert (big.code, big.field) == ("TOO_LARGE", "file")
    assert lora_refusal("[FAILED_PRECONDITION] 'a' is used by a running generation").code == "FAILED_PRECONDITION"


def test_client_loras_spellings():
    from serving.client.images import build_request
    from serving.client.kserve import request_arrays
    from serving.client.loras import lora_pairs

    assert lora_pairs(["a:0.8", "b", ("c", -1), {"name": "d", "weight": 2}]) == [
        ("a", 0.8),
        ("b", 1.0),
        ("c", -1.0),
        ("d", 2.0),
    ]
    with pytest.raises(ValueError, match="NAME:WEIGHT"):
        lora_pairs(["a:x"])
    arrays = request_arrays("x", loras=["a:0.5", ("b", -1)])
    assert arrays["lora_names"].tolist() == [b"a", b"b"] and arrays["lora_weights"].tolist() == [0.5, -1.0]
    assert arrays["lora_weights"].dtype == np.float32
    assert request_arrays("x", lora_names=["a"], lora_weights=[0.25])["lora_weights"].dtype == np.float32
    request = build_request("x", loras=["a:0.5", "b"])
    assert [(lora.name, lora.weight) for lora in request.loras] == [("a", 0.5), ("b", 1.0)]


def test_admin_keys():
    text = f"alice {hash_key('k1')} admin\nbob {hash_key('k2')}\n"
    keys = ApiKeys.parse(text, "keys")
    assert keys.is_admin("k1") and not keys.is_admin("k2") and not keys.is_admin(None)
    access = Access(keys)
    access.require_admin("k1", "uploading")
    with pytest.raises(ApiError) as info:
        access.require_admin("k2", "uploading")
    assert info.value.code == "PERMISSION_DENIED"
    Access(None).require_admin(None, "uploading")  # without keys: anyone
    with pytest.raises(ValueError, match="admin"):
        ApiKeys.parse(f"carol {hash_key('k3')} root\n", "keys")


class FakeService:
    """PipelineService's LoRA surface (serving/core/service.py)."""

    def __init__(self, refuse=None):
        from serving.core.service import ServedModel

        self.refuse = refuse
        self.loaded = {}
        self.models = {"m": ServedModel("m", None, {}, None)}

    def model_of(self, inputs):
        from serving.core.request import text_field
        from serving.core.service import UnknownModel

        name = text_field(inputs, "model") or "m"
        if name != "m":
            raise UnknownModel(f"model: no model named {name!r}; this server serves m")
        return self.models["m"]

    def loras(self, model=""):
        return [{"id": n, "model": "m", "resident": False} for n in sorted(self.loaded)]

    def load_lora(self, name, data, model=""):
        if self.refuse:
            raise self.refuse
        self.loaded[name] = data

    def unload_lora(self, name, model=""):
        self.loaded.pop(name)


def test_lora_messages_answer_lists_and_coded_refusals():
    from serving.core.request import InvalidInput
    from serving.core.service import LoraInUse, LoraTooLarge

    svc = FakeService()
    file = {loras.FILE_INPUT: np.array([b"bytes"], object)}
    assert loras.answer(svc, {loras.ACTION_PARAMETER: "load", loras.NAME_PARAMETER: "a"}, file) == [
        {"id": "a", "model": "m", "resident": False}
    ]
    assert svc.loaded == {"a": b"bytes"}
    assert loras.decode(loras.encode(loras.answer(svc, {loras.ACTION_PARAMETER: "list"}, {})))[0]["id"] == "a"
    cases = [
        ({loras.ACTION_PARAMETER: "zap"}, {}, None, "INVALID_ARG", "lora_action: must be one of"),
        ({loras.ACTION_PARAMETER: "load"}, file, None, "INVALID_ARG", "name: is required"),
        ({loras.ACTION_PARAMETER: "load", loras.NAME_PARAMETER: "b"}, {}, None, "INVALID_ARG", "file: a load carries"),
        (
            {loras.ACTION_PARAMETER: "list", loras.MODEL_PARAMETER: "x"},
            {},
            None,
            "NOT_FOUND",
            "model: no model named 'x'",
        ),
        (
            {loras.ACTION_PARAMETER: "load", loras.NAME_PARAMETER: "b"},
            file,
            LoraTooLarge("file: 5 bytes; at most 4"),
            "TOO_LARGE",
            "file: 5 bytes",
        ),
        (
            {loras.ACTION_PARAMETER: "load", loras.NAME_PARAMETER: "b"},
            file,
            LoraInUse("'b' is used"),
            "FAILED_PRECONDITION",
            "'b'",
        ),
        (
            {loras.ACTION_PARAMETER: "load", loras.NAME_PARAMETER: "b"},
            file,
            InvalidInput("file", ".b.0123abcd.partial: not a LoRA file: '/srv/loras/m/.b.0123abcd.partial'"),
            "INVALID_ARG",
            "file: b.safetensors: not a LoRA file: the uploaded file",
        ),
    ]
    for parameters, inputs, refuse, code, start in cases:
        svc.refuse = refuse
        with pytest.raises(loras.LoraMessageError) as info:
            loras.answer(svc, parameters, inputs)
        assert info.value.code == code and str(info.value).startswith(start), (parameters, str(info.value))


def upload_app(limit: int) -> web.Application:
    async def handler(request):
        name, data, model = await gateway_loras.read_upload(request, limit)
        return web.json_response({"name": name, "size": len(data), "model": model})

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except ApiError as error:
            return web.json_response({"code": error.code, "field": error.field}, status=400)

    app = web.Application(middlewares=[errors])
    app.router.add_post("/up", handler)
    return app


def test_the_upload_is_read_as_a_stream_within_its_own_limit():
    async def scenario():
        async with TestClient(TestServer(upload_app(1000))) as client:

            async def post(fields):
                form = FormData(default_to_multipart=True)
                for name, value, filename in fields:
                    form.add_field(name, value, filename=filename)
                response = await client.post("/up", data=form)
                return await response.json()

            assert await post([("file", b"x" * 10, "ink.safetensors")]) == {"name": "ink", "size": 10, "model": ""}
            assert await post([("file", b"x" * 10, "f.bin"), ("name", "a", None), ("model", "m", None)]) == {
                "name": "a",
                "size": 10,
                "model": "m",
            }
            assert await post([("file", b"x" * 5000, "big.safetensors")]) == {"code": "TOO_LARGE", "field": "file"}
            assert await post([("name", "a", None)]) == {"code": "INVALID_ARG", "field": "file"}
            assert await post([("file", b"x", "f"), ("file", b"y", "g")]) == {"code": "INVALID_ARG", "field": "file"}
            assert await post([("file", b"x", "f"), ("colour", "red", None)]) == {
                "code": "INVALID_ARG",
                "field": "colour",
            }
            raw = b'--b0\r\nContent-Disposition: form-data; name="file"\r\n\r\nxyz\r\n--b0--\r\n'  # a file part without filename
            response = await client.post("/up", data=raw, headers={"Content-Type": "multipart/form-data; boundary=b0"})
            assert await response.json() == {"code": "INVALID_ARG", "field": "name"}
            response = await client.post("/up", json={"file": "x"})
            assert await response.json() == {"code": "INVALID_ARG", "field": "body"}

            async def stream():  # chunked, no Content-Length: the file part's cap stops it
                boundary = "b0undary"
                yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.safetensors"\r\n\r\n'.encode()
                for _ in range(10):
                    yield b"z" * 500
                yield f"\r\n--{boundary}--\r\n".encode()

            response = await client.post(
                "/up", data=stream(), headers={"Content-Type": "multipart/form-data; boundary=b0undary"}
            )
            assert await response.json() == {"code": "TOO_LARGE", "field": "file"}

    asyncio.run(scenario())


def test_the_document_declares_the_lora_routes_and_fields():
    from serving.gateway.openapi import document

    doc = document()
    assert set(doc["paths"]["/v1/loras"]) == {"get", "post"} and set(doc["paths"]["/v1/loras/{name}"]) == {
        "get",
        "delete",
    }
    upload = doc["paths"]["/v1/loras"]["post"]
    assert {"400", "403", "409", "413"} <= set(upload["responses"]) and "admin" in upload["responses"]["403"][
        "description"
    ]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert "409" in doc["paths"]["/v1/loras/{name}"]["delete"]["responses"]
    schemas = doc["components"]["schemas"]
    lora = schemas["GenerationsRequest"]["properties"]["loras"]
    assert lora["maxItems"] == 4 and lora["items"]["properties"]["weight"]["maximum"] == 4
    assert schemas["EditsRequest"]["properties"]["loras"]["type"] == "string"
    live = schemas["LiveGenerationRequest"]["properties"]["loras"]
    assert live["items"]["required"] == ["name"] and live["maxItems"] == 4
    assert schemas["Lora"]["properties"]["object"] == {"const": "lora"}


def serve_args(**values):
    defaults = dict(lora=False, lora_dir="", unet=None, gpu=False, backend="python")
    return argparse.Namespace(**{**defaults, **values})


def test_ldm_serve_lora_dir_checks_and_writes_the_folder(tmp_path):
    from serving.triton.serve import check_lora_options, set_lora_dir

    check_lora_options(serve_args(lora_dir=str(tmp_path)))
    check_lora_options(serve_args(lora_dir=str(tmp_path), unet="torch"))
    check_lora_options(serve_args(lora_dir=str(tmp_path), gpu=True, backend="python"))  # torch by default: serves LoRA
    with pytest.raises(ValueError, match="not bls"):
        check_lora_options(serve_args(lora_dir=str(tmp_path), unet="bls"))
    with pytest.raises(ValueError, match="give --unet torch or inprocess"):
        check_lora_options(serve_args(lora=True, gpu=True, backend="onnxruntime"))
    with pytest.raises(ValueError, match="no folder"):
        check_lora_options(serve_args(lora_dir=str(tmp_path / "missing")))
    check_lora_options(serve_args(unet="bls"))  # without LoRA: anything goes

    repo = tmp_path / "repo"
    (repo / "pipeline" / "1").mkdir(parents=True)
    (repo / "pipeline" / "config.pbtxt").write_text('name: "pipeline"\nbackend: "python"\n')
    info = {"models": {"m": {"primary": "base", "variants": {"base": {}}}}}
    (repo / "pipeline" / "1" / "pipeline.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="no LoRA inputs"):
        set_lora_dir(repo, tmp_path)
    info["models"]["m"]["variants"]["base"]["lora_unet"] = "unet_lora.onnx"
    (repo / "pipeline" / "1" / "pipeline.json").write_text(json.dumps(info))
    set_lora_dir(repo, tmp_path)
    text = (repo / "pipeline" / "config.pbtxt").read_text()
    assert 'key: "lora_dir"' in text and str(tmp_path.resolve()) in text and 'string_value: "true"' in text


def test_new_admin_key_line(capsys):
    from serving.cli import main

    assert main(["gateway", "--new-key", "ops", "--admin"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[-3:][0] == "ops" and line.endswith(" admin")
    keys = ApiKeys.parse(line.split(":  ", 1)[1], "printed")
    assert len(keys.admins) == 1
