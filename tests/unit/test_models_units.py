"""Several models behind one gateway, without a server: which model a request's `model` names
(serving/gateway/models.py), the list GET /v1/models and ListModels give, samplers and costs per
model, the SDXL size fields as REST parameters, gRPC fields and KServe tensors, and
`ldm serve --checkpoint [NAME=]DIR` (serving/triton/serve.py)."""

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from serving.client.kserve import request_arrays
from serving.gateway import models, rest_params
from serving.gateway.costs import work_units
from serving.gateway.errors import ApiError
from serving.gateway.generation import Generation
from serving.gateway.grpc_api import models_message, to_generation
from serving.gateway.pipeline import PipelineModel
from serving.gateway.protos import images_pb2
from serving.gateway.samplers import served_samplers
from serving.triton import serve

DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
TABLE = [  # as export/repository.py model_list writes it; the default need not come first
    {
        "id": "xl",
        "family": "sdxl",
        "default": False,
        "native_size": 1024,
        "max_size": 2048,
        "tasks": ["txt2img", "img2img"],
        "scheduler_config": DDIM,
    },
    {
        "id": "sd15",
        "family": "sd",
        "default": True,
        "native_size": 512,
        "max_size": 1024,
        "tasks": ["txt2img", "img2img", "inpaint"],
        "scheduler_config": DDIM,
    },
    {
        "id": "flow",
        "family": "sd",
        "default": False,
        "native_size": 512,
        "max_size": 1024,
        "tasks": ["txt2img"],
        "scheduler_config": FLOW,
    },
]
INPUTS = {"prompt": "TYPE_STRING", "model": "TYPE_STRING", "original_size": "TYPE_INT32"}


def pipeline(table=TABLE, inputs=INPUTS, **parameters) -> PipelineModel:
    return PipelineModel(
        dict(inputs),
        {
            "default_steps": "25",
            "native_size": "512",
            "default_guidance_scale": "5.0",
            "models": json.dumps(table),
            **parameters,
        },
        read_at=1234,
    )


def test_the_list_has_every_model_the_default_first_in_openais_shape():
    listed = models.rest_list(models.served_models(pipeline()), 1234)
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["sd15", "xl", "flow"]
    first = listed["data"][0]
    assert first == {
        "id": "sd15",
        "object": "model",
        "created": 1234,
        "owned_by": "ldm-serving",
        "family": "sd",
        "native_size": 512,
        "max_size": 1024,
        "tasks": ["txt2img", "img2img", "inpaint"],
        "default_sampler": "ddim",
        "default_sigma_schedule": "default",
        "default": True,
    }
    assert [m["default_sampler"] for m in listed["data"]] == ["ddim", "ddim", "flow_match_euler"]
    grpc_list = models_message(pipeline())
    assert [(m.id, m.family, m.is_default, m.native_size) for m in grpc_list.models] == [
        ("sd15", "sd", True, 512),
        ("xl", "sdxl", False, 1024),
        ("flow", "sd", False, 512),
    ]
    assert grpc_list.models[1].tasks == ["txt2img", "img2img"] and grpc_list.models[0].created == 1234


def test_an_export_without_the_models_table_is_one_default_model():
    old = PipelineModel(
        {"prompt": "TYPE_STRING", "init_image": "TYPE_UINT8"},
        {"native_size": "64", "scheduler_config": json.dumps(DDIM)},
    )
    (only,) = models.served_models(old)
    assert (only.id, only.family, only.default, only.native_size, only.max_size) == ("default", "sd", True, 64, 128)
    assert only.tasks == ("txt2img", "img2img", "inpaint") and only.default_sampler == ("ddim", "default")
    assert models.served_models(None) == []
    inputs = {"model": "default"}
    assert models.resolve(inputs, old).id == "default" and inputs == {}  # that pipeline takes no `model`


