"""The commands a user types: `ldm serve` in its own process, `ldm generate`, and Ctrl-C/SIGTERM."""

import signal
import subprocess
import sys
import time

import numpy as np
import psutil
from PIL import Image

from serving.triton.server import free_ports

LDM = [sys.executable, "-m", "serving.cli"]


def test_serve_generate_and_clean_shutdown(tiny_checkpoint, tmp_path):
    """`ldm serve` starts tritonserver and the gateway; `ldm generate` gets the same image through
    the gateway (default), Triton's gRPC and Triton's HTTP; -n writes n files; SIGTERM stops all.
    `ldm serve --sampler` sets the default sampler; `ldm generate --sampler --guidance-interval`
    picks one per request."""
    ports = free_ports(5)  # distinct by construction (all bound at once, none handed out before)
    repo = tmp_path / "repo"
    serve = subprocess.Popen(
        LDM
        + [
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--repo",
            str(repo),
            "--http-port",
            str(ports[0]),
            "--grpc-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
            "--gateway-rest-port",
            str(ports[3]),
            "--gateway-grpc-port",
            str(ports[4]),
            "--log-file",
            str(tmp_path / "triton.log"),
            "--sampler",
            "Euler a",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            assert line, "ldm serve exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("ready"):
                break
        ready = lines[-1]
        assert f"REST http://127.0.0.1:{ports[3]}" in ready and f"gRPC 127.0.0.1:{ports[4]}" in ready, ready
        assert f"Triton gRPC 127.0.0.1:{ports[1]}" in ready and f"metrics http://127.0.0.1:{ports[2]}" in ready, ready
        children = psutil.Process(serve.pid).children(recursive=True)
        assert any("tritonserver" in c.name() for c in children)
        assert any("gateway" in " ".join(c.cmdline()) for c in children)

        urls = {"gateway": ports[4], "kserve": ports[1], "kserve-http": ports[0]}
        for protocol, port in urls.items():
            out = tmp_path / f"{protocol}.png"
            done = subprocess.run(
                LDM
                + [
                    "generate",
                    "a red circle",
                    "-o",
                    str(out),
                    "--seed",
                    "5",
                    "--steps",
                    "4",
                    "--protocol",
                    protocol,
                    "--url",
                    f"127.0.0.1:{port}",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert f"wrote {out} (32x32, seed 5)" in done.stdout and " ms via " in done.stdout
            assert np.asarray(Image.open(out)).shape == (32, 32, 3)
        pixels = {p: np.asarray(Image.open(tmp_path / f"{p}.png")) for p in urls}
        assert all(np.array_equal(pixels["gateway"], other) for other in pixels.values())

        picked = {}
        for name, extra in (
            ("explicit", ["--sampler", "euler_ancestral"]),
            ("dpm-gateway", ["--sampler", "DPM++ 2M Karras", "--guidance-interval", "0.2", "0.8"]),
            (
                "dpm-kserve",
                [
                    "--sampler",
                    "dpmpp_2m",
                    "--sigma-schedule",
                    "karras",
                    "--guidance-interval",
                    "0.2",
                    "0.8",
                    "--protocol",
                    "kserve",
                    "--url",
                    f"127.0.0.1:{ports[1]}",
                ],
            ),
        ):
            out = tmp_path / f"{name}.png"
            url = [] if "--url" in extra else ["--url", f"127.0.0.1:{ports[4]}"]
            done = subprocess.run(
                LDM + ["generate", "a red circle", "-o", str(out), "--seed", "5", "--steps", "4", *extra, *url],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            picked[name] = np.asarray(Image.open(out))
        assert np.array_equal(picked["explicit"], pixels["gateway"])  # the served default is `ldm serve --sampler`'s
        assert np.array_equal(picked["dpm-gateway"], picked["dpm-kserve"])
        assert not np.array_equal(picked["dpm-gateway"], pixels["gateway"])
        unknown = subprocess.run(
            LDM + ["generate", "x", "--sampler", "DPM++ 3M", "--url", f"127.0.0.1:{ports[4]}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert unknown.returncode == 2 and "INVALID_ARGUMENT" in unknown.stderr and "sampler" in unknown.stderr

        many = subprocess.run(
            LDM
            + [
                "generate",
                "a red circle",
                "-n",
                "3",
                "-o",
                str(tmp_path / "many.webp"),
                "--seed",
                "8",
                "--steps",
                "3",
                "--url",
                f"127.0.0.1:{ports[4]}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert many.returncode == 0, many.stderr
        assert [Image.open(tmp_path / f"many-{i}.webp").format for i in range(3)] == ["WEBP"] * 3
        assert "seed 10" in many.stdout and "step" in many.stderr  # the progress bar

        bad = subprocess.run(
            LDM + ["generate", "x", "--steps", "0", "--url", f"127.0.0.1:{ports[4]}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "steps" in bad.stderr

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
        time.sleep(0.5)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if serve.poll() is None:
            serve.kill()


def test_serve_refuses_a_sampler_that_does_not_fit_before_starting(tiny_repo, tmp_path):
    """`ldm serve --sampler` is checked against the exported checkpoint before tritonserver starts:
    an unknown name, or flow matching on the tiny (not flow-matching) checkpoint, exits 2."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)  # someone else's model: served as it is, not re-exported
    before = (repo / "pipeline" / "config.pbtxt").read_text()
    ports = [str(port) for port in free_ports(5)]
    for sampler, why in (("flow_match_euler", "does not fit"), ("DPM++ 3M", "unknown sampler")):
        refused = subprocess.run(
            LDM
            + [
                "serve",
                "--repo",
                str(repo),
                "--sampler",
                sampler,
                "--http-port",
                ports[0],
                "--grpc-port",
                ports[1],
                "--metrics-port",
                ports[2],
                "--gateway-rest-port",
                ports[3],
                "--gateway-grpc-port",
                ports[4],
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and why in refused.stderr and "starting tritonserver" not in refused.stdout, (
            refused
        )
    assert (repo / "pipeline" / "config.pbtxt").read_text() == before


def test_serve_refreshes_a_stale_export_of_the_default_model(tiny_checkpoint, tmp_path, monkeypatch):
    """Without --checkpoint, a repository exported from the default model (or the tiny fallback)
    is re-exported from the default model, so a retrained checkpoint is what gets served; one a
    user exported from another model is served as it is."""
    import shutil

    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving import defaults

    repo = tmp_path / "repo"
    write_repository(tiny_checkpoint, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
    assert defaults.checkpoint_to_export(None, repo) is None  # someone else's model: kept
    assert defaults.checkpoint_to_export(str(tiny_checkpoint), repo) == tiny_checkpoint
    fallback = tmp_path / "cache" / "tiny-random"
    shutil.copytree(tiny_checkpoint, fallback)
    write_repository(fallback, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    assert defaults.checkpoint_to_export(None, repo) == defaults.default_checkpoint()
    assert defaults.checkpoint_to_export(None, tmp_path / "empty") == defaults.default_checkpoint()


def test_ldm_serve_forwards_every_gateway_option():
    """`ldm serve` takes the gateway's options (add_gateway_options) and hands each to it."""
    import argparse

    from serving.triton.serve import add_arguments, gateway_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--max-request-pixels",
            "1234",
            "--allowed-hosts",
            "a.example,b.example",
            "--allowed-origins",
            "https://c.example",
            "--max-key-share",
            "0.25",
        ]
    )
    forwarded = gateway_arguments(args)
    pairs = dict(zip(forwarded[::2], forwarded[1::2]))
    assert pairs["--max-request-pixels"] == "1234" and pairs["--max-key-share"] == "0.25"
    assert pairs["--allowed-hosts"] == "a.example,b.example" and pairs["--allowed-origins"] == "https://c.example"
