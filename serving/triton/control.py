"""Who may send the pipeline control messages (drain, cancel, steer): holders of the control
secret, that is the gateway and the local operator (docs/security.md). Imports nothing from Triton.

A control message carries the secret in its request parameter CONTROL_PARAMETER; the pipeline
model (and the unary front, for its cancel messages) reads the secret from its environment:
SECRET_ENV, or the file SECRET_FILE_ENV names. Not a config.pbtxt parameter: Triton answers a
model's config to anyone who reaches its port. `ldm serve` makes a new secret per run, gives it
to tritonserver and the gateway through their environment and writes it, readable by this user
only, where `ldm drain` finds it (`secret_file`); in Kubernetes an init container writes it to
a memory volume both containers mount. A pipeline without a secret refuses every control
message: nothing reaches it but generations.

A status message (STATUS_PARAMETER) only reads the engine's state (accepting, active, queued):
it needs no secret, so readiness probes can ask it."""

import hmac
import os
from pathlib import Path
import secrets

CONTROL_PARAMETER = "control_secret"
STATUS_PARAMETER = "engine_status"
SECRET_ENV = "LDM_CONTROL_SECRET"
SECRET_FILE_ENV = "LDM_CONTROL_SECRET_FILE"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_from_env(environ=os.environ) -> str | None:
    """The secret this process was given (SECRET_ENV, else the file SECRET_FILE_ENV names), or None."""
    if environ.get(SECRET_ENV):
        return environ[SECRET_ENV]
    path = environ.get(SECRET_FILE_ENV)
    return Path(path).read_text().strip() or None if path else None


def secret_file(grpc_port: int) -> Path:
    """Where `ldm serve` leaves the secret of the server on `grpc_port` for `ldm drain`: this
    user's runtime folder, else their home's cache (not LDM_CACHE: the image builds that read-only)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path.home() / ".cache"
    return base / "ldm-serving" / "control" / f"grpc-{grpc_port}.secret"


def write_secret(path: Path, secret: str) -> Path:
    """Writes the secret readable by this user only (the folder too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(secret + "\n")
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
    return path


def authorised(parameters: dict, secret: str | None) -> bool:
    """Whether a request's parameters carry the secret (compared in constant time)."""
    given = parameters.get(CONTROL_PARAMETER)
    return secret is not None and isinstance(given, str) and hmac.compare_digest(given.encode(), secret.encode())


def add_arguments(parser):
    parser.add_argument("path", help="file to write a new control secret to (readable by this user only)")


def run(args) -> int:
    """`ldm control-secret PATH` (a Kubernetes init container: the pod's secret for this run)."""
    write_secret(Path(args.path), new_secret())
    return 0
