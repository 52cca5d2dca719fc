"""Screenshots of the gateway's page for docs/page.md: idle, mid-generation with its live
preview, and a generation steered mid-run (beside the same seed unsteered in the gallery).
Exports the shipped default model, starts tritonserver and the gateway on free ports, drives the
page in headless Chromium (tests/support/page_browser.py), stops both.

    .venv/bin/python tests/page_screenshots.py [--out docs/results/screenshots] [--checkpoint checkpoints/ldm-shapes]
"""

import argparse
from pathlib import Path
import sys
import tempfile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from tests.support.page_browser import chromium, missing, open_page, start, wait_for_step  # noqa: E402

PROMPT = "a large red circle on the left of a black background"
STEERED = "a small blue square at the top right"
SEED, STEPS = 7, 150


def shoot(url: str, out: Path) -> None:
    with chromium() as browser:
        page = open_page(browser, url, viewport=(1200, 860))
        page.screenshot(path=str(out / "idle.png"))

        start(page, PROMPT, seed=SEED, steps=STEPS, guidance=7.5, size="64x64")
        wait_for_step(page, 20)
        page.screenshot(path=str(out / "generating.png"))
        page.locator("#gallery .card").first.wait_for()

        start(page, PROMPT, seed=SEED, steps=STEPS, guidance=7.5, size="64x64")
        wait_for_step(page, 3)
        page.fill("#prompt", STEERED)
        page.locator("#gallery .card:nth-child(2)").wait_for()
        page.locator("#steers li[data-state=applied]").first.wait_for()
        page.screenshot(path=str(out / "steered.png"), full_page=True)
        page.context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "screenshots")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "ldm-shapes")
    args = parser.parse_args()
    if missing():
        sys.exit(missing())
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.gateway.process import GatewayProcess
    from serving.triton.server import TritonServer

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        repo = Path(work) / "model_repository"
        write_repository(args.checkpoint, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
        # a script, not a test (no pytest fixtures here): it starts its own server, not through
        # tests/support/triton.py
        with (
            TritonServer(repo, log_file=Path(work) / "tritonserver.log") as server,
            GatewayProcess(
                server.grpc_url, log_file=Path(work) / "gateway.log", control_secret=server.control_secret
            ) as gateway,
        ):
            shoot(gateway.rest_url + "/", args.out)
    for name in ("idle", "generating", "steered"):
        print(args.out / f"{name}.png")


if __name__ == "__main__":
    main()
