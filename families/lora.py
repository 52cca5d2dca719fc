"""Mixed LoRA adapters in one denoiser call: every row of the call may carry a different set of
adapters with its own weights, and no base weight is ever merged or copied.

Written by hand because no library does it: PEFT and diffusers' set_adapters apply one adapter
mix to the whole batch, and vLLM-Omni's runtime cannot mix adapter states in one batch.

Resident adapters sit side by side in a bank per adapted layer: A [in, K] and B [K, out], where
K is the sum of their ranks (each adapter owns a column range). A call passes one scale matrix
S [rows, K]: row i, column j is the weight of the adapter owning column j in row i's adapter set
times that adapter's alpha / rank at this layer (0 where the row does not use it). Each adapted
layer then computes
    y = base(x) + ((x A) * S[row]) B
two matrix products whatever the number of adapters, shapes fixed by K (graph friendly: the bank
and S are inputs of an ONNX graph or a CUDA graph). A row whose S is 0 gets base(x) + 0, which is
base(x) exactly. Linear layers and 1x1 convolutions (SD's proj_in/proj_out) are adapted.

For the per-layer alpha / rank, the PEFT convention (scaling = lora_alpha / r, kohya's alpha /
rank) is taken from PEFT's own LoraLayer.scaling after diffusers' loader has read the file
(serving/models/adapters.py), so no scaling rule is written here.
"""

from typing import Any
import torch


class MixedLora(torch.nn.Module):
    """Wraps a Linear or 1x1 Conv2d: base(x) + ((x A) * S[row]) B. `bank` (A, B) and the call's
    scales S are set by the owner before each call (`set_call`); without them it is the base layer."""

    def __init__(self, base: torch.nn.Module, name: str):
        super().__init__()
        self.base: Any = base  # a Linear or Conv2d (torch types other attributes as Tensor | Module)
        self.name = name
        self.bank = None  # (A [in, K], B [K, out]) tensors, or None: no adapter touches this layer
        self.scales = None  # [rows, K] for the current call

    @property
    def in_features(self) -> int:
        return self.base.in_features if isinstance(self.base, torch.nn.Linear) else self.base.in_channels

    @property
    def out_features(self) -> int:
        return self.base.out_features if isinstance(self.base, torch.nn.Linear) else self.base.out_channels

    def forward(self, x):
        y = self.base(x)
        if self.bank is None or self.scales is None:
            return y
        a, b = self.bank
        if isinstance(self.base, torch.nn.Linear):  # x [rows, ..., in]
            h = torch.matmul(x, a)
            scales = self.scales.reshape(self.scales.shape[0], *([1] * (h.dim() - 2)), self.scales.shape[1])
            return y + torch.matmul(h * scales, b)
        # 1x1 convolution: x [rows, in, height, width], a per-pixel linear map of the channels
        h = torch.einsum("bchw,ck->bkhw", x, a) * self.scales[:, :, None, None]
        return y + torch.einsum("bkhw,ko->bohw", h, b)


def adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or (
        isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
    )


def install_mixed_lora(model: Any, names) -> dict:
    """Replaces the named adaptable layers of `model` by MixedLora wrappers; returns {name: wrapper}."""
    wrappers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not adaptable(base):
            raise ValueError(f"{name}: a {type(base).__name__} cannot carry a LoRA here (Linear and 1x1 Conv2d can)")
        wrappers[name] = MixedLora(base, name)
        setattr(parent, child, wrappers[name])
    return wrappers


