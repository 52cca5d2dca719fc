"""`ldm serve`: export the model repository if needed, run tritonserver until Ctrl-C/SIGTERM."""
import signal
import threading

from serving.defaults import DEFAULT_REPO


def add_arguments(parser):
    parser.add_argument("--checkpoint", help="diffusers checkpoint to serve, exported if changed (default: the "
                        "shipped model, unless --repo holds another model exported there)")
    parser.add_argument("--repo", default=str(DEFAULT_REPO), help="model repository (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-file", help="write tritonserver's log here instead of the terminal")
    from export.cli import add_repository_options

    add_repository_options(parser.add_argument_group("repository options (used when exporting)"))


def run(args) -> int:
    from export.cli import export_with_options
    from serving.defaults import checkpoint_to_export, served_model
    from serving.triton.server import TritonServer

    checkpoint = checkpoint_to_export(args.checkpoint, args.repo)
    if checkpoint is not None:
        export_with_options(checkpoint, args)
    print(f"model: {served_model(args.repo)} (pass --checkpoint to serve another)", flush=True)
    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port, args.host, args.log_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting tritonserver on {args.repo} ...", flush=True)
    server.start()
    print(f"ready  gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}", flush=True)
    print('try:   ldm generate "a red circle" -o out.png', flush=True)
    try:
        while not stop.wait(1.0):
            if server.process.poll() is not None:
                print(f"tritonserver exited with code {server.process.returncode}", flush=True)
                return 1
    finally:
        print("stopping tritonserver ...", flush=True)
        server.stop()
    return 0
