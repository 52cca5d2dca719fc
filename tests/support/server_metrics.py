"""Reading a real tritonserver's metrics from tests, and waiting on them (no fixed sleeps)."""

import re
import time
import urllib.request


EXPORT_PERIOD_S = 0.5  # the pipeline copies its stats to the metrics port this often


def metrics(server) -> dict:
    """The engine's ldm_* metrics (copied to Triton's metrics port every 0.5 s)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ldm_\w+)\{[^}]*\} (\S+)$", text, re.M)}


def idle_metrics(server, timeout=30.0) -> dict:
    """The metrics once the server is idle (nothing queued or active) and what it shows is
    current: unchanged across more than one export period. A delta test's `before`: read
    straight after an earlier test, the counters can still lag its last requests by one period."""
    deadline = time.monotonic() + timeout
    last = metrics(server)
    while time.monotonic() < deadline:
        time.sleep(EXPORT_PERIOD_S * 1.2)
        now = metrics(server)
        if now == last and now["ldm_active_requests"] == 0 and now["ldm_queue_length"] == 0:
            return now
        last = now
    raise AssertionError(f"the server did not become idle within {timeout} s: {last}")


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False
