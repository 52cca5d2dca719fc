"""`ldm bench --loras` (serving/bench/loras.py) on a small load: its report is its definitions."""

import json

from serving.cli import main


def test_bench_loras_reports_its_definitions(tmp_path):
    assert (
        main(
            [
                "bench",
                "--loras",
                "--out",
                str(tmp_path),
                "--requests",
                "6",
                "--concurrency",
                "3",
                "--lora-adapters",
                "2",
                "--lora-rank",
                "4",
                "--steps",
                "3",
                "--lora-rounds",
                "1",
                "--lora-sweep-ranks",
                "4,8",
                "--lora-sweep-counts",
                "1,2",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "loras.json").read_text())
    assert (report["requests"], report["concurrency"], report["adapters"], report["rank"]) == (6, 3, 2, 4)
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == ["lora0.safetensors", "lora1.safetensors"]
    for mode in ("plain", "mixed", "per_set"):
        assert report[mode]["images_per_s"] > 0 and report[mode]["rows_per_call"] >= 1
    assert report["mixed_vs_plain"] == round(report["mixed"]["images_per_s"] / report["plain"]["images_per_s"], 3)
    assert report["mixed_vs_per_set"] == round(report["mixed"]["images_per_s"] / report["per_set"]["images_per_s"], 3)
    # Three clients hold three adapter sets (none, lora0, lora1) at once: one call carries all
    # their rows when mixed, only one set's rows per call otherwise.
    assert report["mixed"]["rows_per_call"] > report["per_set"]["rows_per_call"]
    sweep = [(o["rank"], o["adapters"], o["columns"]) for o in report["overhead"]]
    assert sweep == [(4, 1, 4), (4, 2, 8), (8, 1, 8), (8, 2, 16)]
    for o in report["overhead"]:
        # overhead is computed from the seconds before they are rounded to 5 digits for the report
        assert abs(o["overhead"] - (o["lora_s"] / o["plain_s"] - 1)) <= 0.002
