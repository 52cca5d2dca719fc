"""Which replica runs a live generation, and how a steer or DELETE that reached another one
gets there.

A live generation runs in one pod: its gateway holds the Triton stream and its Triton the job,
and only that Triton's pipeline can steer it. Its id says which pod: `<replica>.<token>`, the
replica name being the gateway's `--replica-name` (in Kubernetes the pod's hostname). A REST
steer or DELETE that the load balancer sent to another replica is forwarded, once, to the
owner, and the owner's answer is passed back. The owner's address never comes from the id
itself (no request forgery): it is either
- the `--peers name=URL,...` table (fixed fleets, the local two-replica test), or
- `http://<replica>.<peer-domain>:<port>`, the pod's DNS name under a headless Service that
  every replica's pod names as its `subdomain` (deploy/k8s), where the replica part must be one
  DNS label, so the URL always points into that Service.
The gRPC Session needs none of this: one call carries the start, the steers and the events.

A live generation dies with its pod's gateway, so a forward that finds the owner gone (its name
resolves to nothing: a deleted pod; nothing listens at its address) answers 404 like any
unknown id, not 503: retrying would never reach it (`owner_gone`).
"""

from dataclasses import dataclass, field
import re
import socket

from serving.gateway.errors import NOT_FOUND, ApiError

FORWARDED_HEADER = "X-Ldm-Forwarded-By"  # set on a forwarded call: it is never forwarded again
LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def default_name() -> str:
    """This host's name as one DNS label (a pod's hostname is its name)."""
    return socket.gethostname().split(".")[0].lower() or "local"


def parse_peers(text: str) -> dict:
    """`name=http://host:port,...` -> {name: url}; ValueError naming the bad entry."""
    peers = {}
    for entry in filter(None, (e.strip() for e in (text or "").split(","))):
        name, _, url = entry.partition("=")
        if not LABEL.match(name) or not url.startswith(("http://", "https://")):
            raise ValueError(f"--peers entry {entry!r} is not NAME=http://HOST:PORT (NAME one lowercase DNS label)")
        peers[name] = url.rstrip("/")
    return peers


@dataclass(frozen=True)
class Replicas:
    name: str  # this replica
    peers: dict = field(default_factory=dict)  # other replicas' REST URLs by name
    peer_domain: str | None = None  # `<name>.<peer_domain>` resolves to that replica's pod
    peer_port: int = 8080  # the gateways' REST port, with peer_domain

    def __post_init__(self):
        if not LABEL.match(self.name):
            raise ValueError(f"replica name {self.name!r} must be one lowercase DNS label (a-z, 0-9, -)")

    @staticmethod
    def owner_of(generation_id: str) -> str:
        return generation_id.split(".", 1)[0]

    def is_mine(self, generation_id: str) -> bool:
        return self.owner_of(generation_id) == self.name

    def url_of(self, generation_id: str) -> str:
        """The REST URL of the replica that owns the id; NOT_FOUND when no replica has that name."""
        owner = self.owner_of(generation_id)
        if owner in self.peers:
            return self.peers[owner]
        if self.peer_domain and LABEL.match(owner) and owner != self.name:
            return f"http://{owner}.{self.peer_domain}:{self.peer_port}"
        raise ApiError(NOT_FOUND, f"no generation with id {generation_id}")


def owner_gone(exc: Exception) -> bool:
    """Whether a failed connection to an owner says it no longer exists: its name does not
    resolve (the resolver's answer, not a passing lookup failure) or its address refuses the
    connection. Timeouts and the rest may pass: the caller answers them UNAVAILABLE."""
    cause = getattr(exc, "os_error", None)
    if isinstance(cause, ConnectionRefusedError):
        return True
    return isinstance(cause, socket.gaierror) and cause.errno in (
        socket.EAI_NONAME,
        getattr(socket, "EAI_NODATA", None),
    )
