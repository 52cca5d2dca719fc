"""Golden bytes of SD 1.x/2.x requests: every request kind the engine serves for the UNet
families of Stable Diffusion 1.x/2.x (txt2img with each sampler, img2img, both ways of
inpainting, upscaling, regions, prompt schedules and live steers) is run in this process (ONNX
Runtime, no Triton) and the sha256 of its image's bytes is compared with the one recorded in
tests/data/sd_golden_bytes.json.

Why: a refactor of the engine (the family layer) must leave these images exactly as they were.
The other engine tests compare images with each other (alone against in a crowd, steered against
a reference); this one pins the bytes themselves, so a change that moves every image the same way
shows up here.

The hashes hold for one machine's arithmetic: ONNX Runtime's CPU kernels pick their code by the
CPU's instruction set, so another CPU (or another onnxruntime) may give other last bits. The
JSON says what recorded it. Re-record (only when a change of the images is intended, or on
another machine before a refactor starts):

    LDM_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/engine/test_sd_golden_bytes.py

which rewrites each case's hash from the images of the code as it is (cases dropped from the table:
delete the JSON first), then checks the crowds against it.
"""

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.support.image_inputs import Sink, half_mask, one_object_scene, photo, service
from serving.client.kserve import request_arrays

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "sd_golden_bytes.json"
RECORD = os.environ.get("LDM_RECORD_GOLDEN") == "1"

PROMPT = "a large red circle on the left"
IMAGE, LOW_RES = photo(32, 1), photo(8, 2)  # tiny checkpoints: 32x32 images, 8x8 latents
SCENE, CAPTION = one_object_scene()  # the trained default model's world, 64x64
REGIONS = dict(region_prompts=["a small red circle", "a blue square"], region_divisions="1,1", base_prompt_weight=0.3)
G5 = dict(guidance_scale=5.0)


@dataclass(frozen=True)
class Case:
    repo: str  # the conftest fixture whose repository serves it
    fields: dict  # request fields (request_arrays); every case names its seed (the default is random)
    prompt: str = PROMPT
    steer_at: int | None = None  # steps the job has done when `steer` (request fields) is applied
    steer: dict = field(default_factory=dict)


