"""Every sampler against its diffusers scheduler over whole runs, with the same noise: the
timesteps the UNet sees, the scaled model inputs and the final latents, for text-to-image and
image-to-image starts (diffusers' img2img sets the begin index), several schedule configs, step
counts, both sigma schedules and mixed rows. A stand-in model keeps latents at a trained model's
scale. Stochastic samplers get their noise from one stream, in the order both draw it."""

import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from serving.core.samplers import A1111_NAMES, SAMPLERS, default_sampler_name, make_sampler, resolve_name
from serving.core.samplers.registry import fit_error
from tests.support.samplers import REFERENCES

SD = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
CONFIGS = {
    "sd-leading-eps": {**SD, "timestep_spacing": "leading"},
    "sd-linspace-v": {**SD, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    # the shipped model's: zero terminal SNR, v-prediction, trailing
    "zero-snr-v-trailing": {
        **SD,
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    },
}
SHAPE = (4, 8, 8)


def stand_in(x, t):
    """A smooth deterministic function of the model input and timestep (at unit scale)."""
    ramp = np.linspace(-1, 1, x[0].size, dtype=np.float32).reshape(x.shape[1:])
    return (0.8 * np.tanh(x) + 0.3 * ramp * np.cos(np.float32(t) / 300.0)).astype(np.float32)


def reference_run(name, schedule, config, steps, begin, noise, init, draws):
    """diffusers' loop (as StableDiffusion[Img2Img]Pipeline runs it): returns (UNet timesteps,
    scaled inputs, final latents)."""
    cls, extra = REFERENCES[name]
    scheduler = cls.from_config({**config, **extra, **({"use_karras_sigmas": True} if schedule == "karras" else {})})
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):  # what img2img does; for txt2img (begin 0) it avoids the timestep lookup
        scheduler.set_begin_index(begin)
    x = torch.from_numpy(noise[None])
    if init is None:
        x = x * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(torch.from_numpy(init[None]), x, timesteps[:1])
    module = sys.modules[cls.__module__]
    pending = [torch.from_numpy(d[None]) for d in draws]
    seen_t, inputs = [], []
    original = getattr(module, "randn_tensor", None)
    module.randn_tensor = lambda shape, **kw: pending.pop(0)
    try:
        for t in timesteps:
            model_in = scheduler.scale_model_input(x, t)
            seen_t.append(float(t))
            inputs.append(model_in.numpy()[0])
            out = torch.from_numpy(stand_in(model_in.numpy(), float(t)))
            kwargs = {"eta": 0.0} if name == "ddim" else {}
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    finally:
        module.randn_tensor = original
    return np.array(seen_t), inputs, x.numpy()[0], len(pending)


def our_runs(samplers, steps, strengths, noises, inits, draw_rng):
    """Our samplers stepping all jobs' rows together (one 'UNet call' per iteration): returns
    per job (UNet timesteps, scaled inputs, final latents)."""
    runs = [s.start(n, k) for s, n, k in zip(samplers, steps, strengths)]
    x = []
    for s, run, noise, init in zip(samplers, runs, noises, inits):
        x.append(s.initial_latents(run, noise) if init is None else s.add_noise(run, init, noise, run.begin))
    seen = [([], []) for _ in runs]
    done = [0] * len(runs)
    while any(run.begin + d < run.steps for run, d in zip(runs, done)):
        live = [i for i, (run, d) in enumerate(zip(runs, done)) if run.begin + d < run.steps]
        model_in, t = [], []
        for i in live:
            position = runs[i].begin + done[i]
            t.append(runs[i].timesteps[position])
            model_in.append(x[i] * np.float32(samplers[i].input_scale(runs[i], position)))
            seen[i][0].append(t[-1])
            seen[i][1].append(model_in[-1])
        outputs = np.concatenate([stand_in(m[None], tt) for m, tt in zip(model_in, t)])
        for sampler in {id(samplers[i]): samplers[i] for i in live}.values():
            rows = [k for k, i in enumerate(live) if samplers[i] is sampler]
            jobs = [live[k] for k in rows]
            positions = [runs[i].begin + done[i] for i in jobs]
            noise = np.stack(
                [
                    draw_rng[i]() if sampler.draws_noise(runs[i], p) else np.zeros(SHAPE, np.float32)
                    for i, p in zip(jobs, positions)
                ]
            )
            prev, _ = sampler.step(
                [runs[i] for i in jobs], positions, outputs[rows], np.stack([x[i] for i in jobs]), noise
            )
            for k, i in enumerate(jobs):
                x[i] = prev[k]
                done[i] += 1
    return [(np.array(t), inputs, x[i]) for i, (t, inputs) in enumerate(seen)]


def check(name, schedule, config, steps, strength, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    init = rng.standard_normal(SHAPE).astype(np.float32) * 0.5 if strength < 1 else None
    draws = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps)]
    sampler = make_sampler(name, schedule, config)
    stream = iter(draws)
    ((t, inputs, x),) = our_runs([sampler], [steps], [strength], [noise], [init], [lambda: next(stream)])
    begin = steps - min(int(steps * strength), steps)
    used = sum(sampler.draws_noise(sampler.start(steps, strength), p) for p in range(begin, steps))
    ref_t, ref_inputs, ref_x, _ = reference_run(name, schedule, config, steps, begin, noise, init, draws[:used])
    np.testing.assert_allclose(t, ref_t, rtol=0, atol=1e-3)  # fractional (Karras) timesteps: float32 rounding
    for ours, ref in zip(inputs, ref_inputs):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x, ref_x, rtol=1e-3, atol=1e-3)


