"""Component runners: what the engine's runner calls to run the exported models.

A runner for one checkpoint offers, over numpy arrays:
  encode_text(input_ids int64 [N, L]) -> float32 [N, L, D]
  unet(sample float32 [B, C, h, w], timestep float32 [B], encoder_hidden_states float32 [B, L, D], **per_row)
      -> float32 [B, C', h, w]   (per_row: further batch-first UNet inputs by name, e.g. class_labels)
  decode(latents float32 [N, C, h, w], scaled) -> float32 [N, H, W, 3] in [0, 1]
  encode_image(images float32 [N, H, W, 3] in [0, 1]) -> (mean, std) float32 [N, C, h, w], scaled
and optionally row_cap: the UNet rows per call its device can serve.
Implementations: ONNX Runtime in this process (onnx.py), torch in this process (torch_runner.py),
Triton BLS calls (the pipeline model); assemble.py picks one per component from the pipeline's
config parameters.
"""