CASES = {
    # tiny_repo: the tiny random SD checkpoint, base UNet only (inpainting by latent blend)
    "txt2img_ddim": Case("tiny_repo", dict(sampler="ddim", seed=1, steps=10, **G5)),
    "txt2img_ddim_eta": Case("tiny_repo", dict(sampler="ddim", eta=0.5, seed=2, steps=10, **G5)),
    "txt2img_euler_ancestral": Case("tiny_repo", dict(sampler="euler_ancestral", seed=3, steps=10, **G5)),
    "txt2img_dpmpp_2m_karras": Case("tiny_repo", dict(sampler="DPM++ 2M Karras", seed=4, steps=10, **G5)),
    "txt2img_dpmpp_2m_sde": Case("tiny_repo", dict(sampler="dpmpp_2m_sde", seed=5, steps=10, **G5)),
    "txt2img_unipc": Case("tiny_repo", dict(sampler="unipc", seed=6, steps=10, **G5)),
    "txt2img_lcm": Case("tiny_repo", dict(sampler="lcm", seed=7, steps=6, guidance_scale=1.5)),  # fits eps models
    "txt2img_no_guidance": Case("tiny_repo", dict(seed=8, steps=10, guidance_scale=1.0)),  # one UNet row
    "txt2img_guidance_interval": Case(  # unconditional row left out at steps 0, 1, 8, 9
        "tiny_repo",
        dict(sampler="dpmpp_2m", guidance_interval=np.array([0.2, 0.8], np.float32), seed=9, steps=10, **G5),
    ),
    "txt2img_non_square": Case(
        "tiny_repo", dict(height=32, width=48, negative_prompt="a green triangle", seed=10, steps=10, **G5)
    ),
    "img2img": Case("tiny_repo", dict(init_image=IMAGE, strength=0.6, seed=11, steps=12, **G5)),
    "inpaint_blend": Case(
        "tiny_repo", dict(init_image=IMAGE, mask=half_mask(32), mask_blur=2, seed=12, steps=10, guidance_scale=7.5)
    ),
    "inpaint_blend_no_paste": Case(
        "tiny_repo",
        dict(init_image=IMAGE, mask=half_mask(32, "left"), strength=0.8, keep_unmasked=False, seed=13, steps=10, **G5),
    ),
    "regions_latent": Case("tiny_repo", dict(REGIONS, region_mode="latent", seed=14, steps=10, **G5)),
    "regions_attention": Case("tiny_repo", dict(REGIONS, region_mode="attention", seed=15, steps=10, **G5)),
    "prompt_schedule": Case(
        "tiny_repo", dict(seed=16, steps=10, **G5), prompt="[a red circle:a blue square:4] on the left"
    ),
    "prompt_alternation": Case(
        "tiny_repo", dict(negative_prompt="[green|] square", seed=17, steps=10, **G5), prompt="a [red|blue] circle"
    ),
    "steer_prompt": Case(
        "tiny_repo", dict(seed=18, steps=10, **G5), steer_at=4, steer=dict(prompt="a blue square at the top")
    ),
    "steer_guidance": Case("tiny_repo", dict(seed=19, steps=10, **G5), steer_at=3, steer=dict(guidance_scale=2.0)),
    "steer_regions": Case("tiny_repo", dict(seed=20, steps=10, **G5), steer_at=3, steer=REGIONS),
    "steer_blend_mask": Case(
        "tiny_repo",
        dict(init_image=IMAGE, mask=half_mask(32), strength=0.8, seed=21, steps=10, **G5),
        steer_at=4,
        steer=dict(mask=half_mask(32, "left")),
    ),
    # variant_repo: the same base checkpoint plus a 9-channel inpainting UNet and an x4 upscaler
    "variant_txt2img": Case("variant_repo", dict(seed=30, steps=10, **G5)),  # base variant beside the others
    "inpaint_9ch": Case(
        "variant_repo", dict(init_image=IMAGE, mask=half_mask(32), mask_blur=2, seed=31, steps=10, guidance_scale=7.5)
    ),
    "upscale": Case("variant_repo", dict(task="upscale", init_image=LOW_RES, noise_level=40, seed=32, steps=10, **G5)),
    "steer_mask_9ch": Case(
        "variant_repo",
        dict(init_image=IMAGE, mask=half_mask(32), strength=0.8, mask_blur=1, seed=33, steps=10, **G5),
        steer_at=4,
        steer=dict(mask=half_mask(32, "left")),
    ),
    # default_repo: the shipped trained model (checkpoints/ldm-shapes, v-prediction), its own sampler default
    "default_txt2img": Case("default_repo", dict(seed=41, steps=12, height=64, width=64, **G5), prompt=CAPTION),
    "default_img2img": Case(
        "default_repo",
        dict(init_image=SCENE, strength=0.6, seed=42, steps=12, **G5),
        prompt="a large blue square on the right",
    ),
}
# submitted together (half of them while the others run) and drained: each must keep its alone bytes
CROWDS = {
    "tiny_repo": [
        "txt2img_ddim_eta",
        "txt2img_dpmpp_2m_karras",
        "txt2img_no_guidance",
        "txt2img_non_square",
        "img2img",
        "inpaint_blend",
        "regions_latent",
        "regions_attention",
        "prompt_schedule",
        "steer_prompt",
        "steer_guidance",
    ],
    "variant_repo": ["variant_txt2img", "inpaint_9ch", "upscale", "steer_mask_9ch"],
}


def steer_arrays(**fields) -> dict:
    """A steer's named arrays, typed as a request's (request_arrays without the prompt it adds)."""
    arrays = request_arrays(fields.pop("prompt", ""), **fields)
    if not arrays["prompt"][0]:
        del arrays["prompt"]
    return arrays


