"""Small runs of `ldm eval --regions` on the shipped checkpoint, in process and through the
service (slow: minutes on 2 cores)."""

from pathlib import Path

import pytest

from training.regional_eval import LAYOUTS, ReferenceGenerator, ServiceGenerator, evaluator_accuracy, regional_adherence

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "ldm-shapes"
TARGETED = tuple(layout for layout in LAYOUTS if layout.target is not None)
# Floors under the full eval's latent-mode numbers in docs/model-card.md, with room for 8 scenes a
# layout, and far above what prompt-blind images would score (right colour in a region: ~1/6).
FLOORS = {"halves": 0.85, "three columns": 0.7, "row over two columns": 0.7, "row, two columns, row": 0.7}


def check(results):
    for layout in TARGETED:
        got = results[(layout.name, "latent")]["region_accuracy"]
        assert got >= FLOORS[layout.name], (layout.name, got)


@pytest.mark.slow
def test_small_regional_eval_in_process():
    from training.generate import load_pipeline

    assert evaluator_accuracy() >= 0.98
    check(regional_adherence(ReferenceGenerator(load_pipeline(CHECKPOINT)), 8, modes=("latent",), layouts=TARGETED))


@pytest.mark.slow
def test_small_regional_eval_through_the_service(default_server):
    server = default_server  # the shipped model, exported once (conftest.default_repo)
    check(regional_adherence(ServiceGenerator(server.grpc_url, "grpc"), 8, modes=("latent",), layouts=TARGETED))
