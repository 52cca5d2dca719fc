"""The engine's test doubles and drivers, shared by the engine-layer tests: a sink that records
what the engine tells one request, a PipelineService over an exported repository, a request's
input arrays, and the loop that runs the engine one iteration at a time until it settles.
(The `models` fixture, ONNX Runtime over the session's tiny repository, is in tests/conftest.py.)"""

import numpy as np

from serving.core.config import PipelineConfig
from serving.core.service import PipelineAssets, PipelineService


class RecordingSink:
    def __init__(self, cancel_after_step=None):
        self.image = self.error = None
        self.progress_log, self.previews = [], []
        self.steered = []  # (step count, steer ids first used by that step)
        self.events = []  # "progress", "image", "error" in order
        self.cancel_after_step = cancel_after_step
        self.ends = 0

    def progress(self, step, total, preview, steer_applied=()):
        self.progress_log.append((step, total))
        self.events.append("progress")
        if preview is not None:
            self.previews.append(preview)
        if steer_applied:
            self.steered.append((step, tuple(steer_applied)))

    def finish(self, image, seed):
        self.image, self.ends = image, self.ends + 1
        self.events.append("image")

    def fail(self, code, message):
        self.error, self.ends = (code, message), self.ends + 1
        self.events.append("error")

    def cancelled(self):
        return self.cancel_after_step is not None and len(self.progress_log) >= self.cancel_after_step


def make_service(repo, models, **params):
    return PipelineService(
        PipelineAssets.read(repo / "pipeline" / "1"),
        PipelineConfig.parse({k: str(v) for k, v in params.items()}),
        models,
    )


def request(prompt, seed, **fields):
    arrays = {"prompt": np.array([prompt.encode()], object), "seed": np.array([seed])}
    types = {
        "steps": np.int32,
        "guidance_scale": np.float32,
        "eta": np.float32,
        "height": np.int32,
        "width": np.int32,
        "progress_every": np.int32,
        "preview_every": np.int32,
        "timeout_s": np.float32,
    }
    arrays.update(
        {
            k: np.array([v.encode()], object) if isinstance(v, str) else np.array([v], types[k])
            for k, v in fields.items()
        }
    )
    return arrays


def drain(service, limit=10_000):
    for _ in range(limit):
        if not service.engine.run_iteration():
            return
    raise AssertionError("engine did not settle")


TARGET = ("a large red circle on the left", 1234, dict(steps=12, guidance_scale=5.0))
CROWD = [
    ("a blue square", 1, dict(steps=20, guidance_scale=7.5)),
    ("a green triangle at the top", 2, dict(steps=8, guidance_scale=1.0)),
    ("a yellow star", 3, dict(steps=15, guidance_scale=3.0, eta=0.5)),
    ("a small purple circle", 4, dict(steps=12, guidance_scale=5.0)),
    ("two cats", 5, dict(steps=30, guidance_scale=5.0, height=48, width=48)),
    ("an orange square on the right", 6, dict(steps=10, guidance_scale=9.0, eta=1.0)),
    ("a white circle", 7, dict(steps=25, guidance_scale=2.0)),
    ("a black background", 8, dict(steps=12, guidance_scale=5.0, height=24, width=40)),
]


def alone_and_in_a_crowd(repo, models) -> tuple:
    """TARGET's image served alone, and served joining CROWD mid-flight (a batched run, checked)."""
    service = make_service(repo, models)
    alone = RecordingSink()
    service.submit(request(TARGET[0], TARGET[1], **TARGET[2]), alone)
    drain(service)

    service = make_service(repo, models)
    crowd = [RecordingSink() for _ in CROWD]
    for (prompt, seed, fields), sink in zip(CROWD[:4], crowd):
        service.submit(request(prompt, seed, **fields), sink)
    for _ in range(3):  # the crowd is mid-flight when the target joins
        service.engine.run_iteration()
    together = RecordingSink()
    service.submit(request(TARGET[0], TARGET[1], **TARGET[2]), together)
    for (prompt, seed, fields), sink in zip(CROWD[4:], crowd[4:]):
        service.submit(request(prompt, seed, **fields), sink)
    drain(service)
    assert service.engine.stats.rows >= 3 * service.engine.stats.steps  # it really ran batched (alone: 2 rows)
    assert all(s.image is not None and s.ends == 1 for s in crowd)
    return alone, together