CASES = [(name, "default") for name in REFERENCES] + [
    (n, "karras") for n in ("euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name,schedule", CASES)
@pytest.mark.parametrize("steps,strength", [(10, 1.0), (25, 1.0), (10, 0.6), (25, 0.75)])
def test_sampler_matches_its_diffusers_scheduler(name, schedule, config, steps, strength):
    check(name, schedule, CONFIGS[config], steps, strength)


def test_flow_match_euler_matches_diffusers_on_a_tiny_configuration():
    for config, mu in (
        ({"shift": 3.0}, None),
        ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 0.8),
    ):
        reference = FlowMatchEulerDiscreteScheduler(**config)
        ours = make_sampler("flow_match_euler", "default", {"_class_name": "FlowMatchEulerDiscreteScheduler", **config})
        for steps, strength in ((4, 1.0), (12, 1.0), (12, 0.5)):
            rng = np.random.default_rng(steps)
            noise, init = rng.standard_normal((2, *SHAPE)).astype(np.float32)
            reference.set_timesteps(steps, mu=mu)
            begin = steps - int(steps * strength)
            reference.set_begin_index(begin)
            run = ours.start(steps, strength, mu=mu)
            np.testing.assert_allclose(run.timesteps, reference.timesteps.numpy(), rtol=1e-6)
            x_ref = torch.from_numpy(noise[None])
            if strength < 1:
                x_ref = reference.scale_noise(
                    torch.from_numpy(init[None]), reference.timesteps[begin : begin + 1], x_ref
                )
            x = ours.initial_latents(run, noise) if strength == 1 else ours.add_noise(run, init, noise, begin)
            for p in range(begin, steps):
                t = reference.timesteps[p]
                x_ref = reference.step(torch.from_numpy(stand_in(x_ref.numpy(), float(t))), t, x_ref).prev_sample
                x = ours.step([run], [p], stand_in(x[None], run.timesteps[p]), x[None], None)[0][0]
            np.testing.assert_allclose(x, x_ref.numpy()[0], rtol=1e-4, atol=1e-5)


def test_mixed_samplers_in_one_call_equal_each_alone():
    """8 jobs, 8 samplers or schedules, different step counts and starts, stepped together
    (joining as the others run): each ends with the latents it gets alone, exactly."""
    config = CONFIGS["zero-snr-v-trailing"]
    names = [
        ("ddim", "default"),
        ("euler", "default"),
        ("euler_ancestral", "default"),
        ("dpmpp_2m", "default"),
        ("dpmpp_2m", "karras"),
        ("dpmpp_2m_sde", "default"),
        ("unipc", "default"),
        ("lcm", "default"),
    ]
    samplers = [make_sampler(n, s, config) for n, s in names]
    steps = [25, 10, 15, 20, 12, 18, 10, 6]
    strengths = [1.0, 1.0, 0.6, 1.0, 0.8, 1.0, 1.0, 1.0]
    rng = np.random.default_rng(3)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in names]
    inits = [rng.standard_normal(SHAPE).astype(np.float32) if k < 1 else None for k in strengths]

    def streams():
        return [np.random.default_rng([9, i]) for i in range(len(names))]

    together = our_runs(
        samplers,
        steps,
        strengths,
        noises,
        inits,
        [lambda g=g: g.standard_normal(SHAPE).astype(np.float32) for g in streams()],
    )
    for i, g in enumerate(streams()):
        alone = our_runs(
            [samplers[i]],
            [steps[i]],
            [strengths[i]],
            [noises[i]],
            [inits[i]],
            [lambda g=g: g.standard_normal(SHAPE).astype(np.float32)],
        )[0]
        np.testing.assert_array_equal(together[i][2], alone[2])


def test_names_a1111_names_and_fit():
    assert resolve_name("DPM++ 2M Karras", None) == ("dpmpp_2m", "karras")
    assert resolve_name("euler a", None) == ("euler_ancestral", "default")
    assert resolve_name("UniPC", "karras") == ("unipc", "karras")
    assert all(resolve_name(n, None)[0] in SAMPLERS for n in A1111_NAMES)
    with pytest.raises(ValueError, match=r"^sampler: unknown sampler 'heun'; valid: ddim, euler"):
        resolve_name("heun", None)
    with pytest.raises(ValueError, match="^sigma_schedule: karras works with"):
        resolve_name("Euler a", "karras")
    with pytest.raises(ValueError, match="^sigma_schedule: must be one of default, karras"):
        resolve_name("euler", "exponential")
    assert fit_error("flow_match_euler", CONFIGS["sd-leading-eps"]).startswith("sampler: flow_match_euler does not fit")
    assert fit_error("euler", {"_class_name": "FlowMatchEulerDiscreteScheduler"}).startswith(
        "sampler: euler does not fit"
    )
    assert default_sampler_name({"_class_name": "LCMScheduler"}) == ("lcm", "default")
    assert default_sampler_name({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}) == (
        "dpmpp_2m",
        "karras",
    )
    assert default_sampler_name({"_class_name": "DDIMScheduler"}) == ("ddim", "default")
