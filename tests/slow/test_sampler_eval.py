"""The samplers table's verdict (training/sampler_eval.py): the fastest setting within 2 points of
DDIM-25's held-out adherence, against the 1.6x target; and one setting measured through a real
server (slow)."""

import pytest

from training.sampler_eval import report


def row(sampler, steps, accuracy, speed, interval=(0.0, 1.0)):
    return {
        "sampler": sampler,
        "sigma_schedule": "default",
        "steps": steps,
        "guidance_interval": list(interval),
        "prompt_accuracy": accuracy,
        "images_per_s": speed,
    }


def test_the_verdict_takes_the_fastest_setting_that_keeps_adherence(capsys):
    report(
        [
            row("ddim", 25, 0.80, 5.0),
            row("dpmpp_2m", 10, 0.79, 9.0),
            row("ddim", 5, 0.50, 20.0),
            row("unipc", 10, 0.81, 8.5, interval=(0.0, 0.8)),
        ]
    )
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert "dpmpp_2m 10, 79.0% at 1.80x" in verdict and verdict.endswith("PASS")


def test_a_miss_says_by_how_much(capsys):
    report([row("ddim", 25, 0.80, 5.0), row("euler", 15, 0.70, 9.0), row("ddim", 15, 0.79, 7.0)])
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert "ddim 15, 79.0% at 1.40x" in verdict and verdict.endswith("FAIL")


@pytest.mark.slow
def test_one_setting_through_a_real_server(default_server):
    from training.sampler_eval import measure

    # the shared server: measure counts UNet rows as a delta of settled counters
    server = default_server
    result = measure(
        server.grpc_url, "dpmpp_2m", "karras", 10, (0.0, 0.8), prompts=8, concurrency=4, metrics_url=server.metrics_url
    )
    assert 0.0 <= result["prompt_accuracy"] <= 1.0
    assert result["unet_rows_per_image"] == 10 + 8  # guided for steps 0-7 of 10
    assert result["rows_saved_per_image"] == 2
