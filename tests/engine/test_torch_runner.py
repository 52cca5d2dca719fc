"""The torch runner on CPU: the code path the GPU runs, less the CUDA graphs and fp16.

Parity with the ONNX runner and with diffusers, bucket padding, batch invariance, the row cap,
and a CUDA out-of-memory error injected into a step."""

import numpy as np
import pytest
import torch

from serving.core.config import PipelineConfig
from serving.core.service import PipelineAssets, PipelineService
from serving.models.assemble import RunnerChoice
from serving.models.onnx import LocalModels
from serving.models.torch_options import TorchOptions, default_buckets, parse_buckets
from serving.models.torch_runner import BucketedCall, TorchModels, _key
from tests.support.fakes import RecordingSink, alone_and_in_a_crowd, drain, request

DEFAULT_MODEL_PROMPTS = [
    ("a large red circle on the left of a black background", 5.0),
    ("a yellow triangle on the right of a grey background", 1.0),
]


@pytest.fixture(scope="module")
def torch_models(tiny_checkpoint):
    return TorchModels(tiny_checkpoint, log=lambda *a: None)


@pytest.fixture(scope="module")
def onnx_models(tiny_repo):
    return LocalModels(tiny_repo)


def service(repo, models, **params):
    return PipelineService(
        PipelineAssets.read(repo / "pipeline" / "1"),
        PipelineConfig.parse({k: str(v) for k, v in params.items()}),
        models,
    )


def generate(repo, models, jobs, **params) -> list:
    """Images of (prompt, seed, fields) jobs, all submitted at once and served together."""
    svc = service(repo, models, **params)
    sinks = [RecordingSink() for _ in jobs]
    for (prompt, seed, fields), sink in zip(jobs, sinks):
        svc.submit(request(prompt, seed, **fields), sink)
    drain(svc)
    assert all(s.image is not None for s in sinks), [s.error for s in sinks]
    return [s.image for s in sinks]


def test_buckets():
    assert default_buckets("cuda", 32) == (1, 2, 4, 8, 16, 32)
    assert default_buckets("cpu", 32) == (4, 8, 16, 32)
    assert default_buckets("cuda", 48) == (1, 2, 4, 8, 16, 32, 64)
    assert parse_buckets("1,2,8") == (1, 2, 8)
    for bad in ("", "0,2", "4,2", "a"):
        with pytest.raises(ValueError, match="torch_buckets"):
            parse_buckets(bad)


def test_runner_choice_names_bad_parameters():
    choice = RunnerChoice.from_config(
        PipelineConfig.parse({"unet": "torch", "text_vae": "bls", "torch_buckets": "2,4"}), "cpu"
    )
    assert choice.torch_components == ("unet",) and choice.torch.unet_buckets() == (2, 4)
    assert RunnerChoice.from_config(PipelineConfig.parse({"text_vae": "torch"}), "cuda:1").torch_components == (
        "text_encoder",
        "vae",
    )
    for params, name in (
        ({"unet": "trt"}, "unet"),
        ({"text_vae": "onnx"}, "text_vae"),
        ({"cuda_graphs": "yes"}, "cuda_graphs"),
        ({"max_rows": "many"}, "max_rows"),
    ):
        with pytest.raises(ValueError, match=f"parameter {name}="):
            RunnerChoice.from_config(PipelineConfig.parse(params), "cpu")


def unet_inputs(rows, seed=0, size=8):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((rows, 4, size, size), dtype=np.float32),
        rng.uniform(0, 1000, rows).astype(np.float32),
        rng.standard_normal((rows, 16, 32), dtype=np.float32),
    )


def test_padded_rows_never_change_real_rows(torch_models):
    call = torch_models.calls["unet"]
    sample, timestep, context = unet_inputs(3)
    served = call(sample, timestep, context)[0]  # padded with a zero row to bucket 4
    garbage = unet_inputs(1, seed=9)
    with torch.inference_mode():
        direct = call.fn(
            *(torch.from_numpy(np.concatenate([a, g])) for a, g in zip((sample, timestep, context), garbage))
        )
    assert served.shape == (3, 4, 8, 8)
    np.testing.assert_array_equal(served, direct[:3].numpy())


def test_rows_do_not_depend_on_the_bucket_or_chunking(torch_models):
    """On CPU every bucket is a multiple of 4 rows, where the kernels' results no longer depend on
    the batch size (torch_options.CPU_MIN_BUCKET): the same row comes out bit-identical from a
    call of 2, 7, 16 or 40 rows (40 > the largest bucket: chunks of 32)."""
    sample, timestep, context = unet_inputs(40)
    alone = torch_models.unet(sample[:2], timestep[:2], context[:2])
    for rows in (7, 16, 40):
        crowd = torch_models.unet(sample[:rows], timestep[:rows], context[:rows])
        assert crowd.shape[0] == rows
        np.testing.assert_array_equal(crowd[:2], alone)
    small = BucketedCall("unet", torch_models.calls["unet"].fn, (4,), torch.device("cpu"), torch.float32)
    np.testing.assert_array_equal(
        small(sample[:9], timestep[:9], context[:9])[0], torch_models.unet(sample[:9], timestep[:9], context[:9])
    )


def test_components_match_the_onnx_runner(torch_models, onnx_models):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 40, (3, 16))
    sample, timestep, context = unet_inputs(5, seed=4)
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    images = rng.random((2, 32, 32, 3), dtype=np.float32)
    pairs = {
        "encode_text": (
            torch_models.encode_text(ids)["last_hidden_state"],
            onnx_models.encode_text(ids)["last_hidden_state"],
        ),
        "unet": (torch_models.unet(sample, timestep, context), onnx_models.unet(sample, timestep, context)),
        "decode": (torch_models.decode(latents), onnx_models.decode(latents)),
    }
    for i, (a, b) in enumerate(zip(torch_models.encode_image(images), onnx_models.encode_image(images))):
        pairs[f"encode_image[{i}]"] = (a, b)
    for name, (got, expected) in pairs.items():
        assert got.shape == expected.shape and got.dtype == np.float32, name
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max()), name


