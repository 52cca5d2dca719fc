"""`ldm export CHECKPOINT_DIR [--repo model_repository]`."""
from export.triton_config import BACKENDS
from serving.core.regions import DEFAULT_BASE_WEIGHT, DEFAULT_MODE, MAX_REGIONS


def add_arguments(parser):
    parser.add_argument("checkpoint", help="a diffusers StableDiffusionPipeline folder")
    parser.add_argument("--repo", default="model_repository", help="model repository to write (default: %(default)s)")
    add_repository_options(parser)


def add_repository_options(parser):
    """How the repository is written; `ldm serve` takes the same options for its export."""
    parser.add_argument("--backend", choices=BACKENDS, default="python",
                        help="python: python-backend models running ONNX Runtime (the PyPI Triton); "
                             "onnxruntime/tensorrt: native backends of the NGC Triton image")
    parser.add_argument("--gpu", action="store_true", help="place component instances on the GPU")
    parser.add_argument("--max-size", type=int, help="largest image side served (default: twice the native size)")
    parser.add_argument("--unet", choices=("inprocess", "bls"), default="inprocess",
                        help="how the pipeline reaches the UNet each step (default: %(default)s; see README)")
    parser.add_argument("--no-step-batching", action="store_true", help="serve one request at a time (a baseline)")
    parser.add_argument("--max-rows", type=int, default=32, help="UNet rows per call (default: %(default)s)")
    parser.add_argument("--max-active", type=int, default=16, help="requests denoising at once (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get UNAVAILABLE (default: %(default)s)")
    parser.add_argument("--unary-instances", type=int, default=4, help="concurrent unary/HTTP requests (default: %(default)s)")


def pipeline_parameters(unet="inprocess", step_batching=True, max_rows=32, max_active=16, max_queue=64) -> dict:
    """The pipeline's config.pbtxt parameters: batching knobs, then request defaults and limits."""
    return {
        "unet": unet,
        "step_batching": "true" if step_batching else "false",
        "max_rows": max_rows,
        "max_active": max_active,
        "max_queue": max_queue,
        "default_steps": 25,
        "max_steps": 150,
        "default_guidance_scale": 5.0,
        "max_guidance_scale": 50.0,
        "default_eta": 0.0,
        # regional prompts (serving/core/regions.py)
        "max_regions": MAX_REGIONS,
        "default_base_prompt_weight": DEFAULT_BASE_WEIGHT,
        "default_region_mode": DEFAULT_MODE,
    }


def parameters_from_args(args) -> dict:
    return pipeline_parameters(args.unet, not args.no_step_batching, args.max_rows, args.max_active, args.max_queue)


def export_with_options(checkpoint, args) -> dict:
    """Writes args.repo from `checkpoint` with the repository options of `args`."""
    from export.repository import write_repository

    return write_repository(
        checkpoint,
        args.repo,
        backend=args.backend,
        gpu=args.gpu,
        max_size=args.max_size,
        pipeline_parameters=parameters_from_args(args),
        unary_instances=args.unary_instances,
    )


def run(args) -> int:
    export_with_options(args.checkpoint, args)
    return 0
