"""Mixed LoRA rows in one denoiser call (families/lora.py) against diffusers' own LoRA loading:
two adapters in diffusers' format with different ranks, alphas (adapter metadata) and target
layers (attention projections, 1x1-conv proj_in/proj_out, feed-forward), read by
serving/models/adapters.py, give in one batched UNet call for each row what diffusers'
load_lora_weights + set_adapters(names, weights) gives for that row alone; a row without
adapters is bit-identical to the UNet without LoRA layers."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

from families.lora import install_mixed_lora, set_call
from serving.models.adapters import AdapterError, read_adapter
from tests.support.loras import ADAPTERS, served_with_loras, write_lora


ROWS = [(0.0, 0.0), (1.0, 0.0), (0.0, 0.7), (0.8, -0.5)]  # (weight of a, weight of b) per row


@pytest.fixture(scope="module")
def lora_files(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: write_lora(tiny_checkpoint, root / name, *spec) for name, spec in ADAPTERS.items()}


def test_mixed_rows_equal_diffusers_set_adapters_row_by_row(tiny_checkpoint, lora_files):
    adapters = [read_adapter(lora_files[name], name, tiny_checkpoint) for name in ADAPTERS]
    unet = StableDiffusionPipeline.from_pretrained(tiny_checkpoint).unet.eval()
    wrappers = install_mixed_lora(unet, sorted({layer for a in adapters for layer in a.denoiser}))
    columns = sum(a.rank for a in adapters)
    banks = {}
    for name, wrapper in wrappers.items():
        bank_a = np.zeros((wrapper.in_features, columns), np.float32)
        bank_b = np.zeros((columns, wrapper.out_features), np.float32)
        start = 0
        for adapter in adapters:
            if name in adapter.denoiser:
                a, b = adapter.denoiser[name]
                bank_a[:, start : start + a.shape[1]], bank_b[start : start + a.shape[1]] = a, b
            start += adapter.rank
        banks[name] = (torch.from_numpy(bank_a), torch.from_numpy(bank_b))
    scales = torch.tensor([[w for w, a in zip(row, adapters) for _ in range(a.rank)] for row in ROWS])
    torch.manual_seed(0)
    x, t, context = torch.randn(4, 4, 8, 8), torch.tensor([500.0, 300.0, 100.0, 700.0]), torch.randn(4, 16, 32)
    with torch.no_grad():
        set_call(wrappers, banks, scales)
        mixed = unet(x, t, encoder_hidden_states=context).sample
        set_call(wrappers, {}, None)
        plain = unet(x, t, encoder_hidden_states=context).sample
    assert torch.equal(mixed[0], plain[0])  # no adapter: base(x) + 0, exactly
    reference = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    for name, path in lora_files.items():
        reference.load_lora_weights(str(path), adapter_name=name)
    for i, weights in enumerate(ROWS):
        reference.set_adapters(list(ADAPTERS), list(weights))
        with torch.no_grad():
            alone = reference.unet(x[i : i + 1], t[i : i + 1], encoder_hidden_states=context[i : i + 1]).sample[0]
        error = float((alone - mixed[i]).abs().max())
        print(
            f"row {i} weights {weights}: max abs vs diffusers {error:.2e}, adapters' effect {float((alone - plain[i]).abs().max()):.3f}"
        )
        assert error < 1e-4
        if any(weights):
            assert float((alone - plain[i]).abs().max()) > 0.1  # the adapters act


def test_a_lora_for_another_model_is_refused_naming_its_first_layer(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    save_file(
        {
            "unet.down_blocks.9.attentions.0.proj_in.lora.down.weight": torch.zeros(2, 32),
            "unet.down_blocks.9.attentions.0.proj_in.lora.up.weight": torch.zeros(32, 2),
        },
        tmp_path / "other.safetensors",
    )
    with pytest.raises(AdapterError, match=r"layer unet.down_blocks.9.attentions.0.proj_in is not a layer"):
        read_adapter(tmp_path / "other.safetensors", "other", tiny_checkpoint)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a LoRA file"):
        read_adapter(tmp_path / "junk.safetensors", "junk", tiny_checkpoint)


def test_served_adapters_equal_diffusers_and_can_be_uploaded_replaced_and_removed(
    tiny_checkpoint, lora_files, tmp_path
):
    """Through the in-process pipeline (ONNX Runtime, the LoRA graph): each request equals diffusers'
    pipeline with the same adapters and weights, alone or in a crowd, by fields or by <lora:> tags."""
    import shutil

    from tests.support.image_inputs import drain, submit
    from serving.core.sampler import noise_generator
    from serving.core.service import LoraInUse

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_files["a"], folder / "a.safetensors")
    svc = served_with_loras(tiny_checkpoint, folder, tmp_path / "repo")
    svc.load_lora("b", lora_files["b"].read_bytes())
    assert [e["id"] for e in svc.loras()] == ["a", "b"]
    names = lambda *n: np.array([x.encode() for x in n], object)  # noqa: E731
    requests = [
        ({}, (0.0, 0.0)),
        (dict(lora_names=names("a")), (1.0, 0.0)),
        (dict(lora_names=names("a", "b"), lora_weights=np.array([0.8, -0.5], np.float32)), (0.8, -0.5)),
    ]
    alone = []
    for seed, (fields, _) in enumerate(requests):
        sink = submit(svc, "a red circle", seed=seed, steps=6, **fields)
        drain(svc)
        assert sink.error is None, sink.error
        alone.append(sink.image)
    crowd = [submit(svc, "a red circle", seed=seed, steps=6, **fields) for seed, (fields, _) in enumerate(requests)]
    tagged = submit(svc, "a red circle <lora:a:0.8> <lora:b:-0.5>", seed=2, steps=6)
    drain(svc)
    assert all(np.array_equal(a, s.image) for a, s in zip(alone, crowd))
    assert np.array_equal(tagged.image, alone[2])  # the tags are removed from the text, their adapters applied
    reference = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    reference.set_progress_bar_config(disable=True)
    for name, path in lora_files.items():
        reference.load_lora_weights(str(path), adapter_name=name)
    for seed, (_, weights) in enumerate(requests):
        reference.set_adapters(list(ADAPTERS), list(weights))
        latents = torch.from_numpy(noise_generator(seed).standard_normal((4, 8, 8), dtype=np.float32))[None]
        image = reference(
            "a red circle",
            num_inference_steps=6,
            guidance_scale=5.0,
            height=32,
            width=32,
            latents=latents,
            output_type="np",
        ).images[0]
        error = np.abs((image * 255).round() - alone[seed]).mean()
        print(f"weights {weights}: mean abs vs diffusers {error:.4f} / 255")
        assert error <= 1.0
    # refusals name the field; an adapter a queued job will hold cannot be removed while it runs
    for fields, message in (
        (dict(lora_names=names("zz")), "loras[0].name: no adapter named 'zz'; loaded: a, b"),
        (dict(lora_names=names("a"), lora_weights=np.array([np.nan], np.float32)), "loras[0].weight"),
        (dict(lora_names=names("a", "a")), "loras[1].name: 'a' is named twice"),
    ):
        sink = submit(svc, "a red circle", seed=1, steps=4, **fields)
        assert sink.error[0] == "INVALID_ARG" and sink.error[1].startswith(message), sink.error
    # a steer of the adapters applies from the job's next step: before step 0 it is a fresh request's
    steered = submit(svc, "a red circle", seed=2, steps=6, request_id="s")
    svc.steer("s", {"lora_names": names("a", "b"), "lora_weights": np.array([0.8, -0.5], np.float32)})
    drain(svc)
    assert np.array_equal(steered.image, alone[2])
    midway = submit(svc, "a red circle", seed=2, steps=6, request_id="m")
    for _ in range(3):
        svc.engine.run_iteration()
    svc.steer("m", {"lora_names": names("a"), "lora_weights": np.array([1.0], np.float32)})
    drain(svc)
    assert not np.array_equal(midway.image, alone[0]) and not np.array_equal(midway.image, alone[1])
    running = submit(svc, "a red circle", seed=1, steps=6, lora_names=names("b"))
    svc.engine.run_iteration()
    with pytest.raises(LoraInUse):
        svc.unload_lora("b")
    drain(svc)
    svc.unload_lora("b")
    assert running.image is not None and [e["id"] for e in svc.loras()] == ["a"]


def test_the_torch_runner_serves_the_same_adapter_bytes_as_onnx(tiny_checkpoint, lora_files, tmp_path):
    """The torch runner's fixed-shape bank (families/lora.py StaticBank: what keeps CUDA graphs
    valid) gives the bytes of the in-process ONNX runner's LoRA graph, on CPU."""
    import shutil

    from tests.support.image_inputs import drain, submit
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.core.config import PipelineConfig
    from serving.core.service import PipelineAssets, PipelineService
    from serving.models.assemble import RunnerChoice, build_models, plan_gpu_memory

    folder = tmp_path / "loras"
    folder.mkdir()
    for name, path in lora_files.items():
        shutil.copy(path, folder / f"{name}.safetensors")
    images = {}
    for unet in ("inprocess", "torch"):
        params = pipeline_parameters(unet=unet, lora_dir=str(folder))
        repo = tmp_path / f"repo-{unet}"
        write_repository(tiny_checkpoint, repo, pipeline_parameters=params, log=lambda *a: None)
        config = PipelineConfig.parse({k: str(v) for k, v in params.items()})
        assets = PipelineAssets.read(repo / "pipeline" / "1")
        choice = RunnerChoice.from_config(config, "cpu")
        models = {
            ("tiny", v): build_models(choice, repo, "1", None, facts) for v, facts in assets.info["variants"].items()
        }
        plan_gpu_memory(models.values())
        svc = PipelineService(assets, config, models, lora_reader=read_adapter)
        sinks = [
            submit(
                svc,
                "a red circle",
                seed=3,
                steps=5,
                lora_names=np.array([b"a", b"b"], object),
                lora_weights=np.array(weights, np.float32),
            )
            for weights in ([1.0, 0.0], [0.0, 0.0], [0.5, 1.5])
        ]
        drain(svc)
        images[unet] = [s.image for s in sinks]
    assert all(np.array_equal(a, b) for a, b in zip(images["inprocess"], images["torch"]))


