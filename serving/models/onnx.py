"""ONNX Runtime sessions for the exported components, usable in any process."""
from pathlib import Path

import numpy as np
import onnxruntime as ort


def providers() -> list:
    """CUDA when this onnxruntime build and machine have it, else CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxComponent:
    def __init__(self, onnx_path, threads: int = 0):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Spinning worker threads steal the cores other processes (the other Triton models, the
        # clients) need: measured 2x slower UNet calls on 2 busy cores with spinning on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs) -> dict:
        # a per-row value may arrive as [B, 1] (Triton's config dims); the graph takes [B]
        inputs = {n: v.reshape(len(v)) if self.input_ranks[n] == 1 else v for n, v in inputs.items()}
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def run_batched(self, requests: list) -> list:
        """Runs several requests' inputs (each batch-first) as one batch per set of non-batch
        shapes, and splits the outputs back per request."""
        results = [None] * len(requests)
        groups = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(r[n].shape[1:] for n in self.input_names), []).append(i)
        for members in groups.values():
            if len(members) == 1:
                results[members[0]] = self(**requests[members[0]])
                continue
            merged = self(**{n: np.concatenate([requests[i][n] for i in members]) for n in self.input_names})
            start = 0
            for i in members:
                size = len(requests[i][self.input_names[0]])
                results[i] = {n: v[start : start + size] for n, v in merged.items()}
                start += size
        return results


class LocalUnet:
    """A UNet alone in this process: the pipeline's in-process runner (the regional UNet also
    takes region_weights)."""

    def __init__(self, onnx_path, threads: int = 0):
        self.component = OnnxComponent(onnx_path, threads)

    def __call__(self, sample, timestep, encoder_hidden_states, **extra):
        return self.component(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states, **extra)[
            "noise_pred"
        ]


def regional_unet(repo_dir, threads: int = 0):
    """The regional UNet of a repository (regions' attention mode), or None in an export that predates it."""
    path = Path(repo_dir) / "unet_regional" / "1" / "model.onnx"
    return LocalUnet(path, threads) if path.is_file() else None


class LocalModels:
    """The components of a model repository, run in this process (the engine's ModelCalls)."""

    def __init__(self, repo_dir, threads: int = 0):
        repo = Path(repo_dir)
        self.text_encoder = OnnxComponent(repo / "text_encoder" / "1" / "model.onnx", threads)
        self.unet = LocalUnet(repo / "unet" / "1" / "model.onnx", threads)
        self.regional_unet = regional_unet(repo, threads)
        self.vae_decoder = OnnxComponent(repo / "vae_decoder" / "1" / "model.onnx", threads)
        self.vae_encoder = OnnxComponent(repo / "vae_encoder" / "1" / "model.onnx", threads)

    def encode_text(self, input_ids):
        return self.text_encoder(input_ids=input_ids)["last_hidden_state"]

    def decode(self, latents):
        return self.vae_decoder(latents=latents)["images"]

    def encode_image(self, images):
        out = self.vae_encoder(images=images)
        return out["latents_mean"], out["latents_std"]
