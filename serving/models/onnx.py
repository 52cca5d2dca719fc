"""ONNX Runtime sessions for the exported components, usable in any process."""

from typing import TYPE_CHECKING
import json
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

    def __init__(self, component: OnnxComponent):
        self.component = component

    def __call__(self, sample, timestep, encoder_hidden_states, **inputs):
        """inputs: the family's other per-row inputs, by name."""
        return self.component(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states, **inputs)[
            "noise_pred"
        ]


class LocalModels:
    """One UNet variant's components of a model repository, run in this process (a Runner's
    models); `sessions` (model name -> OnnxComponent) lets variants share components."""

    def __init__(
        self,
        repo_dir,
        threads: int = 0,
        variant: str | None = None,
        sessions: dict | None = None,
        model: str | None = None,
    ):
        repo = Path(repo_dir)
        info = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())
        info = info["models"][model or info["default_model"]]
        facts = info["variants"][variant or info["primary"]]
        components = facts["components"]
        sessions = {} if sessions is None else sessions

        def session(kind):
            name = components[kind]
            if name not in sessions:
                sessions[name] = OnnxComponent(repo / name / "1" / "model.onnx", threads)
            return sessions[name]

        # with LoRA inputs the text encoder runs its LoRA graph, as the denoiser
        self.text_encoder = (
            OnnxComponent(repo / "pipeline" / "1" / facts["lora_text_encoder"], threads)
            if facts.get("lora_text_encoder")
            else session("text_encoder")
        )
        # with LoRA inputs (export --lora) every call runs the LoRA graph (serving/core/lora.py)
        self._unet = (
            LocalUnet(OnnxComponent(repo / "pipeline" / "1" / facts["lora_unet"], threads))
            if facts.get("lora_unet")
            else LocalUnet(session("unet"))
        )
        # regions' attention mode (the base variant's, where exported)
        self._regional = LocalUnet(session("unet_regional")) if "unet_regional" in components else None
        self.vae_decoder = session("vae_decoder")
        self.vae_encoder = session("vae_encoder") if "vae_encoder" in components else None

    def encode_text(self, input_ids, **more_ids):
        """Token ids by input name (input_ids, input_ids_2, ...) -> the text encoder's outputs by name."""
        return self.text_encoder(input_ids=input_ids, **more_ids)

    def unet(self, sample, timestep, encoder_hidden_states, **per_row):
        return self._unet(sample, timestep, encoder_hidden_states, **per_row)

    def regional_unet(self, sample, timestep, encoder_hidden_states, **per_row):
        return self._regional(sample, timestep, encoder_hidden_states, **per_row)

    def decode(self, latents):
        return self.vae_decoder(latents=latents)["images"]

    def encode_image(self, images):
        """images float32 [N, H, W, 3] in [0, 1] -> the VAE posterior's (mean, std), scaled latents."""
        out = self.vae_encoder(images=images)
        return out["latents_mean"], out["latents_std"]


def local_variants(repo_dir, threads: int = 0) -> dict:
    """{(model, variant): LocalModels} of every variant of every model of a repository, each shared
    component loaded once."""
    info = json.loads((Path(repo_dir) / "pipeline" / "1" / "pipeline.json").read_text())
    sessions = {}
    return {
        (model, name): LocalModels(repo_dir, threads, name, sessions, model)
        for model, facts in info["models"].items()
        for name in facts["variants"]
    }


if TYPE_CHECKING:  # mypy checks the implementations against the core's Protocols (serving/core/interfaces.py)
    from serving.core.interfaces import RunnerModels

    _checked: type[RunnerModels] = LocalModels
