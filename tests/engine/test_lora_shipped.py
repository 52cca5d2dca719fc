"""The shipped adapters (checkpoints/loras: the bar concept with its text-encoder part, the tall
style in diffusers/PEFT and kohya-ss form) served on the shipped model: each request equals
diffusers' StableDiffusionPipeline with the same files loaded by load_lora_weights and combined
by set_adapters, given the same initial latents (the seed's PCG64 draw), within 1/255 mean abs;
in a crowd each request's bytes equal what it gets alone."""

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from serving.defaults import PROJECT_ROOT, TRAINED_CHECKPOINT

LORAS = PROJECT_ROOT / "checkpoints" / "loras"
PROMPT = "a blue bar to the left of a red circle"
# (adapters and weights, or a prompt with <lora:> tags)
REQUESTS = [{}, {"bar": 1.0}, {"tall": 1.0}, {"bar": 1.0, "tall": 0.7}, {"tall-kohya": -0.5}]


def test_shipped_adapters_served_equal_diffusers(tmp_path):
    from serving.core.sampler import noise_generator
    from tests.support.image_inputs import drain, submit
    from tests.support.loras import served_with_loras

    assert sorted(p.stem for p in LORAS.glob("*.safetensors")) == ["bar", "tall", "tall-kohya"]
    svc = served_with_loras(TRAINED_CHECKPOINT, LORAS, tmp_path / "repo")

    def fields(adapters):
        if not adapters:
            return {}
        return {
            "lora_names": np.array([n.encode() for n in adapters], object),
            "lora_weights": np.array(list(adapters.values()), np.float32),
        }

    alone = []
    for seed, adapters in enumerate(REQUESTS):
        sink = submit(svc, PROMPT, seed=seed, steps=8, **fields(adapters))
        drain(svc)
        assert sink.error is None, sink.error
        alone.append(sink.image)
    crowd = [submit(svc, PROMPT, seed=seed, steps=8, **fields(a)) for seed, a in enumerate(REQUESTS)]
    tagged = submit(svc, PROMPT + " <lora:bar:1> <lora:tall:0.7>", seed=3, steps=8)
    drain(svc)
    assert all(np.array_equal(a, s.image) for a, s in zip(alone, crowd))
    assert np.array_equal(tagged.image, alone[3])

    reference = StableDiffusionPipeline.from_pretrained(TRAINED_CHECKPOINT)
    reference.set_progress_bar_config(disable=True)
    for path in sorted(LORAS.glob("*.safetensors")):
        reference.load_lora_weights(str(path), adapter_name=path.stem)
    for seed, adapters in enumerate(REQUESTS):
        if adapters:
            reference.enable_lora()
            reference.set_adapters(list(adapters), list(adapters.values()))
        else:
            reference.disable_lora()
        latents = torch.from_numpy(noise_generator(seed).standard_normal((4, 16, 16), dtype=np.float32))[None]
        image = reference(
            PROMPT, num_inference_steps=8, guidance_scale=5.0, height=64, width=64, latents=latents, output_type="np"
        ).images[0]
        error = np.abs((image * 255).round() - alone[seed]).mean()
        effect = np.abs(alone[seed].astype(int) - alone[0]).mean()
        print(f"{adapters or 'no adapters'}: mean abs vs diffusers {error:.4f} / 255, effect {effect:.1f} / 255")
        assert error <= 1.0
        assert not adapters or effect > 1.0  # the adapters act
