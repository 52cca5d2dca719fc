"""Component runners: what the engine's runner calls to run the exported models.

A runner for one checkpoint offers, over numpy arrays:
  encode_text(input_ids int64 [N, L]) -> float32 [N, L, D]
  unet(sample float32 [B, C, h, w], timestep int64 [B], encoder_hidden_states float32 [B, L, D]) -> float32 [B, C', h, w]
  decode(latents float32 [N, C, h, w], scaled) -> float32 [N, H, W, 3] in [0, 1]
Implementations: ONNX Runtime in this process (onnx.py), Triton BLS calls (the pipeline model).
"""
