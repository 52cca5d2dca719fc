"""Where the default model comes from: the trained checkpoint shipped in checkpoints/ when
present, else a tiny random-weight checkpoint built from configs (nothing is downloaded)."""

import json
import os
from pathlib import Path

from serving.triton.server import PROJECT_ROOT

TRAINED_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "ldm-shapes"
DEFAULT_REPO = PROJECT_ROOT / "model_repository"


def cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm-serving"))


def default_checkpoint(log=print) -> Path:
    if (TRAINED_CHECKPOINT / "model_index.json").is_file():
        return TRAINED_CHECKPOINT
    tiny = cache_dir() / "tiny-random"
    if not (tiny / "model_index.json").is_file():
        from training.tiny_checkpoint import write_tiny_checkpoint

        log(f"no trained checkpoint in {TRAINED_CHECKPOINT}; building a tiny random one in {tiny}")
        write_tiny_checkpoint(tiny)
    return tiny


def served_model(repo) -> Path | None:
    """The checkpoint the repository was exported from, or None if it holds no export."""
    from export.repository import has_artifacts

    if not has_artifacts(repo):
        return None
    return Path(json.loads((Path(repo) / "pipeline" / "1" / "pipeline.json").read_text())["checkpoint"])


def checkpoint_to_export(requested, repo, log=print) -> Path | None:
    """What `ldm serve` exports before it starts (the export is cached, so an unchanged
    checkpoint costs nothing): the requested one; else the default model, so a retrained or newly
    pulled checkpoint is served and not a stale export of it (or of the tiny fallback); None, to
    serve the repository as it is, when it holds some other model a user exported there."""
    if requested:
        return Path(requested)
    recorded = served_model(repo)
    defaults = {TRAINED_CHECKPOINT.resolve(), (cache_dir() / "tiny-random").resolve()}
    if recorded is not None and recorded.resolve() not in defaults:
        return None
    return default_checkpoint(log)
