"""LoRA file formats: a writer of the kohya-ss / A1111 form, for tests and users.

kohya-ss's sd-scripts (and A1111, ComfyUI, ...) name each adapted layer after its module path in
diffusers' SD 1.x UNet or in the CLIP text model, dots turned to underscores, with the rank
factors called down/up and the alpha stored per layer:

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  [r, in]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    [out, r]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha             scalar
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                  ...

and the layer computes W x + (alpha / r) · up(down(x)) — PEFT's lora_B(lora_A(x)) · lora_alpha / r.

Only the writer is here. Reading goes through diffusers' own converter
(`StableDiffusionPipeline.load_lora_weights` / `lora_state_dict` →
`_convert_non_diffusers_lora_to_diffusers`); tests/engine/test_lora_train.py checks that diffusers'
loading of what `to_kohya` writes gives the same UNet outputs as loading the diffusers file.
"""

import json
import re
from pathlib import Path

import torch

PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# The role of a key's tensor, after the module path: PEFT's and diffusers' spellings.
_ROLE = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"lora_(?P<peft>[AB])(?:\.[^.]+)?\.weight"  # PEFT: to_q.lora_A.weight, to_q.lora_A.default.weight
    r"|(?:lora|lora_linear_layer)\.(?P<diffusers>down|up)\.weight"  # diffusers: to_q.lora.down.weight
    r")$"
)
# diffusers' legacy attention-processor spelling: attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")


def _split(key: str, default_part: str):
    """(part, module path, "down" | "up") of a PEFT or diffusers LoRA key."""
    part = default_part
    for name in PARTS:
        if key.startswith(name + "."):
            part, key = name, key[len(name) + 1 :]
            break
    key = key.removeprefix("base_model.model.")
    m = _PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return part, f"{m['attn']}.{proj}", m["role"]
    m = _ROLE.match(key)
    if not m:
        raise ValueError(f"not a LoRA weight key: {key!r}")
    role = m["diffusers"] or ("down" if m["peft"] == "A" else "up")
    return part, m["module"], role


def _kohya_name(part: str, module: str) -> str:
    if part == "text_encoder" and not module.startswith("text_model."):
        module = "text_model." + module  # kohya's names keep CLIPTextModel's text_model level
    return PARTS[part] + module.replace(".", "_")


def to_kohya(state_dict: dict, alphas=None, default_part: str = "unet") -> dict:
    """kohya-ss / A1111 state dict of a PEFT or diffusers LoRA state dict.

    `state_dict`: keys as StableDiffusionPipeline.save_lora_weights writes them (`unet.…`,
    `text_encoder.…`; diffusers' `.lora.down/up` or `.lora_linear_layer.down/up`, its legacy
    `processor.to_q_lora.down`, or PEFT's `.lora_A/.lora_B`); keys with neither prefix belong
    to `default_part`. `alphas`: None (alpha = rank, i.e. scale 1), one number for every layer,
    or a dict keyed by part ("unet", "text_encoder") or by "<part>.<module path>", the latter
    first."""
    out, ranks = {}, {}
    for key, tensor in state_dict.items():
        part, module, role = _split(key, default_part)
        name = _kohya_name(part, module)
        out[f"{name}.lora_{role}.weight"] = tensor.detach().contiguous()
        if role == "down":
            ranks[name] = (part, module, tensor.shape[0])
    for name, (part, module, rank) in ranks.items():
        if f"{name}.lora_up.weight" not in out:
            raise ValueError(f"{part}.{module}: a down weight without its up weight")
        if alphas is None:
            alpha = rank
        elif isinstance(alphas, dict):
            alpha = alphas.get(f"{part}.{module}", alphas.get(part, rank))
        else:
            alpha = alphas
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if len(out) != 3 * len(ranks):
        raise ValueError("up weights without their down weights")
    return out


def alphas_from_metadata(metadata: dict) -> dict:
    """{part: lora_alpha} from the `lora_adapter_metadata` diffusers' save_lora_weights writes."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    config = json.loads(metadata["lora_adapter_metadata"])
    return {part: config[f"{part}.lora_alpha"] for part in PARTS if f"{part}.lora_alpha" in config}


def save_kohya(diffusers_file, kohya_file) -> None:
    """Rewrites a diffusers/PEFT LoRA file (alphas from its metadata, else alpha = rank) in kohya form."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(diffusers_file), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        alphas = alphas_from_metadata(f.metadata())
    kohya = to_kohya(state, alphas or None)
    Path(kohya_file).parent.mkdir(parents=True, exist_ok=True)
    ranks = sorted({int(v.shape[0]) for k, v in kohya.items() if k.endswith("lora_down.weight")})
    save_file(
        kohya,
        str(kohya_file),
        metadata={
            "ss_network_module": "networks.lora",
            "ss_network_dim": ",".join(map(str, ranks)),
            "ss_network_alpha": ",".join(sorted({f"{a:g}" for a in alphas.values()})) or "rank",
        },
    )
    canonical_header(kohya_file)


def canonical_header(path) -> None:
    """Rewrites a safetensors file's header as JSON with sorted keys. safetensors keeps the
    metadata in a hash map with a random seed per map, so two saves of the same tensors and
    metadata can order its keys differently; sorted, a seeded run writes the same bytes. Tensor
    offsets are relative to the data section, which is left as it is."""
    import struct

    path = Path(path)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes with spaces
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])