def adaptable_layers(model: torch.nn.Module) -> dict:
    """{name: (in, out)} of every layer of `model` a LoRA may target."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MixedLora):
            out[name] = (module.in_features, module.out_features)
        elif adaptable(module) and not name.endswith(".base"):
            linear = isinstance(module, torch.nn.Linear)
            out[name] = (
                module.in_features if linear else module.in_channels,
                module.out_features if linear else module.out_channels,
            )
    return out


def lora_layers(model: torch.nn.Module) -> dict:
    """{name: (in, out)} of the layers a served LoRA may target: the Linear and 1x1-conv layers of
    the denoiser's transformer blocks (attention projections, feed-forward, proj_in/proj_out), the
    layers kohya-ss's and diffusers' LoRA trainers target; LoCon's ResNet convolutions are not served."""
    return {name: shape for name, shape in adaptable_layers(model).items() if ".attentions." in name}


def text_lora_layers(model: torch.nn.Module) -> dict:
    """{name: (in, out)} of a CLIP text encoder's layers a LoRA may target: every Linear of its
    transformer layers (q, k, v, out projections and the MLP), what kohya-ss's lora_te_* targets."""
    return {name: shape for name, shape in adaptable_layers(model).items() if "encoder.layers." in name}


class WithLoraInputs(torch.nn.Module):
    """A denoiser wrapper whose last inputs are the call's LoRA scales [rows, K] and each adapted
    layer's bank A [in, K], B [K, out] (in `layers` order): what the exported ONNX graph takes, so
    the bank and the scales are graph inputs, not weights."""

    def __init__(self, module: torch.nn.Module, layers):
        super().__init__()
        self.module = module
        self.layers = list(layers)
        self.wrappers = install_mixed_lora(module.model, self.layers)

    def forward(self, *args):
        count = len(args) - 1 - 2 * len(self.layers)
        scales, banks = args[count], args[count + 1 :]
        set_call(self.wrappers, {name: (banks[2 * i], banks[2 * i + 1]) for i, name in enumerate(self.layers)}, scales)
        return self.module(*args[:count])


class StaticBank(torch.nn.Module):
    """The torch runner's mixed-adapter layers with a fixed-shape bank: every adapted layer's A
    [in, width] and B [width, out] live in buffers allocated once (a CUDA graph captured with them
    stays valid: new adapters are copied in place), and the denoiser's last input is the call's
    scales [rows, width] (a batched input, zero in padding rows). Columns past the registry's
    bank are zero."""

    def __init__(self, module: torch.nn.Module, layers: dict, width: int):
        super().__init__()
        self.module = module
        self.model = module.model  # the diffusers model, as the other wrappers expose it
        self.width = width
        self.wrappers = install_mixed_lora(module.model, list(layers))
        for i, (fan_in, fan_out) in enumerate(layers.values()):
            self.register_buffer(f"a{i}", torch.zeros(fan_in, width))
            self.register_buffer(f"b{i}", torch.zeros(width, fan_out))
        self.names = list(layers)
        self.version = None  # which registry bank the buffers hold

    def load(self, banks: dict, version) -> None:
        """Copies a registry bank ({layer: (A [in, K], B [K, out])}, K <= width) into the buffers."""
        if version == self.version:
            return
        with torch.no_grad():
            for i, name in enumerate(self.names):
                a, b = getattr(self, f"a{i}"), getattr(self, f"b{i}")
                a.zero_()
                b.zero_()
                bank_a, bank_b = banks[name]
                a[:, : bank_a.shape[1]].copy_(torch.from_numpy(bank_a))
                b[: bank_b.shape[0]].copy_(torch.from_numpy(bank_b))
        self.version = version

    def forward(self, *args):
        for i, name in enumerate(self.names):
            wrapper = self.wrappers[name]
            wrapper.bank = (getattr(self, f"a{i}"), getattr(self, f"b{i}"))
            wrapper.scales = args[-1]
        return self.module(*args[:-1])


def set_call(wrappers: dict, banks: dict, scales: torch.Tensor | None) -> None:
    """Arms every wrapper for one call: its layer's bank (A, B) from `banks` (absent: untouched
    layer) and the call's scales; scales None disarms them all (base layers only)."""
    for name, wrapper in wrappers.items():
        wrapper.bank = banks.get(name)
        wrapper.scales = scales
