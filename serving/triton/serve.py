"""`ldm serve`: export the model repository if needed, run tritonserver and, beside it, the
gateway (the public API: gRPC ldm.v1.Images and OpenAI-style REST), until Ctrl-C/SIGTERM.

On SIGTERM (or Ctrl-C) it drains before it stops: the gateway is told to stop at once (it
refuses new calls, its readiness is false), the pipeline refuses new requests with UNAVAILABLE
and finishes the generations in flight for up to --drain-grace-s (serving/triton/drain.py),
failing those left with UNAVAILABLE; then the gateway and tritonserver exit, and tritonserver's
process group (its python-backend stubs) is killed if anything is left of it. Once drained,
tritonserver gets DRAINED_EXIT_S to exit (nothing is in flight; what it would wait for is its
clients' idle gRPC streams); a second signal during the drain ends the wait at once, and a
drain that failed leaves tritonserver its own exit timeout (longer than the grace).

If the pipeline's python stub process dies (killed, out of memory), Triton 2.51 neither restarts
it nor reports the model unready: every request would fail while the replica looks ready. So
`ldm serve` watches that process and, when it is gone, stops everything and exits 1, for its
supervisor (Kubernetes restarts the container) to bring the replica back.

`--checkpoint [NAME=]DIR`, repeated, serves several checkpoints side by side in one repository
(docs/models.md): the first is the default model; NAME (default: the folder's name) is what a
request's `model` and GET /v1/models call it. Without --checkpoint, a repository exported from
the default model is refreshed from it, keeping the other models it serves.

`--sampler NAME` sets the pipeline's config parameter default_sampler (what requests naming no
sampler get), checked against every exported checkpoint before anything starts.

`--lora-dir DIR` registers every DIR/*.safetensors as a LoRA adapter named by its file's stem
(requests name them in `loras` or `<lora:NAME:WEIGHT>`; POST /v1/loras adds more at run time,
docs/loras-api.md); it exports the denoiser with LoRA inputs (as `--lora`), served by the UNet
runners in the pipeline's process (inprocess, torch; refused with bls). A repository served as
it is (another model exported there) gets the folder in its config when its export has LoRA
inputs.

Triton's own ports (KServe HTTP and gRPC, metrics) listen on --triton-host, loopback by default
whatever --host is: they skip the gateway's keys and limits, so they are for the gateway and the
local operator; opening them takes an explicit --triton-host, with a warning. Each run makes a
new control secret (serving/triton/control.py) for tritonserver and the gateway, and leaves it,
readable by this user only, where `ldm drain` looks for it; the file goes when the run ends."""

import json
from pathlib import Path
import re
import signal
import sys
import threading

from serving.defaults import DEFAULT_REPO
from serving.triton.drain import DEFAULT_GRACE_S