def test_image_is_bit_identical_alone_and_in_a_crowd(tiny_repo, torch_models):
    alone, together = alone_and_in_a_crowd(tiny_repo, torch_models)
    assert together.image.tobytes() == alone.image.tobytes()


@pytest.fixture(scope="module")
def default_model_repo(tmp_path_factory):
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.defaults import TRAINED_CHECKPOINT

    repo = tmp_path_factory.mktemp("default") / "repo"
    write_repository(TRAINED_CHECKPOINT, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
    return repo


def test_default_model_matches_the_onnx_runner_and_diffusers(default_model_repo):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from serving.core.sampler import noise_generator
    from serving.defaults import TRAINED_CHECKPOINT

    jobs = [
        (prompt, 40 + i, dict(steps=25, guidance_scale=guidance))
        for i, (prompt, guidance) in enumerate(DEFAULT_MODEL_PROMPTS)
    ]
    served = generate(default_model_repo, TorchModels(TRAINED_CHECKPOINT, log=lambda *a: None), jobs)
    onnx = generate(default_model_repo, LocalModels(default_model_repo), jobs)
    pipe = StableDiffusionPipeline.from_pretrained(TRAINED_CHECKPOINT)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for (prompt, seed, fields), image, onnx_image in zip(jobs, served, onnx):
        latents = noise_generator(seed).standard_normal((4, 16, 16), dtype=np.float32)[None]
        reference = pipe(
            prompt,
            num_inference_steps=25,
            guidance_scale=fields["guidance_scale"],
            height=64,
            width=64,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images[0]
        reference = (reference * 255).round().astype(np.uint8)
        for other, name in ((onnx_image, "ONNX runner"), (reference, "diffusers")):
            diff = np.abs(image.astype(int) - other.astype(int)).mean()
            print(f"{prompt!r}: torch runner vs {name}: mean abs {diff:.4f}/255")
            assert diff <= 1.0, (prompt, name, diff)


def test_cuda_out_of_memory_fails_the_step_with_unavailable_and_serving_goes_on(tiny_repo, tiny_checkpoint):
    models = TorchModels(tiny_checkpoint, log=lambda *a: None)
    failures = iter([True])

    def out_of_memory_once(module, inputs):
        if next(failures, False):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    models.calls["unet"].fn.register_forward_pre_hook(out_of_memory_once)
    svc = service(tiny_repo, models)
    victims = [RecordingSink(), RecordingSink()]
    for i, sink in enumerate(victims):
        svc.submit(request("a red circle", i, steps=4), sink)
    drain(svc)
    for sink in victims:
        assert sink.ends == 1 and sink.error[0] == "UNAVAILABLE" and "out of GPU memory" in sink.error[1], sink.error
    assert svc.engine.stats.failed == 2
    later = RecordingSink()
    svc.submit(request("a red circle", 0, steps=4), later)
    drain(svc)
    assert later.image is not None and later.ends == 1


def test_row_cap_lowers_the_scheduler_rows(tiny_repo, tiny_checkpoint):
    models = TorchModels(tiny_checkpoint, TorchOptions(buckets=(4, 8)), log=lambda *a: None)
    assert models.row_cap == 8
    svc = service(tiny_repo, models, max_rows=32)
    assert svc.engine.scheduler.config.max_rows == 8 and svc.engine.stats.row_cap == 8
    sinks = [RecordingSink() for _ in range(6)]
    for i, sink in enumerate(sinks):
        svc.submit(request("a blue square", i, steps=3), sink)
    drain(svc)
    assert all(s.image is not None for s in sinks)
    assert svc.engine.stats.rows <= 8 * svc.engine.stats.steps


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_checkpoint):
    compiled = TorchModels(
        tiny_checkpoint, TorchOptions(compile=True, buckets=(4,)), components=("unet",), log=lambda *a: None
    )
    eager = TorchModels(tiny_checkpoint, TorchOptions(buckets=(4,)), components=("unet",), log=lambda *a: None)
    inputs = unet_inputs(3)
    assert np.abs(compiled.unet(*inputs) - eager.unet(*inputs)).max() <= 1e-4


def test_the_upscalers_unet_calls_use_the_one_call_its_graphs_are_captured_for(tiny_upscale_checkpoint):
    """Per-row inputs (the x4 upscaler's noise level) go through the UNet's one bucketed call:
    a call built per request would hold no captured graph, so CUDA would never replay one. The
    capture examples have the key the engine's calls have."""
    models = TorchModels(tiny_upscale_checkpoint, log=lambda *a: None)
    used = []
    run = models._with_device
    models._with_device = lambda call, *arrays: (
        used.append((call, _key(call.bucket(len(arrays[0])), arrays))) or run(call, *arrays)
    )
    info, rows = models.info, 2
    latent = info.native_size // info.vae_factor
    for label in (20, 350):
        out = models.unet(
            np.zeros((rows, info.unet_in_channels, latent, latent), np.float32),
            np.array([5, 5]),
            np.zeros((rows, info.text_length, info.text_hidden), np.float32),
            class_labels=np.full(rows, label, np.int64),
        )
        assert out.shape == (rows, info.latent_channels, latent, latent)
    (first, key), (second, _) = used
    assert first is second is models.calls["unet"]
    examples = models.native_examples(rows)["unet"]
    assert _key(first.bucket(rows), examples) == key
