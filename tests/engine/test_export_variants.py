"""Export of a repository holding several UNet variants: layouts detected from the UNet config,
each variant's UNet with its own contract (checked against torch), identical components shared,
the variants table the pipeline reads."""

from dataclasses import replace
import json
import shutil

from google.protobuf import text_format
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from families.checkpoint import CheckpointInfo
from families.contracts import component_contracts
from export.onnx_export import TOLERANCE, check_parity
from export.repository import MAX_BATCH, has_artifacts, write_repository
from families.sd_torch import load_module


def test_layouts_are_read_from_the_unet_config(tiny_checkpoint, tiny_inpaint_checkpoint, tiny_upscale_checkpoint):
    base, inpaint, upscale = (
        CheckpointInfo.read(p) for p in (tiny_checkpoint, tiny_inpaint_checkpoint, tiny_upscale_checkpoint)
    )
    assert (base.layout, base.unet_in_channels, base.latent_channels) == ("base", 4, 4)
    assert (inpaint.layout, inpaint.unet_in_channels, inpaint.latent_channels) == ("inpaint", 9, 4)
    assert (upscale.layout, upscale.unet_in_channels, upscale.max_noise_level) == ("upscale", 7, 350)
    assert upscale.low_res_scheduler_config["_class_name"] == "DDPMScheduler"


def test_variants_share_identical_components_and_list_their_models(variant_repo):
    info = json.loads((variant_repo / "pipeline" / "1" / "pipeline.json").read_text())
    table = {name: facts["components"] for name, facts in info["variants"].items()}
    assert info["primary"] == "base"
    assert table == {
        # the base also gets the regional UNet (regions' attention mode) from its UNet's weights
        "base": {
            "text_encoder": "text_encoder",
            "unet": "unet",
            "unet_regional": "unet_regional",
            "vae_decoder": "vae_decoder",
            "vae_encoder": "vae_encoder",
        },
        # the tiny inpainting checkpoint has the base's text encoder and VAE; the upscaler its own VAE
        "inpaint": {
            "text_encoder": "text_encoder",
            "unet": "unet_inpaint",
            "vae_decoder": "vae_decoder",
            "vae_encoder": "vae_encoder",
        },
        "upscale": {"text_encoder": "text_encoder", "unet": "unet_upscale", "vae_decoder": "vae_decoder_upscale"},
    }
    assert {facts["tokenizers"]["input_ids"] for facts in info["variants"].values()} == {"tokenizer"}
    assert info["variants"]["upscale"]["max_noise_level"] == 350
    exported = {p.parent.name for p in variant_repo.glob("*/config.pbtxt")}
    assert exported == {m for c in table.values() for m in c.values()} | {"pipeline", "pipeline_unary"}
    assert has_artifacts(variant_repo)


def test_variant_unet_configs_declare_their_channels(variant_repo):
    def config(name):
        return text_format.Parse((variant_repo / name / "config.pbtxt").read_text(), mc.ModelConfig())

    inputs = {name: {i.name: i for i in config(name).input} for name in ("unet", "unet_inpaint", "unet_upscale")}
    assert [list(inputs[n]["sample"].dims) for n in inputs] == [[4, -1, -1], [9, -1, -1], [7, -1, -1]]
    assert "class_labels" not in inputs["unet"] and "class_labels" not in inputs["unet_inpaint"]
    labels = inputs["unet_upscale"]["class_labels"]
    assert labels.data_type == mc.TYPE_INT64 and list(labels.dims) == [1] and labels.HasField("reshape")
    assert [o.dims for o in config("unet_upscale").output][0] == [4, -1, -1]


@pytest.mark.parametrize(
    "fixture, model", [("tiny_inpaint_checkpoint", "unet_inpaint"), ("tiny_upscale_checkpoint", "unet_upscale")]
)
def test_variant_unets_match_torch(request, variant_repo, fixture, model):
    info = CheckpointInfo.read(request.getfixturevalue(fixture))
    contract = replace(component_contracts(info, 64, MAX_BATCH)["unet"], name=model)
    errors = check_parity(contract, info, load_module("unet", info), variant_repo / model / "1" / "model.onnx")
    assert max(errors.values()) <= TOLERANCE, errors


def test_a_checkpoint_of_another_layout_is_refused(tiny_checkpoint, tiny_upscale_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="inpaint checkpoint .*: its UNet has the upscale layout"):
        write_repository(
            tiny_checkpoint, tmp_path / "repo", variants={"inpaint": tiny_upscale_checkpoint}, log=lambda *a: None
        )


def test_a_variant_checkpoint_alone_is_a_repository(tiny_inpaint_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    write_repository(tiny_inpaint_checkpoint, repo, log=lambda *a: None)
    info = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert info["primary"] == "inpaint" and list(info["variants"]) == ["inpaint"]
    assert info["variants"]["inpaint"]["components"]["unet"] == "unet"
    assert has_artifacts(repo)


def test_a_re_export_without_variants_removes_their_models(variant_repo, tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(variant_repo, repo)
    stamps = write_repository(tiny_checkpoint, repo, log=lambda *a: None)
    assert not any(s["exported"] for s in stamps.values())  # the base's exports are reused
    assert sorted(p.name for p in repo.iterdir()) == [
        "pipeline",
        "pipeline_unary",
        "text_encoder",
        "unet",
        "unet_regional",
        "vae_decoder",
        "vae_encoder",
    ]
