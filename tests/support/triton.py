"""The one way the tests start real tritonservers (the `triton_servers` fixture of tests/conftest.py,
one per session).

- `shared(repo, name)`: one server per name, started on first use and stopped at the session's end,
  for tests that leave no state behind in it (the session's `server`, `variant_server`,
  `default_server`).
- `running(repo, name, env=...)`: a context manager whose server is stopped when its block ends
  (usually at the end of a module fixture, sometimes of one test): for a server of a module's own,
  because the module configures it (admission bounds, BLS, injected faults), or leaves state in it
  that must not reach other tests (uploaded LoRAs, a drained engine, a killed stub).

Not started here, on purpose: tests of `ldm serve` itself (tests/server/test_cli.py, test_drain.py,
tests/gateway/test_models_serving.py, the replicas of tests/lb/replicas.py) run it as a user does,
in its own process, which starts its own tritonserver; tests/server/test_gpu_bench.py and
tests/slow/test_bench.py run bench programs that start theirs (what they measure includes it);
tests/page_screenshots.py is a script, outside pytest.

Every server is stopped by the PID of its process group (TritonServer.stop: SIGTERM, then SIGKILL
after its exit timeout), and at the session's end the factory kills any group still alive, so no
tritonserver or python stub outlives the run. Ports come from serving.triton.server.free_ports
(process-wide: no two servers here get the same port)."""

from contextlib import contextmanager
import os
from pathlib import Path
import signal

from serving.triton.server import TritonServer


class TritonServers:
    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self._shared: dict[str, TritonServer] = {}
        self._started: list[TritonServer] = []  # every server started, stopped or not

    def _log_file(self, name: str) -> Path:
        path, n = self.logs / f"{name}.log", 1
        while path.exists():
            n += 1
            path = self.logs / f"{name}-{n}.log"
        return path

    def start(self, repo, name: str, env: dict | None = None, **options) -> TritonServer:
        """Starts tritonserver on `repo` (log: <logs>/<name>.log); `env` is added to its
        environment (the server copies this process's when it starts)."""
        saved = {key: os.environ.get(key) for key in env or {}}
        os.environ.update(env or {})
        try:
            server = TritonServer(repo, log_file=self._log_file(name), **options)
            self._started.append(server)
            return server.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def stop(self, server: TritonServer) -> None:
        server.stop()
        _kill_group(server)

    @contextmanager
    def running(self, repo, name: str, env: dict | None = None, **options):
        server = self.start(repo, name, env=env, **options)
        try:
            yield server
        finally:
            self.stop(server)

    def shared(self, repo, name: str) -> TritonServer:
        """The session's server called `name` (on `repo`), started on first use."""
        server = self._shared.get(name)
        if server is None:
            server = self._shared[name] = self.start(repo, name)
        assert server.repo == Path(repo), f"shared server {name!r} runs {server.repo}, not {repo}"
        return server

    def stop_all(self) -> None:
        for server in self._started:
            if server.process is not None and server.process.poll() is None:
                server.stop()
            _kill_group(server)
        self._shared.clear()


def _kill_group(server: TritonServer) -> None:
    """Whatever is left of the server's process group (python stubs whose server died before it
    was stopped), by the group's ID, the server's PID. Only once the server is reaped and its PID
    is free: a group whose members live keeps its ID from being reused, so a free PID with
    members left is still this server's group."""
    process = server.process
    if process is None or process.poll() is None or os.path.exists(f"/proc/{process.pid}"):
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
