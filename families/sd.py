"""The Stable Diffusion 1.x/2.x family (StableDiffusionPipeline and its inpainting and x4-upscaler
kin): one CLIP text encoder whose final hidden states are the UNet's context, a UNet taking
(latent, timestep, context) and, for the x4 upscaler, the noise level as class labels.

A family declares what the layers above it read instead of branching on names (the other
families subclass this one and override what differs; docs/extending.md):
- `pipelines`: the model_index.json `_class_name`s it serves;
- `text_folders`: (text encoder, tokenizer) checkpoint folders, in context order;
- `token_inputs` / `text_outputs` / `text_inputs`: the exported text encoder's contract and which
  denoiser input each of its outputs feeds;
- `unet_row_inputs`: the UNet's inputs beyond (sample, timestep, encoder_hidden_states), one row
  per UNet row, and `row_inputs` their values for one request;
- `request_fields`: the request fields only this family reads (others' are refused);
- `regional_attention`: whether regions' attention mode (the regional UNet) is exported;
- `vae_fp32`: whether the VAE must run in FP32 where the rest runs in FP16;
- `check`: refuses, by its model_index.json, a pipeline of its classes it cannot serve;
- `torch_module`: the torch wrapper of each component, shared by export and the torch runner.
Nothing here imports torch at module level: the engine reads these declarations without it.
"""

from families.contracts import BATCH, TensorSpec, token_input_names


class StableDiffusion:
    name = "sd"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionUpscalePipeline",
                 "StableDiffusionImg2ImgPipeline")
    text_folders = (("text_encoder", "tokenizer"),)
    regional_attention = True
    request_fields = ()

    def token_inputs(self, info) -> tuple:
        return token_input_names(len(info.text_encoders))

    def text_outputs(self, info) -> tuple:
        # the final (layer-normed) hidden states, as StableDiffusionPipeline conditions on
        return (TensorSpec("last_hidden_state", "float32", (BATCH, info.text_length, info.text_hidden)),)

    def text_inputs(self) -> dict:
        """The text encoder's outputs -> the denoiser inputs they feed (per text)."""
        return {"last_hidden_state": "encoder_hidden_states"}

    def unet_row_inputs(self, info) -> tuple:
        # the x4 upscaler's noise level, one per row
        return (TensorSpec("class_labels", "int64", (BATCH,)),) if info.layout == "upscale" else ()

    def check(self, model_index: dict, path) -> None:
        """Refuses a pipeline of this family's classes that it cannot serve (ValueError naming why)."""

    def vae_fp32(self, info) -> bool:
        """Whether the VAE must stay FP32 in an FP16 deployment (StableDiffusionPipeline never
        upcasts its VAE)."""
        return False

    def row_inputs(self, request, variant) -> dict:
        """A request's own per-row denoiser inputs (one value per row of its job), beyond its
        text's and its image conditioning's."""
        return {}

    def torch_module(self, component: str, info):
        from families.sd_torch import load_module

        return load_module(component, info)