DRAINED_EXIT_S = 10.0  # tritonserver's time to exit after a drain, before its group is killed
# a served model's name: a request's `model`, and the prefix of its components' Triton model names
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def add_arguments(parser):
    parser.add_argument(
        "--checkpoint",
        action="append",
        metavar="[NAME=]DIR",
        help="diffusers checkpoint to serve, exported if changed; repeat it to serve several side by side, "
        "the first being the default model; NAME (default: the folder's name) is what requests and GET "
        "/v1/models call it (default: the shipped model, unless --repo holds another model exported there)",
    )
    parser.add_argument("--repo", default=str(DEFAULT_REPO), help="model repository (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="the gateway's address (default: %(default)s)")
    parser.add_argument(
        "--triton-host",
        default="127.0.0.1",
        help="Triton's address (KServe and metrics ports: no keys, no limits; default: %(default)s)",
    )
    parser.add_argument("--http-port", type=int, default=8000, help="Triton's KServe HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton's KServe gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port")
    parser.add_argument("--log-file", help="write tritonserver's log here instead of the terminal")
    parser.add_argument(
        "--sampler",
        help="sampler of requests that name none: ddim, euler, euler_ancestral, dpmpp_2m, "
        'dpmpp_2m_sde, unipc, lcm, flow_match_euler or an A1111 name ("DPM++ 2M Karras"); default: '
        "the checkpoint's scheduler. Refused when it does not fit the model",
    )
    parser.add_argument(
        "--drain-grace-s",
        type=float,
        default=DEFAULT_GRACE_S,
        help="on SIGTERM, how long the generations in flight may finish before those left get "
        "UNAVAILABLE (default: %(default)s)",
    )
    from export.cli import add_repository_options
    from serving.gateway.cli import add_gateway_options

    gateway = parser.add_argument_group("gateway (the public API)")
    gateway.add_argument("--no-gateway", action="store_true", help="serve only Triton's own protocols")
    add_gateway_options(gateway, prefix="gateway-")
    add_repository_options(parser.add_argument_group("repository options (used when exporting)"))


def gateway_arguments(args) -> list:
    """The gateway options of `ldm serve` as `ldm gateway` arguments. The gateway's own drain
    lasts at least the pipeline's grace and 10 s more, so its calls in flight get their answers."""
    drain_s = max(args.drain_s, args.drain_grace_s + 10)
    extra = [
        "--rate-limit",
        str(args.rate_limit),
        "--burst",
        str(args.burst),
        "--max-body-mb",
        str(args.max_body_mb),
        "--max-image-pixels",
        str(args.max_image_pixels),
        "--drain-s",
        str(drain_s),
        "--admission-wait-s",
        str(args.admission_wait_s),
        "--max-key-share",
        str(args.max_key_share),
        "--max-request-pixels",
        str(args.max_request_pixels),
        "--allowed-hosts",
        args.allowed_hosts,
        "--allowed-origins",
        args.allowed_origins,
    ]
    if args.api_keys:
        extra += ["--api-keys", args.api_keys]
    if args.allow_anonymous:
        extra.append("--allow-anonymous")
    return extra


def run(args) -> int:
    from export.cli import export_with_options
    from serving.defaults import checkpoint_to_export, served_model
    from serving.gateway.access import is_loopback
    from serving.gateway.process import GatewayProcess
    from serving.triton.control import new_secret, secret_file, write_secret
    from serving.triton.server import TritonServer

    if not 0 <= args.drain_grace_s < float("inf"):
        raise SystemExit(f"--drain-grace-s must be a finite number >= 0, got {args.drain_grace_s}")
    try:
        name, first, others = checkpoints(args.checkpoint or [])
    except ValueError as exc:
        print(f"ldm serve: --checkpoint: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        check_lora_options(args)
    except ValueError as exc:
        print(f"ldm serve: {exc}", file=sys.stderr, flush=True)
        return 2
    checkpoint = checkpoint_to_export(first, args.repo)
    if checkpoint is not None:
        if first is None:  # the default model, refreshed: the other models the repository serves stay
            others = dict(list(recorded_models(args.repo).items())[1:])
        export_with_options(checkpoint, args, name=name, models=others)
    elif getattr(args, "lora_dir", ""):
        try:
            set_lora_dir(args.repo, args.lora_dir)
        except ValueError as exc:
            print(f"ldm serve: --lora-dir: {exc}", file=sys.stderr, flush=True)
            return 2
    if getattr(args, "lora_dir", ""):
        found = sorted(p.stem for p in Path(args.lora_dir).glob("*.safetensors"))
        print(
            f"loras: {', '.join(found) or 'none yet'} (from {Path(args.lora_dir).resolve()}; POST /v1/loras adds more)",
            flush=True,
        )
    print(
        f"models: {describe_models(args.repo)} (--checkpoint [NAME=]DIR, repeated, to serve others)"
        if len(recorded_models(args.repo)) > 1
        else f"model: {served_model(args.repo)} (pass --checkpoint to serve another)",
        flush=True,
    )
    try:
        set_default_sampler(args.repo, args.sampler)
    except ValueError as exc:
        print(f"ldm serve: --sampler: {str(exc).removeprefix('sampler: ')}", file=sys.stderr, flush=True)
        return 2
    # Triton is stopped only once drained; its exit timeout still outlasts the grace, in case
    # the drain message could not be delivered and Triton's own shutdown has to wait instead
    if not is_loopback(args.triton_host):
        print(
            f"warning: Triton's ports listen on {args.triton_host}: whoever reaches them runs generations without a key "
            "or a limit (control messages still need the control secret)",
            flush=True,
        )
    secret = new_secret()
    secret_path = write_secret(secret_file(args.grpc_port), secret)
    server = TritonServer(
        args.repo,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        args.triton_host,
        args.log_file,
        exit_timeout_s=int(args.drain_grace_s) + 30,
        control_secret=secret,
    )
    gateway, exit_s = None, None
    signals = threading.Semaphore(0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: signals.release())
    print(f"starting tritonserver on {args.repo} ...", flush=True)
    server.start()
    try:
        if not args.no_gateway:
            gateway = GatewayProcess(
                server.grpc_url,
                args.gateway_rest_port,
                args.gateway_grpc_port,
                args.host,
                extra_args=gateway_arguments(args),
                control_secret=secret,
            ).start()
        public = f"gateway REST http://{args.host}:{gateway.rest_port}  gRPC {gateway.grpc_url}  |  " if gateway else ""
        print(
            f"ready  {public}Triton gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}",
            flush=True,
        )
        print('try:   ldm generate "a red circle" -o out.png' + ("" if gateway else " --protocol kserve"), flush=True)
        stubs = server.stub_pids()
        while not signals.acquire(timeout=1.0):
            for name, process in (
                ("tritonserver", server.process),
                ("gateway", gateway.process if gateway is not None else None),
            ):
                if process is not None and process.poll() is not None:
                    print(f"{name} exited with code {process.returncode}", flush=True)
                    return 1
            if stubs and not set(stubs) <= set(server.stub_pids()):
                print(
                    f"the pipeline's python stub (pid {stubs}) died and Triton does not restart it: "
                    "stopping, for the supervisor to restart this replica",
                    flush=True,
                )
                return 1
        exit_s = drain(server, gateway, args.drain_grace_s, signals)
    finally:
        if gateway is not None:
            print("stopping the gateway ...", flush=True)
            gateway.stop()
        print("stopping tritonserver ...", flush=True)
        server.stop(exit_s)
        secret_path.unlink(missing_ok=True)
        print("stopped", flush=True)
    return 0


def checkpoints(values: list) -> tuple:
    """(name of the default model or None, its folder or None, {name: folder} of the others) from
    the --checkpoint values, `[NAME=]DIR` each; ValueError naming a bad name or a name given twice.
    A value that is an existing folder is a DIR even with `=` in it."""
    named = []
    for text in values:
        name, path = None, text
        if "=" in text and not Path(text).is_dir():
            name, path = text.split("=", 1)
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"{text!r}: NAME must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
                )
        named.append((name, Path(path)))
    if not named:
        return None, None, {}
    seen = {}
    for i, (name, path) in enumerate(named):
        model = name or default_name(path)
        if i and not MODEL_NAME.fullmatch(model):  # the default model's name prefixes nothing
            raise ValueError(
                f"{str(path)!r}: the folder's name {model!r} cannot name a model (1-64 letters, digits, '.', "
                "'_' or '-'): give one, --checkpoint NAME=DIR"
            )
        if model in seen:
            raise ValueError(
                f"two models named {model!r} ({seen[model]} and {path}): name them apart, --checkpoint NAME=DIR"
            )
        seen[model] = path
    (name, first), rest = named[0], named[1:]
    return name, first, {n or default_name(p): p for n, p in rest}


def default_name(path) -> str:
    """A model's name when --checkpoint gives none: its folder's (as `ldm export` names it)."""
    return Path(path).resolve().name


def recorded_models(repo) -> dict:
    """{name: checkpoint folder} of the models the repository's export serves, the default first
    ({} without an export)."""
    info = Path(repo) / "pipeline" / "1" / "pipeline.json"
    if not info.is_file():
        return {}
    facts = json.loads(info.read_text())
    models = facts.get("models") or {facts.get("default_model", default_name(facts["checkpoint"])): facts}
    return {name: Path(model["checkpoint"]) for name, model in models.items()}


def describe_models(repo) -> str:
    info = json.loads((Path(repo) / "pipeline" / "1" / "pipeline.json").read_text())
    default = info.get("default_model")
    return ", ".join(
        f"{name} ({model.get('family', 'sd')}{', default' if name == default else ''}) = {model['checkpoint']}"
        for name, model in info["models"].items()
    )


def scheduler_configs(repo) -> dict:
    """{model name: its scheduler config} of the exported models (the primary variant's)."""
    info_path = Path(repo) / "pipeline" / "1" / "pipeline.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    configs = {}
    for name, model in (info.get("models") or {}).items():
        config = model.get("variants", {}).get(model.get("primary"), {}).get("scheduler_config")
        if isinstance(config, dict):
            configs[name] = config
    if not configs:  # an export of one model, before the models table
        config_file = Path(repo) / "pipeline" / "1" / "scheduler_config.json"
        if config_file.is_file():
            configs[""] = json.loads(config_file.read_text())
    return configs


def set_default_sampler(repo, sampler: str | None) -> None:
    """Writes `sampler` as the pipeline's config parameter default_sampler (None: removes it, so
    each checkpoint's scheduler picks); ValueError, before anything starts, when the name is
    unknown or the sampler does not fit an exported checkpoint (the pipeline would not load)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from serving.core.samplers.registry import resolve_name, served_default

    if sampler is not None:
        configs = scheduler_configs(repo)
        for name, scheduler_config in configs.items():
            try:
                served_default(sampler, scheduler_config)
            except ValueError as exc:
                if len(configs) < 2:
                    raise
                raise ValueError(f"{str(exc).removeprefix('sampler: ')} (model {name})") from None
        if not configs:  # nothing to check the fit against: the name alone
            resolve_name(sampler, None)
    path = Path(repo) / "pipeline" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    if sampler is None and "default_sampler" not in config.parameters:
        return
    if sampler is None:
        del config.parameters["default_sampler"]
    else:
        config.parameters["default_sampler"].string_value = sampler
    path.write_text(text_format.MessageToString(config))


def check_lora_options(args) -> None:
    """--lora / --lora-dir: the folder exists, and the UNet runner serves LoRA (inprocess or
    torch, not bls: the default with --gpu and a native backend). ValueError naming the option."""
    from export.cli import default_runners

    lora_dir = getattr(args, "lora_dir", "")
    if not (lora_dir or getattr(args, "lora", False)):
        return
    if lora_dir and not Path(lora_dir).is_dir():
        raise ValueError(f"--lora-dir: no folder {lora_dir}")
    unet = args.unet or default_runners(getattr(args, "gpu", False), getattr(args, "backend", "python"))[0]
    if unet == "bls":
        raise ValueError(
            "--lora-dir/--lora: LoRA adapters are served by the UNet runners in the pipeline's process "
            "(--unet inprocess or torch), not bls"
            + ("" if args.unet else " (the default with --gpu and a native backend): give --unet torch or inprocess")
        )


def set_lora_dir(repo, lora_dir) -> None:
    """Writes `lora_dir` (resolved) as the pipeline's config parameter lora_dir of a repository
    served as it is; ValueError when its export has no LoRA inputs (re-export it with --checkpoint)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    info = json.loads((Path(repo) / "pipeline" / "1" / "pipeline.json").read_text())
    models = info.get("models") or {"": info}
    if not any(m.get("variants", {}).get(m.get("primary"), {}).get("lora_unet") for m in models.values()):
        raise ValueError(f"the export in {repo} has no LoRA inputs: pass --checkpoint DIR to export it again with them")
    path = Path(repo) / "pipeline" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    config.parameters["lora"].string_value = "true"
    config.parameters["lora_dir"].string_value = str(Path(lora_dir).resolve())
    path.write_text(text_format.MessageToString(config))


def drain(server, gateway, grace_s: float, signals: threading.Semaphore) -> float | None:
    """The gateway stops admitting (SIGTERM: it lets its calls in flight finish), the pipeline
    drains; a second signal ends the wait. Returns how long tritonserver may then take to exit
    (None: its own exit timeout, when the drain failed)."""
    from serving.triton.drain import drain as drain_pipeline

    if gateway is not None and gateway.process.poll() is None:
        gateway.process.send_signal(signal.SIGTERM)
    print(f"draining (up to {grace_s:g} s; signal again to stop at once) ...", flush=True)
    done, outcome = threading.Event(), {}

    def drain_then_signal():
        try:
            drain_pipeline(server.grpc_url, grace_s, server.control_secret, log=lambda m: print(m, flush=True))
            outcome["exit_s"] = DRAINED_EXIT_S
        except Exception as exc:  # the stop that follows still ends everything
            print(f"drain failed: {exc}", flush=True)
            outcome["exit_s"] = None
        finally:
            done.set()
            signals.release()

    threading.Thread(target=drain_then_signal, name="ldm-drain", daemon=True).start()
    signals.acquire()
    if not done.is_set():
        print("second signal: stopping without waiting for the drain", flush=True)
        return 0.0
    return outcome["exit_s"]
