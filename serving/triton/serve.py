"""`ldm serve`: export the model repository if needed, run tritonserver and, beside it, the
gateway (the public API: gRPC ldm.v1.Images and OpenAI-style REST), until Ctrl-C/SIGTERM."""
import signal
import threading

from serving.defaults import DEFAULT_REPO


def add_arguments(parser):
    parser.add_argument("--checkpoint", help="diffusers checkpoint to serve, exported if changed (default: the "
                        "shipped model, unless --repo holds another model exported there)")
    parser.add_argument("--repo", default=str(DEFAULT_REPO), help="model repository (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="Triton's KServe HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton's KServe gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port")
    parser.add_argument("--log-file", help="write tritonserver's log here instead of the terminal")
    from export.cli import add_repository_options
    from serving.gateway.cli import add_gateway_options

    gateway = parser.add_argument_group("gateway (the public API)")
    gateway.add_argument("--no-gateway", action="store_true", help="serve only Triton's own protocols")
    add_gateway_options(gateway, prefix="gateway-")
    add_repository_options(parser.add_argument_group("repository options (used when exporting)"))


def gateway_arguments(args) -> list:
    """The gateway options of `ldm serve` as `ldm gateway` arguments."""
    extra = ["--rate-limit", str(args.rate_limit), "--burst", str(args.burst), "--max-body-mb", str(args.max_body_mb),
             "--max-image-pixels", str(args.max_image_pixels), "--drain-s", str(args.drain_s)]
    if args.api_keys:
        extra += ["--api-keys", args.api_keys]
    if args.allow_anonymous:
        extra.append("--allow-anonymous")
    return extra


def run(args) -> int:
    from export.cli import export_with_options
    from serving.defaults import checkpoint_to_export, served_model
    from serving.gateway.process import GatewayProcess
    from serving.triton.server import TritonServer

    checkpoint = checkpoint_to_export(args.checkpoint, args.repo)
    if checkpoint is not None:
        export_with_options(checkpoint, args)
    print(f"model: {served_model(args.repo)} (pass --checkpoint to serve another)", flush=True)
    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port, args.host, args.log_file)
    gateway = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting tritonserver on {args.repo} ...", flush=True)
    server.start()
    try:
        if not args.no_gateway:
            gateway = GatewayProcess(server.grpc_url, args.gateway_rest_port, args.gateway_grpc_port, args.host,
                                     extra_args=gateway_arguments(args)).start()
        public = f"gateway REST http://{args.host}:{gateway.rest_port}  gRPC {gateway.grpc_url}  |  " if gateway else ""
        print(f"ready  {public}Triton gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}", flush=True)
        print('try:   ldm generate "a red circle" -o out.png' + ('' if gateway else ' --protocol kserve'), flush=True)
        while not stop.wait(1.0):
            for name, process in (("tritonserver", server.process), ("gateway", gateway and gateway.process)):
                if process is not None and process.poll() is not None:
                    print(f"{name} exited with code {process.returncode}", flush=True)
                    return 1
    finally:
        if gateway is not None:
            print("stopping the gateway ...", flush=True)
            gateway.stop()
        print("stopping tritonserver ...", flush=True)
        server.stop()
    return 0
