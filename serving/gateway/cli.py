"""`ldm gateway --triton HOST:PORT`: the public API (gRPC ldm.v1.Images + REST /v1/images/*) in
front of a running Triton. `ldm serve` starts one beside its tritonserver by default. The
pipeline's control secret (for steers) comes from the environment: LDM_CONTROL_SECRET or the file
LDM_CONTROL_SECRET_FILE names (serving/triton/control.py)."""

import asyncio
import os
import sys

DEFAULT_REST_PORT, DEFAULT_GRPC_PORT = 8080, 50051


def add_gateway_options(parser, prefix: str = "") -> None:
    """Options shared with `ldm serve` (which names the ports --gateway-*-port)."""
    parser.add_argument(
        f"--{prefix}rest-port",
        type=int,
        default=DEFAULT_REST_PORT,
        help="REST port (OpenAI Images API, /docs, /metrics; default: %(default)s)",
    )
    parser.add_argument(
        f"--{prefix}grpc-port",
        type=int,
        default=DEFAULT_GRPC_PORT,
        help="gRPC port (ldm.v1.Images, health, reflection; default: %(default)s)",
    )
    parser.add_argument(
        "--api-keys",
        help="file of `NAME sha256:HEX [admin]` lines (also: env LDM_API_KEY_HASHES); "
        "without keys the gateway is open, which needs a loopback address or --allow-anonymous",
    )
    parser.add_argument(
        "--allow-anonymous", action="store_true", help="serve without API keys on a non-loopback address"
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        help="work units per second per key (per address without keys); 0: none (default)",
    )
    parser.add_argument(
        "--burst", type=float, default=16.0, help="token-bucket size of the rate limit (default: %(default)s)"
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=16.0, help="largest request body (default: %(default)s MiB)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="largest uploaded image, width x height (default: %(default)s)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=2 * 4096 * 4096,
        help="all uploaded images of one request or steer together, width x height, read from their "
        "headers before any is decoded (default: %(default)s)",
    )
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated Host names the REST front answers besides "
        "localhost, IP addresses and --host (the defence against DNS rebinding; checked by default only "
        "without API keys); `*`: any",
    )
    parser.add_argument(
        "--allowed-origins",
        default="",
        help="comma-separated web origins (https://host[:port]) whose "
        "pages may call the REST front; by default only its own pages (docs/security.md)",
    )
    parser.add_argument(
        "--admission-wait-s",
        type=float,
        default=2.0,
        help="a request that finds the pipeline full waits this long for room, then gets 503/"
        "UNAVAILABLE with Retry-After (default: %(default)s)",
    )
    parser.add_argument(
        "--max-key-share",
        type=float,
        default=0.5,
        help="the share of the pipeline's running and queue slots one key (one address without keys) "
        "may hold, so no key takes the queue (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="on SIGTERM, how long running calls may finish while new ones are refused (default: %(default)s)",
    )


def add_arguments(parser):
    parser.add_argument("--triton", default="127.0.0.1:8001", help="Triton's gRPC address (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add_gateway_options(parser)
    parser.add_argument(
        "--replica-name",
        default=os.environ.get("LDM_REPLICA_NAME"),
        help="this replica's name, the prefix of its generation ids (env LDM_REPLICA_NAME; default: "
        "the hostname, a pod's name)",
    )
    parser.add_argument(
        "--peers",
        default=os.environ.get("LDM_PEERS", ""),
        help="the other replicas: NAME=http://HOST:REST_PORT,... (env LDM_PEERS): a steer or DELETE "
        "of their generations is forwarded there",
    )
    parser.add_argument(
        "--peer-domain",
        default=os.environ.get("LDM_PEER_DOMAIN"),
        help="or: the other replicas are http://NAME.DOMAIN:REST_PORT (env LDM_PEER_DOMAIN; "
        "Kubernetes: the headless Service the pods name as their subdomain)",
    )
    parser.add_argument(
        "--new-key", metavar="NAME", help="print a new API key and its line for the key file, then exit"
    )
    parser.add_argument(
        "--admin",
        action="store_true",
        help="with --new-key: an admin key, which may also upload and remove LoRA adapters (its line ends in ` admin`)",
    )


def config_from_args(args, triton: str, host: str, rest_port: int, grpc_port: int):
    from serving.gateway.access import ApiKeys
    from serving.gateway.app import GatewayConfig
    from serving.gateway.service import Limits

    from serving.gateway.replicas import default_name, parse_peers
    from serving.triton.control import secret_from_env

    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
    )
    return GatewayConfig(
        triton=triton,
        host=host,
        rest_port=rest_port,
        grpc_port=grpc_port,
        keys=ApiKeys.load(args.api_keys),
        allow_anonymous=args.allow_anonymous,
        rate=args.rate_limit,
        burst=args.burst,
        limits=limits,
        drain_s=args.drain_s,
        replica_name=args.replica_name or default_name(),
        peers=parse_peers(args.peers),
        peer_domain=args.peer_domain,
        allowed_hosts=_names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins),
        control_secret=secret_from_env(),
        admission_wait_s=args.admission_wait_s,
        max_key_share=args.max_key_share,
    )


def _names(text: str) -> tuple:
    return tuple(filter(None, (name.strip() for name in text.split(","))))


def run(args) -> int:
    if args.new_key:
        from serving.gateway.access import hash_key, new_key

        key = new_key()
        print(f"key (give it to the client; it is not stored): {key}")
        print(f"line for the key file:  {args.new_key} {hash_key(key)}{' admin' if args.admin else ''}")
        return 0
    from serving.gateway.app import serve
    from serving.gateway.telemetry import configure_logging

    configure_logging()
    try:
        config = config_from_args(args, args.triton, args.host, args.rest_port, args.grpc_port)
        config.check()
    except (ValueError, OSError) as exc:
        print(f"ldm gateway: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config, announce=lambda line: print(line, flush=True)))
    return 0
