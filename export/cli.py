"""`ldm export CHECKPOINT_DIR [--repo model_repository]`."""

from pathlib import Path

from export.triton_config import BACKENDS
from families.contracts import MAX_REGIONS
from serving.core.config import DEFAULT_BASE_WEIGHT
from serving.core.regions import DEFAULT_MODE
from serving.models.assemble import TEXT_VAE_RUNNERS, UNET_RUNNERS


def add_arguments(parser):
    parser.add_argument(
        "checkpoint",
        help="a diffusers pipeline folder (text-to-image, inpainting or x4-upscaler: "
        "the UNet's layout is read from its config)",
    )
    parser.add_argument("--repo", default="model_repository", help="model repository to write (default: %(default)s)")
    add_repository_options(parser)


def add_repository_options(parser):
    """How the repository is written; `ldm serve` takes the same options for its export."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="python",
        help="python: python-backend models running ONNX Runtime (the PyPI Triton); "
        "onnxruntime/tensorrt: native backends of the NGC Triton image",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="place the pipeline and component instances on the GPU (KIND_GPU), with the CUDA "
        "memory pool their BLS tensors need; the torch runner becomes the default",
    )
    # image-conditioned generation: extra UNet variants beside the primary checkpoint's
    parser.add_argument(
        "--inpaint-checkpoint",
        help="an inpainting checkpoint (9-channel UNet, StableDiffusionInpaintPipeline) "
        "to serve task inpaint with; without it inpainting blends latents with the base UNet",
    )
    parser.add_argument(
        "--upscale-checkpoint",
        help="an x4 upscaler checkpoint (StableDiffusionUpscalePipeline) to serve task upscale with",
    )
    parser.add_argument("--max-size", type=int, help="largest image side served (default: twice the native size)")
    parser.add_argument(
        "--unet",
        choices=UNET_RUNNERS,
        help="how the pipeline runs the UNet each step: inprocess (ONNX Runtime), bls (the unet "
        "model), torch (in process, CUDA graphs on GPU). Default: torch with --gpu and the "
        "python backend, bls with --gpu and a native backend, else inprocess",
    )
    parser.add_argument(
        "--text-vae",
        choices=TEXT_VAE_RUNNERS,
        help="how the pipeline runs the text encoder and VAE: bls (their models) or torch (in "
        "process). Default: torch with --gpu and the python backend, else bls",
    )
    parser.add_argument(
        "--torch-buckets",
        default="",
        help="row buckets of the torch runner, e.g. 1,2,4,8,16,32 (default: powers of two up to "
        "--max-rows, from 1 on GPU and 4 on CPU)",
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="torch.compile the torch runner's modules (about a minute per bucket at start-up on a GPU)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="torch runner on GPU without CUDA graphs")
    parser.add_argument("--no-step-batching", action="store_true", help="serve one request at a time (a baseline)")
    parser.add_argument("--max-rows", type=int, default=32, help="UNet rows per call (default: %(default)s)")
    parser.add_argument("--max-active", type=int, default=16, help="requests denoising at once (default: %(default)s)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting; more get UNAVAILABLE (default: %(default)s)"
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="export the denoiser with mixed LoRA adapter inputs, so requests "
        "can name adapters (loras); implied by --lora-dir",
    )
    parser.add_argument(
        "--lora-dir",
        default="",
        help="a folder of LoRA .safetensors files registered at start, each named by its file's stem (implies --lora)",
    )


def pipeline_parameters(
    unet="inprocess",
    step_batching=True,
    max_rows=32,
    max_active=16,
    max_queue=64,
    text_vae="bls",
    torch_buckets="",
    torch_compile=False,
    cuda_graphs=True,
    lora=False,
    lora_dir="",
) -> dict:
    """The pipeline's config.pbtxt parameters: runners, batching knobs, then request defaults and limits."""
    return {
        "unet": unet,
        "text_vae": text_vae,
        "torch_buckets": torch_buckets,
        "torch_compile": "true" if torch_compile else "false",
        "cuda_graphs": "true" if cuda_graphs else "false",
        "step_batching": "true" if step_batching else "false",
        "max_rows": max_rows,
        "max_active": max_active,
        "max_queue": max_queue,
        "lora": "true" if lora or lora_dir else "false",
        "lora_dir": str(lora_dir),
        "default_steps": 25,
        "max_steps": 150,
        "max_guidance_scale": 50.0,
        "default_eta": 0.0,
        "max_prompt_bytes": 4096,  # UTF-8 bytes per text input, refused before tokenizing
        "drain_grace_s": 120,  # shutdown: seconds the generations in flight may still run
        # regional prompts (serving/core/regions.py)
        "max_regions": MAX_REGIONS,
        "default_base_prompt_weight": DEFAULT_BASE_WEIGHT,
        "default_region_mode": DEFAULT_MODE,
    }


def default_runners(gpu: bool, backend: str) -> tuple:
    """(unet, text_vae) when not given: on GPU with the PyPI Triton (python backend) everything runs
    with torch in the pipeline's process; with the NGC image's native backends the UNet is their
    model (BLS each step); on CPU the UNet runs in process with ONNX Runtime."""
    if gpu:
        return ("torch", "torch") if backend == "python" else ("bls", "bls")
    return "inprocess", "bls"


def parameters_from_args(args) -> dict:
    unet, text_vae = default_runners(args.gpu, args.backend)
    return pipeline_parameters(
        args.unet or unet,
        not args.no_step_batching,
        args.max_rows,
        args.max_active,
        args.max_queue,
        text_vae=args.text_vae or text_vae,
        torch_buckets=args.torch_buckets,
        torch_compile=args.torch_compile,
        cuda_graphs=not args.no_cuda_graphs,
        lora=args.lora,
        lora_dir=str(Path(args.lora_dir).resolve()) if args.lora_dir else "",
    )


def export_with_options(checkpoint, args, name: str | None = None, models: dict | None = None) -> dict:
    """Writes args.repo from `checkpoint` (the default model, named `name`; default: its folder's
    name) and the further models `models` ({name: DIR}, `ldm serve --checkpoint NAME=DIR`) with
    the repository options of `args`."""
    from export.repository import write_repository

    return write_repository(
        checkpoint,
        args.repo,
        backend=args.backend,
        gpu=args.gpu,
        max_size=args.max_size,
        pipeline_parameters=parameters_from_args(args),
        variants={"inpaint": args.inpaint_checkpoint, "upscale": args.upscale_checkpoint},
        models=models or None,
        name=name,
    )


def run(args) -> int:
    from export.tensorrt import TensorRTUnavailable

    try:
        export_with_options(args.checkpoint, args)
    except TensorRTUnavailable as exc:
        print(f"ldm export: {exc}")
        return 2
    return 0