@pytest.mark.parametrize(
    "name, served, sent",
    [
        ("", "sd15", None),  # no model: the default, unnamed
        ("xl", "xl", "xl"),
        ("sd15", "sd15", "sd15"),  # the default by its name
        ("dall-e-2", "sd15", None),  # OpenAI's image models: the default
        ("dall-e-3", "sd15", None),
        ("gpt-image-1", "sd15", None),
        ("gpt-image-1-mini", "sd15", None),
    ],
)
def test_a_request_names_a_served_model_or_the_default(name, served, sent):
    inputs = {"model": name, "steps": 4}
    assert models.resolve(inputs, pipeline()).id == served
    assert inputs.get("model") == sent and inputs["steps"] == 4


def test_a_served_model_named_like_an_openai_model_is_that_model():
    table = TABLE + [{**TABLE[0], "id": "dall-e-3", "default": False}]
    assert models.resolve({"model": "dall-e-3"}, pipeline(table)).id == "dall-e-3"


@pytest.mark.parametrize("name", ["sd-15", "SD15", "ldm-shapes", "dall-e", "gpt-4o"])
def test_an_unknown_model_is_not_found_naming_it_and_the_served_ones(name):
    with pytest.raises(ApiError) as info:
        models.resolve({"model": name}, pipeline())
    error = info.value
    assert (error.code, error.field) == ("NOT_FOUND", "model")
    assert repr(name) in error.message and "sd15, xl, flow" in error.message
    with pytest.raises(ApiError, match="no model named 'dall-e-2'"):
        models.lookup(models.served_models(pipeline()), "dall-e-2")  # GET /v1/models/{id}: served ids only


def test_samplers_fit_the_model_asked_about():
    def fits(name):
        return {s["name"]: s["fits_served_model"] for s in served_samplers(pipeline(), name).samplers}

    assert fits("")["ddim"] and not fits("")["flow_match_euler"]
    assert fits("flow")["flow_match_euler"] and not fits("flow")["ddim"]
    assert served_samplers(pipeline(), "flow").default == ("flow_match_euler", "default")
    assert served_samplers(pipeline(default_sampler="Euler a"), "xl").default == ("euler_ancestral", "default")
    with pytest.raises(ApiError) as info:
        served_samplers(pipeline(), "nope")
    assert info.value.code == "NOT_FOUND"
    assert served_samplers(None).default is None  # not known yet


def test_an_image_costs_its_work_at_its_models_native_size():
    model = pipeline()
    assert work_units(Generation("x", {"height": 1024, "width": 1024}), model) == pytest.approx(4.0)
    assert work_units(Generation("x", {"model": "xl", "height": 1024, "width": 1024}), model) == pytest.approx(1.0)
    assert work_units(Generation("x", {"model": "xl", "height": 2048, "width": 1024}), model) == pytest.approx(2.0)


def test_sdxl_sizes_and_model_as_rest_parameters():
    parsed = rest_params.parse(
        {
            "prompt": "x",
            "model": "xl",
            "original_size": [1024, 768],
            "crop_top_left": [0, 0],
            "target_size": [1024.0, 1024],
        },
        rest_params.GENERATIONS,
        from_form=False,
    )
    assert parsed["model"] == "xl" and parsed["original_size"] == [1024, 768] and parsed["target_size"] == [1024, 1024]
    form = rest_params.parse(
        {"prompt": "x", "image": object(), "original_size": "512,256", "crop_top_left": ["8", "16"]},
        rest_params.EDITS,
        from_form=True,
    )
    assert form["original_size"] == [512, 256] and form["crop_top_left"] == [8, 16]
    for body, field in (
        ({"model": 3}, "model"),
        ({"original_size": [1.5, 2]}, "original_size"),
        ({"original_size": [64, 64, 64]}, "original_size"),
        ({"original_size": [0, 64]}, "original_size"),
        ({"crop_top_left": [-1, 0]}, "crop_top_left"),
        ({"target_size": "64x64"}, "target_size"),
        ({"target_size": [True, 64]}, "target_size"),
        ({"target_size": [64, 16385]}, "target_size"),
    ):
        with pytest.raises(ApiError) as info:
            rest_params.parse({"prompt": "x", **body}, rest_params.GENERATIONS, from_form=False)
        assert (info.value.code, info.value.field) == ("INVALID_ARG", field)