def test_rows_without_adapters_are_bit_identical_to_a_server_without_lora_support(
    tiny_checkpoint, tiny_repo, lora_files, tmp_path
):
    """The same requests without adapters through the plain export and the LoRA export (its LoRA
    graphs in every call), alone and sharing calls with adapter rows: the same bytes."""
    import shutil

    from tests.support.image_inputs import drain, service, submit

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_files["a"], folder / "a.safetensors")
    lora = served_with_loras(tiny_checkpoint, folder, tmp_path / "repo")
    plain = service(tiny_repo)
    requests = [
        dict(seed=5, steps=6),
        dict(seed=6, steps=5, guidance_scale=1.0),
        dict(seed=7, steps=6, height=48, width=32),
    ]
    expected = []
    for fields in requests:
        expected.append(submit(plain, "a blue square", **fields))
        drain(plain)
    alone = [submit(lora, "a blue square", **fields) for fields in requests[:1]]
    drain(lora)
    crowd = [submit(lora, "a blue square", **fields) for fields in requests]
    crowd += [submit(lora, "a red circle", seed=9, steps=6, lora_names=np.array([b"a"], object))]
    drain(lora)
    assert np.array_equal(alone[0].image, expected[0].image)
    assert all(np.array_equal(s.image, e.image) for s, e in zip(crowd, expected))


