"""The `ldm` command line: one subcommand per module.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are
imported lazily so `ldm generate` does not pay for torch, and a subcommand whose module is not
present in this checkout is simply not offered.
"""

import argparse
import importlib
import importlib.util
import sys

SUBCOMMANDS = {
    "export": ("export.cli", "export a diffusers checkpoint to ONNX and write the Triton model repository"),
    "serve": ("serving.triton.serve", "start tritonserver on the model repository"),
    "drain": ("serving.triton.drain", "drain a running server: admit nothing, let the generations in flight finish"),
    "ready": ("serving.triton.readiness", "exit 1 unless the pipeline's engine admits generations (a readiness probe)"),
    "control-secret": ("serving.triton.control", "write a new control secret to a file (for drain, cancel, steer)"),
    "stub-check": (
        "serving.triton.stubs",
        "exit 1 unless the pipeline's python stub process is alive (a liveness probe)",
    ),
    "gateway": (
        "serving.gateway.cli",
        "serve the public API (gRPC ldm.v1.Images, OpenAI-style REST) in front of Triton",
    ),
    "generate": ("serving.client.generate", "ask a running server for an image"),
    "train": ("training.cli", "train the default model from scratch"),
    "tiny-checkpoint": (
        "training.tiny_cli",
        "write a tiny random-weight checkpoint of a family (sd, sdxl, flux) for tests and benchmarks",
    ),
    "train-lora": ("training.lora_train", "train a LoRA adapter (a new concept or a style) for the default model"),
    "eval": ("training.eval_cli", "measure prompt adherence of a checkpoint or a running server"),
    "bench": ("serving.bench.bench", "load-test the server against baselines"),
    "soak": ("serving.bench.soak", "mixed load for N minutes: every request accounted for, memory and fds flat"),
}


def _available():
    return {name: spec for name, spec in SUBCOMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion serving on Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    available = _available()
    requested = (argv if argv is not None else sys.argv[1:])[:1]
    for name, (module_name, help_text) in available.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the requested subcommand's module is imported (its arguments are needed to parse).
        if name in requested:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(available[args.command][0])
    return module.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
