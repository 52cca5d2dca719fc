"""Where the default model comes from: the trained checkpoint shipped in checkpoints/ when
present, else a tiny random-weight checkpoint built from configs (nothing is downloaded)."""
import os
from pathlib import Path

from serving.triton_server import PROJECT_ROOT

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
