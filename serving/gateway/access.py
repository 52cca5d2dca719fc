"""Who may call the gateway, and how fast.

API keys are optional and stored hashed: a key file (or the LDM_API_KEY_HASHES environment
variable) holds lines `NAME sha256:HEX`, the SHA-256 of each key; the keys themselves never
touch the disk of the server. `ldm gateway --new-key NAME` prints a fresh key and its line. A
line ending in ` admin` (`--new-key NAME --admin`) is an admin key: it also may change what the
server holds (upload and remove LoRA adapters, serving/gateway/loras.py); other keys may not
(PERMISSION_DENIED / 403). Without keys there are no admins to tell apart: anyone who reaches
the gateway may.
Clients send `Authorization: Bearer KEY` (REST; what the OpenAI SDK sends) or gRPC metadata
`authorization: Bearer KEY`. Without keys the gateway is open, which it allows only on a
loopback address unless told `--allow-anonymous`.

Rate limit: a token bucket per key (per client address without keys) refilled at `rate` per
second up to `burst`; a request costs its work in units of the pipeline's default image, a steer
a fraction of one (serving/gateway/costs.py). Empty: RESOURCE_EXHAUSTED / HTTP 429 with the
seconds until enough tokens are back.
"""

from collections import OrderedDict
from dataclasses import dataclass
import hashlib
import ipaddress
import os
from pathlib import Path
import secrets
import threading
import time

from serving.gateway.errors import PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAUTHENTICATED, ApiError

HASH_PREFIX = "sha256:"
ROLES = ("admin",)  # what a key file line may add after the hash
KEYS_ENV = "LDM_API_KEY_HASHES"


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "ldm-" + secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ApiKeys:
    names: dict  # key hash -> key name
    admins: frozenset = frozenset()  # hashes of the admin keys

    @classmethod
    def parse(cls, text: str, source: str) -> "ApiKeys":
        names, admins = {}, set()
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            hex_digest = parts[1].removeprefix(HASH_PREFIX) if len(parts) in (2, 3) else ""
            if (
                len(hex_digest) != 64
                or not parts[1].startswith(HASH_PREFIX)
                or any(c not in "0123456789abcdef" for c in hex_digest)
                or parts[2:] not in ([], *[[role] for role in ROLES])
            ):
                raise ValueError(
                    f"{source}:{number}: expected `NAME sha256:<64 hex digits>`, or with ` admin` after it "
                    "(see ldm gateway --new-key)"
                )
            names[parts[1]] = parts[0]
            if parts[2:] == ["admin"]:
                admins.add(parts[1])
        return cls(names, frozenset(admins))

    @classmethod
    def load(cls, path=None, environ=os.environ) -> "ApiKeys | None":
        """The keys of the file and of LDM_API_KEY_HASHES (lines or `;`-separated), or None."""
        texts = []
        if path:
            texts.append((Path(path).read_text(), str(path)))
        if environ.get(KEYS_ENV):
            texts.append((environ[KEYS_ENV].replace(";", "\n"), KEYS_ENV))
        if not texts:
            return None
        names, admins = {}, set()
        for text, source in texts:
            keys = cls.parse(text, source)
            names.update(keys.names)
            admins |= keys.admins
        if not names:
            raise ValueError(f"no API keys in {', '.join(s for _, s in texts)}")
        return cls(names, frozenset(admins))

    def identify(self, credential: str | None) -> str:
        """The key's name; UNAUTHENTICATED for a missing or unknown key."""
        if not credential:
            raise ApiError(UNAUTHENTICATED, "an API key is required: send `Authorization: Bearer <key>`")
        name = self.names.get(hash_key(credential))
        if name is None:
            raise ApiError(UNAUTHENTICATED, "unknown API key")
        return name

    def is_admin(self, credential: str | None) -> bool:
        if not credential:
            return False
        return hash_key(credential) in self.admins


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, now

    def take(self, cost: float, now: float) -> float:
        """0 when `cost` tokens were taken, else the seconds until they would be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """A token bucket per caller; the least recently seen callers are forgotten past `callers`."""

    def __init__(self, rate: float, burst: float, callers: int = 10_000, clock=time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limit needs rate > 0 and burst >= 1, got {rate}/s burst {burst}")
        self.rate, self.burst, self.callers, self.clock = rate, burst, callers, clock
        self._buckets = OrderedDict()
        self._lock = threading.Lock()

    def charge(self, caller: str, cost: float) -> None:
        cost = min(cost, self.burst)  # a request bigger than the burst waits for a full bucket
        with self._lock:
            now = self.clock()
            bucket = self._buckets.pop(caller, None) or TokenBucket(self.rate, self.burst, now)
            self._buckets[caller] = bucket
            while len(self._buckets) > self.callers:
                self._buckets.popitem(last=False)
            wait = bucket.take(cost, now)
        if wait:
            raise ApiError(
                RESOURCE_EXHAUSTED,
                f"rate limit of {self.rate:g} work units/s (burst {self.burst:g}; a unit: "
                "one image of the pipeline's default steps, size and guidance) "
                f"reached for {caller}; retry in {wait:.1f} s",
                retry_after_s=wait,
            )

    def refund(self, caller: str, cost: float) -> None:
        """Gives back what `charge` took for a request refused before it ran."""
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is not None:
                bucket.tokens = min(self.burst, bucket.tokens + min(cost, self.burst))


class Access:
    """Admission of one request: its key (when keys are configured) and its caller's rate."""

    def __init__(self, keys: ApiKeys | None = None, limiter: RateLimiter | None = None):
        self.keys = keys
        self.limiter = limiter

    def identify(self, credential: str | None, address: str) -> str:
        """The caller's name (the key's, or its address); UNAUTHENTICATED without a valid key."""
        return self.keys.identify(credential) if self.keys is not None else address

    def require_admin(self, credential: str | None, what: str) -> None:
        """PERMISSION_DENIED unless the (already identified) key is an admin key; without keys
        anyone may."""
        if self.keys is not None and not self.keys.is_admin(credential):
            raise ApiError(
                PERMISSION_DENIED,
                f"{what} needs an admin key (a key file line ending in ` admin`: "
                "ldm gateway --new-key NAME --admin); this key may generate and list",
            )

    def charge(self, caller: str, cost: float) -> None:
        if self.limiter is not None:
            self.limiter.charge(caller, cost)

    def refund(self, caller: str, cost: float) -> None:
        if self.limiter is not None:
            self.limiter.refund(caller, cost)