def run_cases(svc, names, join_after=None) -> dict:
    """Runs CASES[names] in `svc` ({name: uint8 image}), each steered once it has done exactly
    its steer_at steps; join_after: submit the second half after that many iterations."""
    names = list(names)
    first, later = (names, []) if join_after is None else (names[: len(names) // 2], names[len(names) // 2 :])
    sinks, pending = {}, {}

    def submit(name):
        case = CASES[name]
        sinks[name] = Sink()
        svc.submit(request_arrays(case.prompt, **case.fields), sinks[name], request_id=name)
        assert sinks[name].error is None, (name, sinks[name].error)
        if case.steer_at is not None:
            pending[name] = case

    def steer_due():  # before each iteration: a job steps at most once per iteration
        for name, case in list(pending.items()):
            job = svc.engine.registry.running.get(name)
            if job is not None and job.index >= case.steer_at:
                assert job.index == case.steer_at, name
                svc.steer(name, steer_arrays(**case.steer))
                del pending[name]

    for name in first:
        submit(name)
    for _ in range(join_after or 0):  # the first half is mid-flight when the others join
        steer_due()
        svc.engine.run_iteration()
    for name in later:
        submit(name)
    while True:
        steer_due()
        if not svc.engine.run_iteration():
            break
    assert not pending, f"never steered: {sorted(pending)}"
    for name, sink in sinks.items():
        assert sink.error is None and sink.ends == 1, (name, sink.error)
    return {name: sink.image for name, sink in sinks.items()}


def digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def recorded() -> dict:
    return json.loads(GOLDEN.read_text())


def record(name: str, image: np.ndarray) -> None:
    """LDM_RECORD_GOLDEN=1: stores this case's hash (read-modify-write, one case per test)."""
    data = recorded() if GOLDEN.is_file() else {}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    import onnxruntime

    data["recorded_with"] = {
        "commit": commit,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
    }
    data["cases"] = {**data.get("cases", {}), name: {"sha256": digest(image), "shape": list(image.shape)}}
    cases = ",\n".join(f"    {json.dumps(n)}: {json.dumps(c)}" for n, c in sorted(data["cases"].items()))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)  # one case a line: a re-record's diff names the cases it moved
    GOLDEN.write_text(
        f'{{\n  "recorded_with": {json.dumps(data["recorded_with"])},\n  "cases": {{\n{cases}\n  }}\n}}\n'
    )


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def expect(name: str, image: np.ndarray) -> None:
    want = recorded()["cases"][name]
    assert list(image.shape) == want["shape"], name
    assert digest(image) == want["sha256"], (
        f"{name}: the image's bytes changed since {recorded()['recorded_with']}; if another machine or onnxruntime "
        "recorded them, re-record at the commit before your change (LDM_RECORD_GOLDEN=1)"
    )


@pytest.fixture(scope="module")
def services(request):
    """One in-process service per repository fixture, made on first use (variant_repo's and
    default_repo's exports are built only when their cases run)."""
    made = {}

    def get(repo):
        if repo not in made:
            made[repo] = service(request.getfixturevalue(repo))
        return made[repo]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_each_case_alone_has_its_recorded_bytes(services, name):
    image = run_cases(services(CASES[name].repo), [name])[name]
    assert image.std() > 1.0, name  # a picture: golden bytes of a blank would pin little
    if RECORD:
        record(name, image)
    else:
        expect(name, image)


@pytest.mark.parametrize("repo", list(CROWDS))
def test_each_case_in_a_crowd_keeps_its_alone_bytes(services, repo):
    """Batching (rows of other jobs, other samplers, variants and steers in the same calls) must
    not change a job's bytes: the crowd is checked against the alone hashes, not against itself."""
    images = run_cases(services(repo), CROWDS[repo], join_after=3)
    for name, image in images.items():
        expect(name, image)


def test_the_recording_covers_exactly_the_cases_and_they_differ():
    cases = recorded()["cases"]
    assert sorted(cases) == sorted(CASES)
    assert len({c["sha256"] for c in cases.values()}) == len(cases)  # no two cases collapsed to one image
    assert all(CASES[name].repo == repo for repo, names in CROWDS.items() for name in names)
