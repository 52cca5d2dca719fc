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

ADAPTERS = {  # name: (seed, rank, alpha, targets)
    "a": (1, 4, 8, ["to_q", "to_k", "to_v", "to_out.0"]),
    "b": (2, 2, 2, ["to_q", "to_v", "proj_in", "proj_out", "ff.net.2"]),
}
ROWS = [(0.0, 0.0), (1.0, 0.0), (0.0, 0.7), (0.8, -0.5)]  # (weight of a, weight of b) per row


def write_lora(checkpoint, folder, seed, rank, alpha, targets):
    """A LoRA in diffusers' format with random non-zero weights, saved by diffusers itself."""
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": targets})
    return folder / "pytorch_lora_weights.safetensors"


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
                bank_a[:, start:start + a.shape[1]], bank_b[start:start + a.shape[1]] = a, b
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
            alone = reference.unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=context[i:i + 1]).sample[0]
        error = float((alone - mixed[i]).abs().max())
        print(f"row {i} weights {weights}: max abs vs diffusers {error:.2e}, adapters' effect {float((alone - plain[i]).abs().max()):.3f}")
        assert error < 1e-4
        if any(weights):
            assert float((alone - plain[i]).abs().max()) > 0.1  # the adapters act


def test_a_lora_for_another_model_is_refused_naming_its_first_layer(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.9.attentions.0.proj_in.lora.down.weight": torch.zeros(2, 32),
               "unet.down_blocks.9.attentions.0.proj_in.lora.up.weight": torch.zeros(32, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(AdapterError, match=r"layer unet.down_blocks.9.attentions.0.proj_in is not a layer"):
        read_adapter(tmp_path / "other.safetensors", "other", tiny_checkpoint)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a LoRA file"):
        read_adapter(tmp_path / "junk.safetensors", "junk", tiny_checkpoint)
