"""The prompt-adherence evaluation, independent of where images come from.

A generator is any `generate(prompts, seeds, guidance_scale, steps) -> uint8 [N, 64, 64, 3]`:
the checkpoint in process (`checkpoint_generator`) or the running service (`service_generator`).
"""

from dataclasses import dataclass
from math import comb

import numpy as np

from training.autoencoder import held_out_images, psnr, reconstruct
from training.data import eval_scenes, render
from training.evaluate import score

EVALUATOR_MIN_ACCURACY = 0.98
TARGETS = {"seen": 0.90, "held-out": 0.75}  # whole-prompt accuracy at guidance 5
# "Guidance 5 clearly beats guidance 1": on both sets more prompts pass at g=5, and the difference
# is significant in an exact two-sided McNemar test over the paired prompts (same prompt, same
# seed) at this level. (Until 2026-11-27 we asked for a 10-point gap; a model that passes 90% at
# g=1 can never show one, however much guidance helps it.)
GUIDANCE_SIGNIFICANCE = 0.05
PSNR_TARGET = 30.0
GROUND_TRUTH_SCENES = 500  # per set


def load_eval_prompts(count: int):
    """The fixed, seeded prompt sets: {"seen": [Scene], "held-out": [Scene]}; captions are the prompts."""
    return {"seen": eval_scenes(count, held_out=False), "held-out": eval_scenes(count, held_out=True)}


def evaluator_accuracy() -> float:
    """Whole-prompt accuracy of the evaluator on ground-truth renders of both sets' grammar."""
    scenes = [s for group in load_eval_prompts(GROUND_TRUTH_SCENES).values() for s in group]
    return score(scenes, [render(s) for s in scenes])["prompt_accuracy"]


def checkpoint_generator(pipe):
    from training.generate import pipeline_images

    def generate(prompts, seeds, guidance_scale, steps):
        return pipeline_images(pipe, prompts, seeds, guidance_scale, steps)

    return generate


def service_generator(url: str, protocol: str):
    from serving.client.kserve import LdmClient  # lands with the serving side; only this path needs it

    client = LdmClient(url, protocol=protocol)

    def generate(prompts, seeds, guidance_scale, steps):
        return np.stack(
            [
                client.generate(p, seed=int(s), steps=steps, guidance_scale=guidance_scale, height=64, width=64)
                for p, s in zip(prompts, seeds)
            ]
        )

    return generate


def adherence(generate, count: int, guidances=(1.0, 5.0), steps: int = 25):
    """{(set name, guidance): score dict}; image i of a set uses seed i at every guidance."""
    results = {}
    for name, scenes in load_eval_prompts(count).items():
        prompts = [s.caption for s in scenes]
        for g in guidances:
            results[(name, g)] = score(scenes, generate(prompts, range(len(prompts)), g, steps))
    return results


def vae_psnr(vae, count: int = 256) -> float:
    images = held_out_images(count)
    return psnr(images, reconstruct(vae, images))


@dataclass
class Target:
    name: str
    measured: str
    passed: bool


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b and c discordant pairs (a binomial test at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def targets(results, vae_psnr_db=None):
    out = []
    for name, want in TARGETS.items():
        got = results[(name, 5.0)]["prompt_accuracy"]
        out.append(Target(f"whole-prompt accuracy, {name}, g=5 >= {want:.0%}", f"{got:.1%}", got >= want))
    measured, passed = [], True
    for name in TARGETS:
        g5, g1 = results[(name, 5.0)], results[(name, 1.0)]
        only_g5 = sum(a and not b for a, b in zip(g5["passed"], g1["passed"]))
        only_g1 = sum(b and not a for a, b in zip(g5["passed"], g1["passed"]))
        p = mcnemar_p(only_g5, only_g1)
        measured.append(
            f"{name} {g5['prompt_accuracy'] - g1['prompt_accuracy']:+.1%} "
            f"({only_g5} prompts pass only at g=5, {only_g1} only at g=1; p={p:.2g})"
        )
        passed = passed and only_g5 > only_g1 and p < GUIDANCE_SIGNIFICANCE
    out.append(
        Target(
            f"g=5 beats g=1 on both sets (paired McNemar, p < {GUIDANCE_SIGNIFICANCE:g})", "; ".join(measured), passed
        )
    )
    if vae_psnr_db is not None:
        out.append(
            Target(
                f"VAE PSNR on held-out images >= {PSNR_TARGET:.0f} dB",
                f"{vae_psnr_db:.2f} dB",
                vae_psnr_db >= PSNR_TARGET,
            )
        )
    return out
