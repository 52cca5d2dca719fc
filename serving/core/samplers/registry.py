"""Sampler names, their A1111 display names, which checkpoints they fit, and the default one a
checkpoint's scheduler config picks."""

from typing import Any

from serving.core.samplers.base import PREDICTION_TYPES, Sampler
from serving.core.samplers.ddim import DDIM
from serving.core.samplers.dpm import DPMSolverPP2M, DPMSolverPP2MSDE
from serving.core.samplers.euler import Euler, EulerAncestral
from serving.core.samplers.flow import FlowMatchEuler
from serving.core.samplers.lcm import LCM
from serving.core.samplers.unipc import UniPC

SAMPLERS = {
    cls.name: cls for cls in (DDIM, Euler, EulerAncestral, DPMSolverPP2M, DPMSolverPP2MSDE, UniPC, LCM, FlowMatchEuler)
}
SIGMA_SCHEDULES = ("default", "karras")
# samplers whose sigmas Karras spacing can replace (as diffusers' use_karras_sigmas)
KARRAS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc")
# A1111 (modules/sd_samplers_kdiffusion.py) display names: (sampler, sigma schedule)
A1111_NAMES = {
    "DDIM": ("ddim", "default"),
    "Euler": ("euler", "default"),
    "Euler a": ("euler_ancestral", "default"),
    "DPM++ 2M": ("dpmpp_2m", "default"),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "default"),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "UniPC": ("unipc", "default"),
    "LCM": ("lcm", "default"),
}
DESCRIPTIONS = {
    "ddim": "DDIM (Song et al. 2020); eta > 0 adds noise from the seed",
    "euler": "Euler in sigma space (Karras et al. 2022)",
    "euler_ancestral": "Euler ancestral: fresh noise from the seed at every step",
    "dpmpp_2m": "DPM-Solver++(2M), multistep, second order",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE: noise from the seed at every step",
    "unipc": "UniPC (bh2), predictor-corrector, order 2: good at 10 steps",
    "lcm": "latent consistency sampling, 4-8 steps; needs an LCM-distilled UNet or LCM-LoRA",
    "flow_match_euler": "Euler on the flow-matching ODE (flow-matching checkpoints)",
}


def resolve_name(value: str, sigma_schedule: str | None) -> tuple[Any, ...]:
    """(sampler, sigma schedule) from a request's `sampler` (our name or an A1111 display name,
    any case) and its `sigma_schedule` (None: the A1111 name's, else "default"); raises
    ValueError naming the field and the valid names."""
    key = value.strip()
    by_lower = {name.lower(): pair for name, pair in A1111_NAMES.items()}
    if key.lower() in by_lower:
        name, schedule = by_lower[key.lower()]
    elif key.lower() in SAMPLERS:
        name, schedule = key.lower(), "default"
    else:
        valid = ", ".join([*SAMPLERS, *(repr(n) for n in A1111_NAMES)])
        raise ValueError(f"sampler: unknown sampler {value!r}; valid: {valid}")
    if sigma_schedule is not None:
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule: must be one of {', '.join(SIGMA_SCHEDULES)}, got {sigma_schedule!r}")
        schedule = sigma_schedule
    if schedule == "karras" and name not in KARRAS:
        raise ValueError(f"sigma_schedule: karras works with {', '.join(KARRAS)}, not {name}")
    return name, schedule


def model_kind(scheduler_config: dict[str, Any]) -> str:
    """ "flow" for flow-matching checkpoints, else "diffusion"."""
    return "flow" if "FlowMatch" in scheduler_config.get("_class_name", "") else "diffusion"


def fit_error(name: str, scheduler_config: dict[str, Any]) -> str | None:
    """Why sampler `name` cannot run this checkpoint, or None."""
    kind = model_kind(scheduler_config)
    if SAMPLERS[name].fits != kind:
        what = "a flow-matching" if kind == "flow" else f"a {scheduler_config.get('prediction_type', 'epsilon')}"
        return (
            f"sampler: {name} does not fit {what} model; samplers that fit it: {', '.join(fitting(scheduler_config))}"
        )
    if kind == "diffusion" and scheduler_config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        return f"sampler: unknown prediction_type {scheduler_config.get('prediction_type')!r}"
    return None


def fitting(scheduler_config: dict[str, Any]) -> list[Any]:
    kind = model_kind(scheduler_config)
    return [name for name, cls in SAMPLERS.items() if cls.fits == kind]


def make_sampler(name: str, sigma_schedule: str, scheduler_config: dict[str, Any]) -> Sampler:
    error = fit_error(name, scheduler_config)
    if error:
        raise ValueError(error)
    return SAMPLERS[name](scheduler_config, sigma_schedule)


def default_sampler_name(scheduler_config: dict[str, Any]) -> tuple[Any, ...]:
    """(sampler, sigma schedule) the checkpoint's scheduler config names (diffusers' class);
    DDIM for any other class, as before samplers were chosen per request."""
    cls = scheduler_config.get("_class_name", "")
    karras = "karras" if scheduler_config.get("use_karras_sigmas", False) else "default"
    if cls == "LCMScheduler":
        return "lcm", "default"
    if cls.startswith("FlowMatch"):
        return "flow_match_euler", "default"
    if cls == "EulerDiscreteScheduler":
        return "euler", karras
    if cls == "EulerAncestralDiscreteScheduler":
        return "euler_ancestral", "default"
    if cls == "DPMSolverMultistepScheduler":
        sde = scheduler_config.get("algorithm_type", "dpmsolver++").startswith("sde")
        return ("dpmpp_2m_sde" if sde else "dpmpp_2m"), karras
    if cls == "UniPCMultistepScheduler":
        return "unipc", karras
    return "ddim", "default"


def served_default(configured: str, scheduler_config: dict[str, Any]) -> tuple[Any, ...]:
    """(sampler, sigma schedule) a request naming none gets: `configured` (the pipeline's
    default_sampler parameter, `ldm serve --sampler`; a name or A1111 name), else what the
    checkpoint's scheduler class names. ValueError when the name is unknown or does not fit."""
    pair = resolve_name(configured, None) if configured else default_sampler_name(scheduler_config)
    error = fit_error(pair[0], scheduler_config)
    if error:
        raise ValueError(error)
    return pair


def describe_samplers(scheduler_config: dict[str, Any] | None = None) -> list[Any]:
    """What `GET /v1/samplers` lists: each sampler with its parameters, A1111 names and the
    models it fits (and whether it fits the served one)."""
    out = []
    for name, cls in SAMPLERS.items():
        entry: dict[str, Any] = {
            "name": name,
            "description": DESCRIPTIONS[name],
            "a1111_names": [n for n, (s, _) in A1111_NAMES.items() if s == name],
            "sigma_schedules": list(SIGMA_SCHEDULES) if name in KARRAS else ["default"],
            "fits": "flow-matching models" if cls.fits == "flow" else "epsilon-, v- and sample-prediction models",
            "parameters": ["steps", "guidance_scale", "guidance_interval", "sigma_schedule"]
            + (["eta"] if name == "ddim" else []),
        }
        if scheduler_config is not None:
            entry["fits_served_model"] = fit_error(name, scheduler_config) is None
        out.append(entry)
    return out
