"""`ldm generate "PROMPT" -o out.png [-n N]`: images from a running server, with a progress bar.

By default it talks to the gateway's typed API (gRPC ldm.v1.Images, serving/client/images.py);
`--protocol kserve` / `kserve-http` use Triton's own protocols (serving/client/kserve.py).
With -n N it writes N files, out-0.png ... out-(N-1).png, of seeds seed ... seed+N-1.
"""

import os
from pathlib import Path
import secrets
import sys
import time

from serving.client.loras import lora_pairs

PROTOCOLS = {"gateway": "localhost:50051", "kserve": "localhost:8001", "kserve-http": "localhost:8000"}
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def add_arguments(parser):
    parser.add_argument("prompt")
    parser.add_argument(
        "-o", "--output", default="out.png", help="file to write; .png, .jpg or .webp (default: %(default)s)"
    )
    parser.add_argument("-n", type=int, default=1, help="images to make (files out-0.png, out-1.png, ...; default: 1)")
    parser.add_argument(
        "--model",
        help="which served model (the gateway's GET /v1/models, or ListModels, lists them; "
        "default: the server's default model)",
    )
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: random)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--eta", type=float, help="DDIM eta (0: deterministic)")
    parser.add_argument(
        "--sampler",
        help="ddim, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc, lcm, "
        'flow_match_euler, or an A1111 name ("DPM++ 2M Karras", "Euler a"); default: the server\'s',
    )
    parser.add_argument(
        "--sigma-schedule", choices=("default", "karras"), help="sigma spacing of the Euler, DPM++ and UniPC samplers"
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="classifier-free guidance only from LO to HI (fractions of the run, e.g. 0.2 0.8)",
    )
    sdxl = parser.add_argument_group("SDXL size conditioning (models of family sdxl only)")
    sdxl.add_argument(
        "--original-size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="the size the image is said to have had before cropping (default: the output's)",
    )
    sdxl.add_argument(
        "--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"), help="that crop's corner (default: 0 0)"
    )
    sdxl.add_argument(
        "--target-size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="the size the image is meant for (default: the output's)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME:WEIGHT",
        help="a LoRA adapter and its weight (default "
        "1), repeatable; the gateway's GET /v1/loras lists them (also: <lora:NAME:WEIGHT> in the prompt)",
    )
    parser.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="gateway",
        help="gateway: the typed API (default); kserve / kserve-http: Triton's gRPC / HTTP",
    )
    parser.add_argument(
        "--url", help="server address (default: " + ", ".join(f"{k} {v}" for k, v in PROTOCOLS.items()) + ")"
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("LDM_API_KEY"), help="the gateway's API key (default: $LDM_API_KEY)"
    )
    regions = parser.add_argument_group("regional prompts (README: Regional prompts)")
    regions.add_argument(
        "--region", action="append", metavar="PROMPT", help="a region's prompt (repeat, in region order)"
    )
    regions.add_argument(
        "--region-negative", action="append", metavar="PROMPT", help="a region's negative prompt (repeat)"
    )
    regions.add_argument(
        "--divide", metavar="RATIOS", help='regions by division: "1,1" two columns, "1,2;1,1,1" a row over two'
    )
    regions.add_argument(
        "--region-mask",
        action="append",
        metavar="PATH",
        help="a region's mask, an image of the output's size (white = inside; repeat, one per region)",
    )
    regions.add_argument(
        "--base-weight", type=float, help="share of the whole-image prompt inside regions (default 0.2)"
    )
    regions.add_argument("--region-mode", choices=("latent", "attention"), help="how regions condition the UNet")
    # image-conditioned generation (README: img2img, inpainting, upscaling)
    images = parser.add_argument_group("image-conditioned generation")
    images.add_argument(
        "--init-image",
        help="PNG/JPEG to start from (img2img; with --mask: inpaint; with --task upscale: the low-res input)",
    )
    images.add_argument("--mask", help="greyscale PNG of the image's size: white (>= 128) is repainted, black kept")
    images.add_argument(
        "--strength", type=float, help="share of the schedule denoised, 0 < s <= 1 (img2img 0.75, inpaint 1)"
    )
    images.add_argument(
        "--mask-blur", type=int, help="Gaussian blur (pixels) of the mask's edge when pasting the input back"
    )
    images.add_argument(
        "--no-keep-unmasked", action="store_true", help="do not paste the input's pixels back outside the mask"
    )
    images.add_argument("--task", choices=("txt2img", "img2img", "inpaint", "upscale"), help="default: from the inputs")
    images.add_argument("--noise-level", type=int, help="upscale: noise added to the low-res input (default 20)")


def output_paths(output: str, n: int) -> list:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


class StepBar:
    """One progress bar over all images' denoising steps (tqdm)."""

    def __init__(self, n: int, steps: int | None):
        from tqdm import tqdm

        self.n, self.steps = n, steps
        self.bar = tqdm(
            total=n * steps if steps else None, unit="step", desc="generating", file=sys.stderr, leave=False
        )
        self.done, self.totals = {}, {}

    def step(self, index: int, step: int, total: int) -> None:
        if self.bar.total is None:
            self.bar.total = self.n * total
            self.bar.refresh()
        self.totals[index] = total
        self.bar.update(step - self.done.get(index, 0))
        self.done[index] = step

    def finished(self, index: int) -> None:
        """The last step is not reported as progress: the image is."""
        total = self.totals.get(index, self.steps)
        if total:
            self.step(index, total, total)

    def close(self) -> None:
        self.bar.close()


