"""`ldm export --gpu` and `--backend tensorrt`: what can be checked without a GPU or TensorRT."""

import argparse
from dataclasses import replace
import json

from google.protobuf import text_format
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from families.checkpoint import CheckpointInfo
from export.cli import add_repository_options, parameters_from_args
from families.contracts import component_contracts
from export.placement import bls_pool_bytes, call_bytes, server_flags
from export.repository import MAX_BATCH, has_artifacts, write_repository
from export.tensorrt import TensorRTUnavailable, build_plan

GPU = mc.ModelInstanceGroup.KIND_GPU


def options(*argv):
    parser = argparse.ArgumentParser()
    add_repository_options(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, runners",
    [
        ((), ("inprocess", "bls")),
        (("--gpu",), ("torch", "torch")),
        (("--gpu", "--backend", "tensorrt"), ("bls", "bls")),
        (("--gpu", "--backend", "onnxruntime", "--unet", "torch"), ("torch", "bls")),
        (("--unet", "torch", "--text-vae", "torch", "--torch-buckets", "4,8", "--torch-compile"), ("torch", "torch")),
    ],
)
def test_runner_defaults_follow_placement_and_backend(argv, runners):
    params = parameters_from_args(options(*argv))
    assert (params["unet"], params["text_vae"]) == runners
    if "--torch-compile" in argv:
        assert params["torch_buckets"] == "4,8" and params["torch_compile"] == "true"


def parse(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_gpu_export_places_the_pipeline_on_the_gpu_with_the_torch_runner(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    write_repository(
        tiny_checkpoint, repo, gpu=True, pipeline_parameters=parameters_from_args(options("--gpu")), log=lambda *a: None
    )
    pipeline = parse(repo / "pipeline" / "config.pbtxt")
    assert pipeline.instance_group[0].kind == GPU and pipeline.instance_group[0].count == 1
    assert {k: v.string_value for k, v in pipeline.parameters.items()}["unet"] == "torch"
    assert parse(repo / "pipeline_unary" / "config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline", "pipeline_unary"]
    placement = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())["placement"]
    assert placement == {"gpu": True, "cuda_memory_pool_bytes": 64 * 2**20, "pinned_memory_pool_bytes": 256 * 2**20}
    assert has_artifacts(repo)
    from serving.triton.server import repository_flags

    assert repository_flags(repo) == [
        f"--cuda-memory-pool-byte-size=0:{64 * 2**20}",
        f"--pinned-memory-pool-byte-size={256 * 2**20}",
    ]


def test_native_backend_gpu_export_serves_components_as_gpu_models(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    params = parameters_from_args(options("--gpu", "--backend", "onnxruntime"))
    write_repository(
        tiny_checkpoint, repo, backend="onnxruntime", gpu=True, pipeline_parameters=params, log=lambda *a: None
    )
    for name in MAX_BATCH:
        config = parse(repo / name / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == GPU
    (repo / "vae_encoder" / "1" / "model.onnx").unlink()
    assert not has_artifacts(repo)


def test_memory_pools_hold_the_largest_bls_call_twice(tiny_checkpoint):
    # SD-1.5 sizes on the tiny checkpoint's layout: 512 px native, 1024 px max, 77 x 768 text
    info = replace(CheckpointInfo.read(tiny_checkpoint), native_size=512, vae_factor=8, text_length=77, text_hidden=768)
    contracts = component_contracts(info, 1024, MAX_BATCH)
    images = 16 * 1024 * 1024 * 3 * 4
    latents = 16 * 4 * 128 * 128 * 4
    assert call_bytes(contracts["vae_decoder"], 8) == images + latents
    assert call_bytes(contracts["unet"], 8) == 2 * 64 * 4 * 128 * 128 * 4 + 64 * 4 + 64 * 77 * 768 * 4
    largest = call_bytes(contracts["vae_encoder"], 8)
    assert largest == images + 2 * latents  # images in, posterior mean and std out
    pools = bls_pool_bytes(contracts, ("text_encoder", "unet", "vae_decoder", "vae_encoder"), 8)
    assert pools["cuda_memory_pool_bytes"] == 2 * largest == pools["pinned_memory_pool_bytes"]
    assert bls_pool_bytes(contracts, (), 8)["cuda_memory_pool_bytes"] == 64 * 2**20
    assert server_flags({"gpu": True, **pools}, 2)[:2] == [
        f"--cuda-memory-pool-byte-size=0:{2 * largest}",
        f"--cuda-memory-pool-byte-size=1:{2 * largest}",
    ]
    assert server_flags({"gpu": False}, 2) == []


def test_tensorrt_build_says_plainly_where_tensorrt_is_missing(tiny_checkpoint, tmp_path):
    import importlib.util
    import shutil

    if shutil.which("trtexec") or importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")
    contract = component_contracts(CheckpointInfo.read(tiny_checkpoint), 64, MAX_BATCH)["unet"]
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed here"):
        build_plan(contract, tmp_path / "unet.onnx", tmp_path / "unet.plan")


def test_ldm_export_with_tensorrt_stops_with_the_reason(tiny_checkpoint, tmp_path, capsys):
    import importlib.util
    import shutil

    from serving.cli import main

    if shutil.which("trtexec") or importlib.util.find_spec("tensorrt"):
        pytest.skip("TensorRT is installed here")
    assert (
        main(
            [
                "export",
                str(tiny_checkpoint),
                "--repo",
                str(tmp_path / "repo"),
                "--backend",
                "tensorrt",
                "--gpu",
                "--text-vae",
                "torch",
            ]
        )
        == 2
    )  # one ONNX export (the unet) before the plan
    assert "ldm export: TensorRT is not installed here" in capsys.readouterr().out