def test_an_sdxl_adapter_served_equals_diffusers(tmp_path):
    """SDXL's UNet takes adapters the same way (its text encoders take none yet): the served image
    equals StableDiffusionXLPipeline's with load_lora_weights + set_adapters, byte for byte."""
    from diffusers import StableDiffusionXLPipeline

    from tests.support.image_inputs import drain, submit
    from serving.core.sampler import noise_generator
    from training.tiny_checkpoint import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "sdxl", kind="sdxl")
    torch.manual_seed(5)
    pipe = StableDiffusionXLPipeline.from_pretrained(checkpoint)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:  # a realistic magnitude: the tiny SDXL is chaotic under huge adapters
            parameter.data.normal_(0, 0.05)
    folder = tmp_path / "loras"
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        weight_name="xl.safetensors",
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": targets},
    )
    svc = served_with_loras(checkpoint, folder, tmp_path / "repo")
    reference = StableDiffusionXLPipeline.from_pretrained(checkpoint)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(folder / "xl.safetensors"), adapter_name="xl")
    plain = submit(svc, "a red circle", seed=4, steps=6)
    drain(svc)
    for weight in (1.0, -0.5):
        sink = submit(
            svc,
            "a red circle",
            seed=4,
            steps=6,
            lora_names=np.array([b"xl"], object),
            lora_weights=np.array([weight], np.float32),
        )
        drain(svc)
        reference.set_adapters(["xl"], [weight])
        latents = torch.from_numpy(noise_generator(4).standard_normal((4, 8, 8), dtype=np.float32))[None]
        image = reference(
            "a red circle",
            num_inference_steps=6,
            guidance_scale=5.0,
            height=32,
            width=32,
            latents=latents,
            output_type="np",
        ).images[0]
        error = np.abs((image * 255).round() - sink.image).mean()
        effect = np.abs(sink.image.astype(int) - plain.image).mean()
        print(
            f"SDXL adapter at weight {weight}: mean abs vs diffusers {error:.4f} / 255, its effect {effect:.1f} / 255"
        )
        assert error <= 1.0 and effect > 2.0


def test_uploads_without_a_folder_go_to_a_temporary_one_removed_at_stop(tiny_checkpoint, lora_files, tmp_path):
    svc = served_with_loras(tiny_checkpoint, None, tmp_path / "repo")
    assert svc.lora_upload_dir is None  # nothing made for a service that receives no upload
    svc.load_lora("b", lora_files["b"].read_bytes())
    folder = svc.lora_upload_dir
    assert [e["id"] for e in svc.loras()] == ["b"] and len(list(folder.rglob("b.safetensors"))) == 1
    svc.stop(grace_s=0)
    assert not folder.exists()
