"""The tiny random SDXL checkpoints (training/tiny_checkpoint.py kinds "sdxl" and "sdxl-inpaint"):
diffusers' SDXL pipelines load and run them, the per-row inputs their UNet gets, determinism, and
ONNX export probes (TorchScript exporter, opset 17) of the wrappers in families/sdxl_torch.py
checked in ONNX Runtime against torch at two batch sizes. Notes: docs/families-sdxl-notes.md."""

import time
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from families.sdxl_torch import SdxlTextEncoder, SdxlTextEncoders, SdxlTextEncoderWithProjection, SdxlUNet
from training.tiny_checkpoint import (
    IMAGE_SIZE,
    SDXL_PROJECTION_DIM,
    SDXL_TEXT_HIDDEN,
    TEXT_MAX_LENGTH,
    write_tiny_checkpoint,
)

PROMPT = "a red circle above a blue square"
STEPS = 4
HIDDEN = sum(SDXL_TEXT_HIDDEN)


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", kind="sdxl")


@pytest.fixture(scope="module")
def sdxl_inpaint_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-inpaint", kind="sdxl-inpaint")


def _load(cls, path):
    pipe = cls.from_pretrained(path, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _capture_unet_calls(pipe) -> list:
    """Record the inputs of every UNet call the pipeline makes (one per step)."""
    calls = []

    def hook(module, args, kwargs):
        sample, timestep = args[:2]
        calls.append(
            {
                "sample": sample.clone(),
                "timestep": torch.as_tensor(timestep).clone(),
                "encoder_hidden_states": kwargs["encoder_hidden_states"].clone(),
                **{k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()},
            }
        )

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _assert_image(images):
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.02  # not blank
    assert ((images == 0) | (images == 1)).mean() < 0.5  # not saturated


def _init_image():
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    return Image.fromarray((np.stack([x, y, 1 - x], -1) * 255).round().astype(np.uint8))


def _mask():
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[8:24, 8:24] = 255
    return Image.fromarray(mask)


def test_txt2img_rows_text_encoding_and_time_ids(sdxl_checkpoint):
    pipe = _load(StableDiffusionXLPipeline, sdxl_checkpoint)
    assert pipe.config.force_zeros_for_empty_prompt
    assert pipe.unet.config.addition_embed_type == "text_time"
    calls = _capture_unet_calls(pipe)
    images = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    _assert_image(images)
    assert len(calls) == STEPS
    first = calls[0]
    # diffusers passes one scalar timestep for the whole batch; the served contract is one FP32 per row
    assert first["timestep"].ndim == 0
    assert first["sample"].shape == (2, 4, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert first["encoder_hidden_states"].shape == (2, TEXT_MAX_LENGTH, HIDDEN)
    assert first["text_embeds"].shape == (2, SDXL_PROJECTION_DIM)
    # rows [uncond, cond]; time ids = original_size + crops_coords_top_left + target_size per row
    assert first["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    # force_zeros_for_empty_prompt and no negative prompt: the uncond row's embeds AND pooled are zeros
    assert not first["encoder_hidden_states"][0].any() and not first["text_embeds"][0].any()
    # the cond row: penultimate hidden states of both encoders concatenated, pooled of the second
    ids = [
        tok(
            PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tok in (pipe.tokenizer, pipe.tokenizer_2)
    ]
    assert not torch.equal(ids[0], ids[1])  # each encoder reads its own tokenizer's ids
    with torch.no_grad():
        hidden, pooled = SdxlTextEncoders(pipe.text_encoder, pipe.text_encoder_2).eval()(*ids)
    torch.testing.assert_close(first["encoder_hidden_states"][1:], hidden, rtol=0, atol=0)
    torch.testing.assert_close(first["text_embeds"][1:], pooled, rtol=0, atol=0)
    # the same inputs at every step; the per-request size fields land in the time ids in that order
    for call in calls[1:]:
        for name in ("encoder_hidden_states", "text_embeds", "time_ids"):
            assert torch.equal(call[name], first[name])
    calls.clear()
    pipe(
        PROMPT,
        negative_prompt="a green star",
        num_inference_steps=1,
        guidance_scale=5.0,
        original_size=(64, 48),
        crops_coords_top_left=(4, 2),
        target_size=(32, 24),
        output_type="latent",
    )
    assert calls[0]["time_ids"].tolist() == [[64.0, 48.0, 4.0, 2.0, 32.0, 24.0]] * 2
    # with a negative prompt the uncond row is encoded, not zeros
    assert calls[0]["encoder_hidden_states"][0].abs().sum() > 0 and calls[0]["text_embeds"][0].abs().sum() > 0
    # an empty negative prompt is a prompt, not "no negative prompt": encoded, not zeros
    calls.clear()
    pipe(PROMPT, negative_prompt="", num_inference_steps=1, guidance_scale=5.0, output_type="latent")
    assert calls[0]["text_embeds"][0].abs().sum() > 0


@torch.no_grad()
def test_a_bare_loop_over_the_wrappers_gives_the_pipelines_image(sdxl_checkpoint):
    """The serving recipe in torch: the wrappers, zeros for the uncond row, time ids per row, one FP32
    timestep per row, CFG, DDIM from the folder, decode latents / scaling_factor — the pipeline's
    image given the same initial latents."""
    pipe = _load(StableDiffusionXLPipeline, sdxl_checkpoint)
    latents = torch.randn(1, 4, IMAGE_SIZE // 4, IMAGE_SIZE // 4, generator=torch.Generator().manual_seed(3))
    want = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, latents=latents.clone(), output_type="np").images

    ids = [
        tok(
            PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tok in (pipe.tokenizer, pipe.tokenizer_2)
    ]
    hidden, pooled = SdxlTextEncoders(pipe.text_encoder, pipe.text_encoder_2).eval()(*ids)
    hidden = torch.cat([torch.zeros_like(hidden), hidden])  # rows [uncond, cond]
    pooled = torch.cat([torch.zeros_like(pooled), pooled])
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]] * 2, dtype=torch.float32)
    unet = SdxlUNet(pipe.unet).eval()
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        rows = scheduler.scale_model_input(torch.cat([x, x]), t)
        uncond, cond = unet(rows, t.float().expand(2), hidden, pooled, time_ids).chunk(2)
        x = scheduler.step(uncond + 5.0 * (cond - uncond), t, x, return_dict=False)[0]
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
    got = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - want).max() < 1e-5


def test_img2img_and_inpainting_pipelines_draw(sdxl_checkpoint, sdxl_inpaint_checkpoint):
    img2img = _load(StableDiffusionXLImg2ImgPipeline, sdxl_checkpoint)
    assert not img2img.config.requires_aesthetics_score
    calls = _capture_unet_calls(img2img)
    images = img2img(
        PROMPT,
        image=_init_image(),
        strength=0.75,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    _assert_image(images)
    assert len(calls) == 3  # strength 0.75 of 4 steps
    assert calls[0]["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2

    for path, channels in ((sdxl_checkpoint, 4), (sdxl_inpaint_checkpoint, 9)):
        inpaint = _load(StableDiffusionXLInpaintPipeline, path)
        assert inpaint.unet.config.in_channels == channels
        calls = _capture_unet_calls(inpaint)
        images = inpaint(
            PROMPT,
            image=_init_image(),
            mask_image=_mask(),
            strength=1.0,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        _assert_image(images)
        assert calls[0]["sample"].shape == (2, channels, IMAGE_SIZE // 4, IMAGE_SIZE // 4)


def test_the_inpainting_kind_shares_the_encoders_and_vae(sdxl_checkpoint, sdxl_inpaint_checkpoint):
    for component in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler"):
        for a in sorted((sdxl_checkpoint / component).iterdir()):
            assert a.read_bytes() == (sdxl_inpaint_checkpoint / component / a.name).read_bytes(), a
    assert (sdxl_checkpoint / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != (
        sdxl_inpaint_checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-inpaint"])
def test_writing_twice_gives_identical_files(kind, tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", kind=kind)
    b = write_tiny_checkpoint(tmp_path / "b", kind=kind)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


# --- export probes ------------------------------------------------------------------------------


def _export(module, inputs: dict, outputs: list, dynamic: dict, path) -> float:
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    return time.perf_counter() - start


def _max_abs_vs_torch(module, path, inputs: dict) -> list:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = module(*inputs.values())
    want = want if isinstance(want, tuple) else (want,)
    assert [g.shape for g in got] == [tuple(w.shape) for w in want]
    return [float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)]


def _unet_inputs(batch, h, w, channels, generator):
    return {
        "sample": torch.randn(batch, channels, h, w, generator=generator),
        "timestep": (torch.rand(batch, generator=generator) * 999).float(),  # one per row, fractional
        "encoder_hidden_states": torch.randn(batch, TEXT_MAX_LENGTH, HIDDEN, generator=generator),
        "text_embeds": torch.randn(batch, SDXL_PROJECTION_DIM, generator=generator),
        "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch)
        + torch.randint(0, 3, (batch, 6), generator=generator).float() * 8,
    }


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-inpaint"])
def test_unet_exports_with_per_row_timestep_and_named_inputs(kind, sdxl_checkpoint, sdxl_inpaint_checkpoint, tmp_path):
    path = sdxl_checkpoint if kind == "sdxl" else sdxl_inpaint_checkpoint
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
    module = SdxlUNet(unet).float().eval()
    channels = unet.config.in_channels
    generator = torch.Generator().manual_seed(0)
    batch, h, w = ("batch", "height", "width")
    dynamic = {
        "sample": {0: batch, 2: h, 3: w},
        "timestep": {0: batch},
        "encoder_hidden_states": {0: batch},
        "text_embeds": {0: batch},
        "time_ids": {0: batch},
        "noise_pred": {0: batch, 2: h, 3: w},
    }
    onnx_path = tmp_path / "unet.onnx"
    seconds = _export(module, _unet_inputs(2, 8, 8, channels, generator), ["noise_pred"], dynamic, onnx_path)
    errors = {}
    for size in ((2, 8, 8), (5, 6, 10)):  # batch 2 at the native 8x8 latent; batch 5 at another size
        inputs = _unet_inputs(*size, channels, generator)
        errors[size] = _max_abs_vs_torch(module, onnx_path, inputs)[0]
        assert errors[size] < 1e-4, (size, errors)
        if size[0] == 5:  # rows are independent: each row of the batch equals that row alone
            import onnxruntime

            session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            batched = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            for i in range(5):
                alone = session.run(None, {k: v[i : i + 1].numpy() for k, v in inputs.items()})[0]
                assert np.abs(alone[0] - batched[i]).max() < 1e-4
    print(f"\nSDXL {kind} UNet ({channels} ch): export {seconds:.2f} s, ORT vs torch max abs {errors}")


def test_text_encoders_export(sdxl_checkpoint, tmp_path):
    generator = torch.Generator().manual_seed(0)
    first = SdxlTextEncoder(CLIPTextModel.from_pretrained(sdxl_checkpoint / "text_encoder", local_files_only=True))
    second = SdxlTextEncoderWithProjection(
        CLIPTextModelWithProjection.from_pretrained(sdxl_checkpoint / "text_encoder_2", local_files_only=True)
    )
    vocab = first.model.config.vocab_size
    eos = first.model.config.eos_token_id

    def ids(batch):
        # <bos> words <eos> <pad>...: a different prompt length per row (the pooled output reads the <eos>)
        rows = torch.zeros(batch, TEXT_MAX_LENGTH, dtype=torch.int64)
        for i in range(batch):
            n = 2 + i
            rows[i, 0] = first.model.config.bos_token_id
            rows[i, 1 : 1 + n] = torch.randint(4, vocab, (n,), generator=generator)
            rows[i, 1 + n] = eos
        return {"input_ids": rows}

    results = {}
    for name, module, outputs in (
        ("text_encoder", first, ["hidden_states"]),
        ("text_encoder_2", second, ["hidden_states", "text_embeds"]),
    ):
        module = module.float().eval()
        onnx_path = tmp_path / f"{name}.onnx"
        dynamic = {"input_ids": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
        seconds = _export(module, ids(2), outputs, dynamic, onnx_path)
        errors = {}
        for batch in (2, 5):
            errors[batch] = _max_abs_vs_torch(module, onnx_path, ids(batch))
            assert max(errors[batch]) < 1e-4, (name, errors)
        results[name] = (round(seconds, 2), errors)
    print(f"\nSDXL text encoders: (export s, ORT vs torch max abs per output) {results}")
