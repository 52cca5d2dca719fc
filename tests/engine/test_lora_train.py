"""`ldm train-lora` (training/lora_train.py), the kohya-ss writer (training/lora_formats.py), the
adapters' worlds in training/data.py and the shipped adapters under checkpoints/loras/.

Fast: a few optimizer steps on a handful of scenes of the shipped checkpoint."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    CONCEPT_HELD_OUT,
    CONCEPT_SHAPES,
    concept_eval_scenes,
    eval_scenes,
    render,
    sample_concept_scene,
    training_batch,
    vocabulary,
)

CHECKPOINT = Path("checkpoints/ldm-shapes")
LORAS = Path("checkpoints/loras")
# sha256 of the base model's data (below) computed with training/data.py before the adapters'
# additions (commit 1f295f4): the base model's scenes, captions and seeds must not move.
BASE_DATA_SHA256 = "f317d3849cc20e4d05fcad209419a25590a41bb9f5b504309da8bad1dfbff418"
TINY = dict(rank=2, alpha=1.0, steps=3, batch_size=4, pool_size=8, lr=1e-2)


def test_base_model_data_is_byte_identical():
    h = hashlib.sha256()
    images, captions = training_batch(np.random.default_rng(0), 64)
    h.update(images.tobytes())
    h.update("\n".join(captions).encode())
    for held in (False, True):
        for scene in eval_scenes(20, held_out=held):
            h.update(render(scene).tobytes())
            h.update(repr(scene).encode())
    h.update(" ".join(vocabulary()).encode())
    assert h.hexdigest() == BASE_DATA_SHA256
    assert "ring" not in vocabulary()


def test_concept_scenes_and_reader():
    from training.evaluate import read_image
    from training.lora_eval import check, read_objects

    for concept in CONCEPT_SHAPES:
        rng = np.random.default_rng(0)
        train = [sample_concept_scene(rng, concept) for _ in range(200)]
        assert not any((o.colour, o.shape) in CONCEPT_HELD_OUT for s in train for o in s.objects)
        held = concept_eval_scenes(40, held_out=True, concept=concept)
        assert all(any((o.colour, o.shape) in CONCEPT_HELD_OUT for o in s.objects) for s in held)
        for scene in train[:40] + held:
            assert concept in scene.caption
            assert all(check(scene, render(scene)).values()), scene
    # On the base model's scenes the reader reads what training/evaluate.py reads.
    for scene in eval_scenes(40, held_out=True):
        image = render(scene)
        bg, found = read_objects(image)
        ref_bg, ref = read_image(image)
        assert (bg, [(o.colour, o.shape, o.size, o.cx, o.cy) for o in found]) == (
            ref_bg,
            [(o.colour, o.shape, o.size, o.cx, o.cy) for o in ref],
        )
        styled = read_objects(render(scene, "tall"))[1]
        assert all(o.width < o.height for o in styled)  # the tall style


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same tiny concept run twice (UNet and text-encoder parts), saved by save_lora."""
    from training.lora_train import save_lora, train_lora

    folder = tmp_path_factory.mktemp("lora")
    states = []
    for run in range(2):
        pipe = train_lora(CHECKPOINT, concept="ring", text_encoder=True, seed=3, log=lambda *a: None, **TINY)
        save_lora(pipe, folder / f"run{run}.safetensors")
        states.append({k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora" in k})
    return folder, states


def test_training_is_deterministic(trained):
    from safetensors.torch import load_file

    folder, (a, b) = trained
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, second = load_file(folder / "run0.safetensors"), load_file(folder / "run1.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(k.startswith("unet.") for k in first) and any(k.startswith("text_encoder.") for k in first)
    assert (folder / "run0.safetensors").read_bytes() == (folder / "run1.safetensors").read_bytes()


def _unet_out(pipe, prompt="a large red ring on the left of a black background"):
    """The UNet's output for fixed latents, timestep and this prompt's (adapted) text encoding."""
    with torch.no_grad():
        ids = pipe.tokenizer(
            [prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        context = pipe.text_encoder(ids)[0]
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        return pipe.unet(latents, torch.tensor([500]), context).sample


def test_saved_file_loads_with_diffusers_and_changes_the_output(trained):
    from training.generate import load_pipeline

    folder, _ = trained
    pipe = load_pipeline(CHECKPOINT)
    base = _unet_out(pipe)
    pipe.load_lora_weights(str(folder / "run0.safetensors"), adapter_name="tiny")
    pipe.set_adapters(["tiny"], [1.0])
    assert (_unet_out(pipe) - base).abs().max() > 1e-4
    pipe.set_adapters(["tiny"], [0.0])
    assert torch.equal(_unet_out(pipe), base)


def test_kohya_writer_against_diffusers_converter(tmp_path):
    """diffusers' load_lora_weights on what to_kohya writes gives the UNet (and text encoder)
    outputs that it gives on the diffusers file; with alpha != rank."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from training.generate import load_pipeline
    from training.lora_formats import save_kohya, to_kohya
    from training.lora_train import save_lora, train_lora

    pipe = train_lora(
        CHECKPOINT, concept="ring", text_encoder=True, seed=4, log=lambda *a: None, **{**TINY, "alpha": 5.0, "steps": 1}
    )
    diffusers_file, kohya_file = tmp_path / "a.safetensors", tmp_path / "a-kohya.safetensors"
    save_lora(pipe, diffusers_file)
    save_kohya(diffusers_file, kohya_file)
    kohya = load_file(kohya_file)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert kohya[f"{name}.lora_down.weight"].shape == (2, 96) and kohya[f"{name}.alpha"].item() == 5.0
    assert kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].shape == (128, 2)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)
    # PEFT's own keys (get_peft_model_state_dict) give the same kohya dict as diffusers' keys.
    peft_keys = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    peft_keys.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()})
    from_peft = to_kohya(peft_keys, 5.0)
    assert from_peft.keys() == kohya.keys() and all(torch.equal(from_peft[k], kohya[k]) for k in kohya)

    # alpha is honoured: kohya alpha 2.5 = the diffusers file (alpha 5) at weight 0.5
    half = tmp_path / "half.safetensors"
    save_file(to_kohya(load_file(diffusers_file), 2.5), str(half))
    fresh = load_pipeline(CHECKPOINT)
    for label, path in (("d", diffusers_file), ("k", kohya_file), ("h", half)):
        fresh.load_lora_weights(str(path), adapter_name=label)
    out = {}
    for label, weight in (("d", 0.0), ("d", 1.0), ("k", 1.0), ("d", 0.5), ("h", 1.0)):
        fresh.set_adapters([label], [weight])
        out[label, weight] = _unet_out(fresh)
    assert (out["d", 1.0] - out["d", 0.0]).abs().max() > 1e-5  # the adapter acts at all
    torch.testing.assert_close(out["k", 1.0], out["d", 1.0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["h", 1.0], out["d", 0.5], rtol=0, atol=1e-6)


@pytest.mark.skipif(not LORAS.is_dir(), reason="no shipped adapters")
def test_shipped_adapters():
    """Each shipped file is below 1 MB and loads with diffusers; the kohya copy of the style
    equals the diffusers one."""
    from training.generate import load_pipeline

    files = sorted(LORAS.glob("*.safetensors"))
    assert files
    assert all(f.stat().st_size < 1_000_000 for f in files), [(f.name, f.stat().st_size) for f in files]
    pipe = load_pipeline(CHECKPOINT)
    base = _unet_out(pipe)
    outputs = {}
    for f in files:
        pipe.load_lora_weights(str(f), adapter_name=f.stem.replace("-", "_"))
        pipe.set_adapters([f.stem.replace("-", "_")], [1.0])
        outputs[f.stem] = _unet_out(pipe)
        assert (outputs[f.stem] - base).abs().max() > 1e-3, f.name
    if "tall" in outputs and "tall-kohya" in outputs:
        torch.testing.assert_close(outputs["tall-kohya"], outputs["tall"], rtol=0, atol=1e-6)
