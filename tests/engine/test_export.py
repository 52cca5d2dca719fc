"""ONNX exports against torch, the export cache, and the generated Triton configs."""

import json
import os
import shutil

from google.protobuf import text_format
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from families.checkpoint import CheckpointInfo
from export.cli import pipeline_parameters
from families.contracts import component_contracts
from export.onnx_export import TOLERANCE, check_parity, export_component
from export.repository import MAX_BATCH
from families.sd_torch import load_module
from export.triton_config import BACKENDS, component_config, to_pbtxt

COMPONENTS = ["text_encoder", "unet", "unet_regional", "vae_decoder", "vae_encoder"]


@pytest.fixture(scope="module")
def info(tiny_checkpoint):
    return CheckpointInfo.read(tiny_checkpoint)


@pytest.mark.parametrize("name", COMPONENTS)
def test_onnx_component_matches_torch(name, info, tiny_repo):
    contract = component_contracts(info, 2 * info.native_size, MAX_BATCH)[name]
    errors = check_parity(contract, info, load_module(name, info), tiny_repo / name / "1" / "model.onnx")
    assert set(errors) == {"batch1", "batch3"}
    assert max(errors.values()) <= TOLERANCE, errors


def test_export_is_cached_until_an_input_changes(tiny_checkpoint, tmp_path):
    # a copy: touching the session's checkpoint would make every later export of it redo its work
    info = CheckpointInfo.read(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    contract = component_contracts(info, 2 * info.native_size, MAX_BATCH)["text_encoder"]
    target = tmp_path / "text_encoder" / "1" / "model.onnx"
    assert export_component(contract, info, target, log=lambda *a: None)["exported"] is True
    before = target.stat().st_mtime_ns
    assert export_component(contract, info, target, log=lambda *a: None)["exported"] is False
    assert target.stat().st_mtime_ns == before
    config = info.path / "text_encoder" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert export_component(contract, info, target, log=lambda *a: None)["exported"] is True


def parse(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_every_generated_config_parses(tiny_repo):
    configs = {p.parent.name: parse(p) for p in tiny_repo.glob("*/config.pbtxt")}
    assert set(configs) == set(COMPONENTS) | {"pipeline", "pipeline_unary"}
    for name, config in configs.items():
        assert config.name == name
        assert config.backend == "python"
    assert configs["pipeline"].model_transaction_policy.decoupled
    assert not configs["pipeline_unary"].model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in configs["pipeline"].parameters.items()}
    # the checkpoint's scheduler config, for the gateway's sampler list (GET /v1/samplers)
    scheduler = json.loads(params.pop("scheduler_config"))
    assert scheduler == json.loads((tiny_repo / "pipeline" / "1" / "scheduler_config.json").read_text())
    # the native size, for the gateway's work units (serving/gateway/costs.py)
    assert params.pop("native_size") == "32"
    models = json.loads(params.pop("models"))
    assert [(m["id"], m["family"], m["default"], m["tasks"]) for m in models] == [
        ("tiny", "sd", True, ["txt2img", "img2img", "inpaint"])
    ]
    assert params == {k: str(v) for k, v in pipeline_parameters().items()}
    unet_inputs = {i.name: i for i in configs["unet"].input}
    assert list(unet_inputs["timestep"].dims) == [1] and unet_inputs["timestep"].HasField("reshape")
    assert configs["unet"].max_batch_size == MAX_BATCH["unet"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_backend_configs_parse(backend, info):
    for contract in component_contracts(info, 2 * info.native_size, MAX_BATCH).values():
        config = text_format.Parse(to_pbtxt(component_config(contract, backend, gpu=True)), mc.ModelConfig())
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        expected = {
            "python": ("python", ""),
            "onnxruntime": ("", "onnxruntime_onnx"),
            "tensorrt": ("", "tensorrt_plan"),
        }
        assert (config.backend, config.platform) == expected[backend]
        assert [i.name for i in config.input] == [s.name for s in contract.inputs]


def test_pipeline_assets_describe_the_checkpoint(tiny_repo, info):
    assets = json.loads((tiny_repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert assets["size_multiple"] == 8 and assets["native_size"] == 32 and assets["text_length"] == 16
    assert len(assets["preview"]["weights"]) == info.latent_channels
    assert (tiny_repo / "pipeline" / "1" / "tokenizer" / "tokenizer.json").is_file()
