"""Inputs and an in-process service for the image-conditioned tests (img2img, inpaint, upscale)."""

import numpy as np

from serving.core.config import PipelineConfig
from serving.client.kserve import request_arrays
from serving.core.service import PipelineAssets, PipelineService
from serving.models.onnx import local_variants
from training.data import Obj, Scene, render


class Sink:
    """Records a job's one ending."""

    def __init__(self):
        self.image = self.error = None
        self.ends = 0

    def progress(self, step, total, preview, steer_applied=()):
        pass

    def finish(self, image, seed):
        self.image, self.ends = image, self.ends + 1

    def fail(self, code, message):
        self.error, self.ends = (code, message), self.ends + 1

    def cancelled(self):
        return False


def service(repo, **params) -> PipelineService:
    """The pipeline of `repo` in this process (ONNX Runtime), every variant loaded."""
    return PipelineService(
        PipelineAssets.read(repo / "pipeline" / "1"),
        PipelineConfig.parse({k: str(v) for k, v in params.items()}),
        local_variants(repo),
    )


def drain(svc, limit=10_000) -> None:
    for _ in range(limit):
        if not svc.engine.run_iteration():
            return
    raise AssertionError("engine did not settle")


def submit(svc, prompt, request_id=None, **fields) -> Sink:
    sink = Sink()
    svc.submit(request_arrays(prompt, **fields), sink, request_id=request_id)
    return sink


def generate(svc, prompt, **fields) -> np.ndarray:
    sink = submit(svc, prompt, **fields)
    drain(svc)
    assert sink.error is None, sink.error
    return sink.image


def photo(size: int, seed: int) -> np.ndarray:
    """A random-texture uint8 [size, size, 3] image (for the tiny random checkpoints)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def one_object_scene() -> tuple:
    """A rendered 64x64 scene in the default model's world, and its caption."""
    scene = Scene("black", (Obj("red", "circle", 17.0, 31.0, 12.0),), size="large", position="left")
    return render(scene), scene.caption


def half_mask(size: int, side: str = "right") -> np.ndarray:
    """uint8 [size, size]: 255 over one half (repaint), 0 over the other."""
    mask = np.zeros((size, size), np.uint8)
    if side == "right":
        mask[:, size // 2 :] = 255
    else:
        mask[:, : size // 2] = 255
    return mask
