"""`ldm stub-check`: whether a model's python-backend stub process is alive.

Triton 2.51 neither restarts a python stub that died (killed, out of memory) nor reports its
model unready: every request fails while the server looks ready and live. `ldm serve` watches
the pipeline's stub itself; where tritonserver runs alone (the Kubernetes triton container), this
command is its liveness probe, so the kubelet restarts the container."""

import os
from pathlib import Path


def stub_pids(model: str = "pipeline", group: int | None = None) -> list:
    """The live python-backend stub processes of `model` (their command line names the model's
    model.py), in process group `group` when given. A dead stub not yet reaped has no command line."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if group is not None and os.getpgid(int(entry.name)) != group:
                continue
        except (OSError, ProcessLookupError):
            continue
        if any(a.endswith(f"/{model}/1/model.py".encode()) for a in args):
            pids.append(int(entry.name))
    return pids


def add_arguments(parser):
    parser.add_argument("--model", default="pipeline", help="the python-backend model (default: %(default)s)")


def run(args) -> int:
    pids = stub_pids(args.model)
    print(f"{args.model} stub: {'pid ' + ', '.join(map(str, pids)) if pids else 'not running'}", flush=True)
    return 0 if pids else 1
