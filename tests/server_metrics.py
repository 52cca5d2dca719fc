"""Reading a real tritonserver's metrics from tests, and waiting on them (no fixed sleeps)."""
import re
import time
import urllib.request


def metrics(server) -> dict:
    """The engine's ldm_* metrics (copied to Triton's metrics port every 0.5 s)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ldm_\w+)\{[^}]*\} (\S+)$", text, re.M)}


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False
