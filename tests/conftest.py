"""Shared fixtures: a tiny random checkpoint, its model repositories, the factory every real
tritonserver starts through (tests/support/triton.py) and the session's servers and gateway.
Tests live in layer folders (unit, engine, server, gateway, deploy, browser, slow); their shared
helpers in tests/support."""

import os
from pathlib import Path

# before torch loads OpenMP: idle threads sleep instead of spinning (see serving/triton/server.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from export.cli import pipeline_parameters  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAYERS = ("unit", "engine", "server", "gateway", "deploy", "browser")


def pytest_collection_modifyitems(items):
    """Each test marked with its layer, the folder it is in (pyproject.toml lists them): -m unit."""
    tests = Path(__file__).resolve().parent
    for item in items:
        try:
            layer = item.path.resolve().relative_to(tests).parts[0]
        except ValueError:
            continue
        if layer in LAYERS:
            item.add_marker(layer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny")


@pytest.fixture(scope="session")
def default_repo(tmp_path_factory):
    """The shipped default model (checkpoints/ldm-shapes) exported once for the session."""
    from export.repository import write_repository
    from serving.defaults import TRAINED_CHECKPOINT

    repo = tmp_path_factory.mktemp("default-repo") / "model_repository"
    write_repository(TRAINED_CHECKPOINT, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
    return repo


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_checkpoint):
    from export.repository import write_repository

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    write_repository(tiny_checkpoint, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
    return repo


@pytest.fixture(scope="module")
def models(tiny_repo):
    """The tiny repository's models in this process (ONNX Runtime), for tests/support/fakes.py's
    make_service. A module that needs other models (the torch runner) defines its own `models`."""
    from serving.models.onnx import LocalModels

    return LocalModels(tiny_repo)


@pytest.fixture(scope="session")
def triton_servers(tmp_path_factory):
    """Every real tritonserver of the run starts through this factory (tests/support/triton.py):
    shared ones live for the session, a module's own stop with its fixture; none outlives it."""
    from tests.support.triton import TritonServers

    servers = TritonServers(tmp_path_factory.mktemp("triton-logs"))
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def server(triton_servers, tiny_repo):
    """The session's tritonserver on the tiny checkpoint. Tests that use it leave no state behind
    (no adapters, no drain); one that must, starts its own with triton_servers.running."""
    return triton_servers.shared(tiny_repo, "tritonserver")


@pytest.fixture(scope="session")
def gateway(server, tmp_path_factory):
    """The gateway (its own process) in front of the session's tritonserver."""
    from serving.gateway.process import GatewayProcess

    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    with GatewayProcess(server.grpc_url, log_file=log, control_secret=server.control_secret) as running:
        yield running


# image-conditioned generation: tiny inpainting and x4-upscaler checkpoints, and a repository
# (and server) holding all three UNet variants
@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-inpaint", kind="inpaint")


@pytest.fixture(scope="session")
def tiny_upscale_checkpoint(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-upscale", kind="upscale")


@pytest.fixture(scope="session")
def variant_repo(tmp_path_factory, tiny_checkpoint, tiny_inpaint_checkpoint, tiny_upscale_checkpoint):
    from export.repository import write_repository

    repo = tmp_path_factory.mktemp("variant-repo") / "model_repository"
    write_repository(
        tiny_checkpoint,
        repo,
        pipeline_parameters=pipeline_parameters(),
        log=lambda *a: None,
        variants={"inpaint": tiny_inpaint_checkpoint, "upscale": tiny_upscale_checkpoint},
    )
    return repo


@pytest.fixture(scope="session")
def variant_server(triton_servers, variant_repo):
    return triton_servers.shared(variant_repo, "tritonserver-variants")


@pytest.fixture(scope="session")
def default_server(triton_servers, default_repo):
    """A tritonserver on the shipped default model (the slow evaluations' requests only read)."""
    return triton_servers.shared(default_repo, "tritonserver-default")