def image_fields(args) -> dict:
    """The image-conditioning request fields from the command line (None: the server's default)."""
    import numpy as np
    from PIL import Image

    def read(path, mode):
        return None if path is None else np.asarray(Image.open(path).convert(mode))

    return dict(
        init_image=read(args.init_image, "RGB"),
        mask=read(args.mask, "L"),
        strength=args.strength,
        mask_blur=args.mask_blur,
        keep_unmasked=False if args.no_keep_unmasked else None,
        task=args.task,
        noise_level=args.noise_level,
    )


def run(args) -> int:
    if args.n < 1:
        print("ldm generate: -n must be at least 1", file=sys.stderr)
        return 2
    suffix = Path(args.output).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        print(f"ldm generate: -o must end in {', '.join(SUFFIX_FORMATS)}", file=sys.stderr)
        return 2
    url = args.url or PROTOCOLS[args.protocol]
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    fields = dict(
        negative_prompt=args.negative,
        steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        eta=args.eta,
        sampler=args.sampler,
        sigma_schedule=args.sigma_schedule,
        guidance_interval=args.guidance_interval,
        model=args.model,
        original_size=args.original_size,
        crop_top_left=args.crop_top_left,
        target_size=args.target_size,
    )
    try:
        if args.lora:
            fields["loras"] = lora_pairs(args.lora)
        fields.update(image_fields(args))
        fields.update(region_fields(args, args.protocol))
    except ValueError as exc:
        print(f"ldm generate: {exc}", file=sys.stderr)
        return 2
    paths = output_paths(args.output, args.n)
    bar = StepBar(args.n, args.steps)
    start = time.perf_counter()
    try:
        if args.protocol == "gateway":
            written = _via_gateway(args, url, seed, fields, paths, SUFFIX_FORMATS[suffix], bar)
        else:
            written = _via_kserve(args, url, seed, fields, paths, bar)
    except Exception as exc:  # the clients' errors carry their status code
        status = getattr(exc, "status", None)
        if not callable(status):
            raise
        bar.close()
        message = getattr(exc, "message", exc)
        if callable(message):
            message = message()
        print(f"\nerror ({str(status()).removeprefix('StatusCode.')}): {message}", file=sys.stderr)
        return 2
    bar.close()
    latency = time.perf_counter() - start
    for path, (width, height, image_seed) in zip(paths, written):
        print(f"wrote {path} ({width}x{height}, seed {image_seed})")
    print(f"{len(written)} image(s) in {latency * 1000:.0f} ms via {args.protocol} {url}")
    return 0


def _via_gateway(args, url, seed, fields, paths, output_format, bar) -> list:
    from serving.client.images import Image, ImagesClient

    written = {}
    with ImagesClient(url, api_key=args.api_key) as client:
        for event in client.stream(args.prompt, n=args.n, seed=seed, output_format=output_format, **fields):
            if isinstance(event, Image):
                event.save(paths[event.index])
                written[event.index] = (event.width, event.height, event.seed)
                bar.finished(event.index)
            else:
                bar.step(event.index, event.step, event.total_steps)
    return [written[i] for i in range(args.n)]


def _via_kserve(args, url, seed, fields, paths, bar) -> list:
    import numpy as np
    from PIL import Image

    from serving.client.kserve import LdmClient

    http = args.protocol == "kserve-http"
    if fields.get("guidance_interval") is not None:  # Triton's tensor: FP32 [2]
        fields = dict(fields, guidance_interval=np.asarray(fields["guidance_interval"], np.float32))
    written = []
    with LdmClient(url, "http" if http else "grpc") as client:
        for index, path in enumerate(paths):
            extra = {} if http else {"progress_every": 1}
            on_progress = None if http else (lambda g, i=index: bar.step(i, *g.progress[-1]))
            result = client.run(args.prompt, on_progress=on_progress, seed=seed + index, **fields, **extra)
            bar.finished(index)
            Image.fromarray(result.image).save(path)
            height, width, _ = result.image.shape
            written.append((width, height, result.seed))
    return written


def region_fields(args, protocol: str) -> dict:
    """The request's region fields from the command line, as the gateway's typed API (regions: a
    list of prompt, negative prompt, mask) or Triton's tensors take them; the server validates them."""
    import numpy as np
    from PIL import Image

    masks = None
    if args.region_mask:
        images = [np.asarray(Image.open(path).convert("L")) for path in args.region_mask]
        if len({image.shape for image in images}) > 1:
            raise ValueError(f"--region-mask: the masks differ in size: {[image.shape for image in images]}")
        masks = np.stack(images)
    shared = dict(region_divisions=args.divide, base_prompt_weight=args.base_weight, region_mode=args.region_mode)
    if protocol != "gateway":
        return dict(
            region_prompts=args.region, region_negative_prompts=args.region_negative, region_masks=masks, **shared
        )
    if not args.region:
        if args.region_negative or masks is not None:
            raise ValueError("--region-negative and --region-mask need --region")
        return {}
    negatives = args.region_negative or []
    regions = [
        {
            "prompt": prompt,
            "negative_prompt": negatives[i] if i < len(negatives) else "",
            "mask": masks[i] if masks is not None and i < len(masks) else None,
        }
        for i, prompt in enumerate(args.region)
    ]
    return dict(regions=regions, **shared)