def test_sdxl_sizes_and_model_as_grpc_fields():
    request = images_pb2.GenerateRequest(prompt="x", model="xl", original_size=[1024, 768], target_size=[512, 512])
    generation = to_generation(request, streaming=False)
    assert generation.inputs == {"model": "xl", "original_size": [1024, 768], "target_size": [512, 512]}
    arrays = generation.validate().arrays(0, {**INPUTS, "target_size": "TYPE_INT32", "seed": "TYPE_INT64"})
    assert arrays["original_size"].dtype == np.int32 and arrays["original_size"].tolist() == [1024, 768]
    with pytest.raises(ApiError) as info:
        to_generation(images_pb2.GenerateRequest(prompt="x", crop_top_left=[1]), streaming=False).validate()
    assert info.value.field == "crop_top_left" and "[top, left]" in info.value.message


def test_the_kserve_client_sends_model_and_sdxl_sizes():
    arrays = request_arrays(
        "x", model="xl", original_size=[1024, 768], crop_top_left=(0, 0), target_size=np.array([512, 512], np.int32)
    )
    assert arrays["model"].tolist() == [b"xl"]
    assert all(
        arrays[n].dtype == np.int32 and arrays[n].shape == (2,)
        for n in ("original_size", "crop_top_left", "target_size")
    )
    with pytest.raises(InferenceServerException, match="original_size"):
        request_arrays("x", original_size=[1.5, 2])
    with pytest.raises(InferenceServerException, match="target_size"):
        request_arrays("x", target_size=np.array([512, 512]))  # an array is sent as given: int64 is refused


def test_serve_checkpoints_are_named_and_duplicates_refused(tmp_path):
    for name in ("base", "xl", "odd=name"):
        (tmp_path / name).mkdir()
    assert serve.checkpoints([]) == (None, None, {})
    assert serve.checkpoints([str(tmp_path / "base")]) == (None, tmp_path / "base", {})
    name, first, others = serve.checkpoints(
        [f"main={tmp_path / 'base'}", str(tmp_path / "xl"), f"big={tmp_path / 'xl'}"]
    )
    assert (name, first, others) == ("main", tmp_path / "base", {"xl": tmp_path / "xl", "big": tmp_path / "xl"})
    # an existing folder is a DIR, `=` or not; the default model's name prefixes no Triton model
    assert serve.checkpoints([str(tmp_path / "odd=name")]) == (None, tmp_path / "odd=name", {})
    with pytest.raises(ValueError, match="cannot name a model"):
        serve.checkpoints([str(tmp_path / "base"), str(tmp_path / "odd=name")])
    with pytest.raises(ValueError, match="two models named 'xl'"):
        serve.checkpoints([str(tmp_path / "base"), str(tmp_path / "xl"), f"xl={tmp_path / 'base'}"])
    with pytest.raises(ValueError, match="two models named 'base'"):
        serve.checkpoints([str(tmp_path / "base"), f"base={tmp_path / 'xl'}"])
    with pytest.raises(ValueError, match="NAME must be"):
        serve.checkpoints([str(tmp_path / "base"), f"a b={tmp_path / 'xl'}"])
    with pytest.raises(ValueError, match="NAME must be"):
        serve.checkpoints([f"={tmp_path / 'xl'}"])


def test_serve_checks_its_sampler_against_every_model(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pipeline" / "1").mkdir(parents=True)
    table = {
        name: {
            "checkpoint": f"/ckpt/{name}",
            "family": "sd",
            "primary": "base",
            "variants": {"base": {"scheduler_config": config}},
        }
        for name, config in (("sd15", DDIM), ("flow", FLOW))
    }
    (repo / "pipeline" / "1" / "pipeline.json").write_text(
        json.dumps({"default_model": "sd15", "models": table, "checkpoint": "/ckpt/sd15"})
    )
    assert serve.recorded_models(repo) == {"sd15": serve.Path("/ckpt/sd15"), "flow": serve.Path("/ckpt/flow")}
    assert "sd15 (sd, default) = /ckpt/sd15, flow (sd) = /ckpt/flow" == serve.describe_models(repo)
    with pytest.raises(ValueError, match=r"does not fit .*\(model flow\)"):
        serve.set_default_sampler(repo, "Euler a")
