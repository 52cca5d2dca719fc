"""`ldm generate "PROMPT" -o out.png`: one image from a running server."""
import sys
import time


def add_arguments(parser):
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--eta", type=float, help="DDIM eta (0: deterministic)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--url", help="server address (default: localhost:8001 for gRPC, localhost:8000 for HTTP)")
    regions = parser.add_argument_group("regional prompts (README: Regional prompts)")
    regions.add_argument("--region", action="append", metavar="PROMPT", help="a region's prompt (repeat, in region order)")
    regions.add_argument("--region-negative", action="append", metavar="PROMPT", help="a region's negative prompt (repeat)")
    regions.add_argument("--divide", metavar="RATIOS", help='regions by division: "1,1" two columns, "1,2;1,1,1" a row over two')
    regions.add_argument("--region-mask", action="append", metavar="PATH",
                         help="a region's mask, an image of the output's size (white = inside; repeat, one per region)")
    regions.add_argument("--base-weight", type=float, help="share of the whole-image prompt inside regions (default 0.2)")
    regions.add_argument("--region-mode", choices=("latent", "attention"), help="how regions condition the UNet")


def run(args) -> int:
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    from serving.client.kserve import LdmClient

    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")

    def show(generation):
        step, total = generation.progress[-1]
        print(f"\r  step {step}/{total}", end="", file=sys.stderr, flush=True)

    fields = dict(negative_prompt=args.negative, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                  height=args.height, width=args.width, eta=args.eta)
    try:
        fields.update(region_fields(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.protocol == "grpc":
        fields["progress_every"] = 1
    start = time.perf_counter()
    try:
        with LdmClient(url, args.protocol) as client:
            result = client.run(args.prompt, on_progress=show if args.protocol == "grpc" else None, **fields)
    except InferenceServerException as exc:
        print(f"\nerror ({exc.status()}): {exc.message()}", file=sys.stderr)
        return 2
    latency = time.perf_counter() - start
    Image.fromarray(result.image).save(args.output)
    h, w, _ = result.image.shape
    print(f"\nwrote {args.output} ({w}x{h}, seed {result.seed}) in {latency * 1000:.0f} ms via {args.protocol} {url}")
    return 0


def region_fields(args) -> dict:
    """The request's region fields from the command line (the server validates them)."""
    import numpy as np
    from PIL import Image

    masks = None
    if args.region_mask:
        images = [np.asarray(Image.open(path).convert("L")) for path in args.region_mask]
        if len({image.shape for image in images}) > 1:
            raise ValueError(f"--region-mask: the masks differ in size: {[image.shape for image in images]}")
        masks = np.stack(images)
    return dict(region_prompts=args.region, region_negative_prompts=args.region_negative,
                region_divisions=args.divide, region_masks=masks, base_prompt_weight=args.base_weight,
                region_mode=args.region_mode)
