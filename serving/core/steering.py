"""Steering a running generation, as plain Python (imports nothing from Triton).

A job's conditioning is a plan: switches (from_step, segment, steer_ids), sorted by step. Step i
runs on the conditioning of the last switch with from_step <= i. A segment is one prompt spec
(serving/core/conditioning.py: immutable, so a switch is an assignment) and, once the runner has
text-encoded it, its conditioning; alternation's switches share their segments, so each distinct
text is encoded once.

Two things write plans, the same way (`conditioning_plan`):
- admission: the request's prompt schedules (serving/core/prompt_schedule.py) from step 0;
- a steer: it changes the job's prompt, negative prompt, guidance scale, regions (all of them at
  once: a steer's region fields replace the job's regions, parsed as a new request's at the
  job's size) or inpainting mask (`Job.request` takes the new values at once, so later steers
  build on them); the engine, at its next admission batch, replaces the plan from the job's
  next step with the plan of the steered request from that step on, and encodes its new texts
  with the new requests' texts in one text-encoder call; a new mask replaces the job's image
  conditioning at the same time (serving/core/image_jobs.py `steer_masks`). The job keeps its
  latents, seed, noise generator and position.
The first switch a steer installs carries its steer id (several, when steers arrived between two
admission batches), so the engine can tell which step first used it.
"""

from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.core.conditioning import TextPrompt, TrueCfgPrompt
from serving.core.errors import FAILED_PRECONDITION, NOT_FOUND
from serving.core.image_request import steered_mask
from serving.core.prompt_schedule import joint_schedule, schedule
from serving.core.regional_prompt import regional_prompt
from serving.core.regions import FIELDS as REGION_FIELDS, parse_regions
from serving.core.request import parse_request

if TYPE_CHECKING:
    from serving.core.job import Job

TEXT_FIELDS = ("prompt", "negative_prompt", "guidance_scale")
LORA_FIELDS = ("lora_names", "lora_weights")
STEERABLE = (*TEXT_FIELDS, *REGION_FIELDS, "mask", *LORA_FIELDS)
# request parameter of a steer message to the `pipeline` model: the request id of the generation
STEER_PARAMETER = "steer_request_id"


@dataclass(eq=False)
class Segment:
    spec: Any  # prompt spec: texts(), rows, build()
    conditioning: Any = None  # set by the runner's text encoding


@dataclass(frozen=True)
class Switch:
    from_step: int
    segment: Segment
    steer_ids: tuple[Any, ...] = ()  # steers whose change this switch first applies


class SteerRefused(Exception):
    """A steer that cannot be applied: `code` is NOT_FOUND or FAILED_PRECONDITION."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def prompt_spec(request: Any) -> Any:
    """The prompt spec of a request's (unscheduled) texts."""
    if request.regions is not None:
        return regional_prompt(request)
    if request.guidance_rule == "true_cfg":
        return TrueCfgPrompt(
            request.prompt,
            request.negative_prompt,
            request.guidance_scale,
            request.true_cfg_scale,
            request.guidance_input,
        )
    return TextPrompt(request.prompt, request.negative_prompt, request.guidance_scale)


def denoising_steps(request: Any) -> int:
    """How many denoising steps the job runs (img2img and inpainting: the strength's share),
    which prompt schedules count."""
    steps: int = request.denoising_steps
    return steps


def scheduled_texts(request: Any) -> list[Any]:
    """[(from_step, prompt, negative_prompt)] of the request's prompt schedules; raises
    InvalidInput on malformed syntax."""
    return joint_schedule(request.prompt, request.negative_prompt, denoising_steps(request))


def parse_steer(inputs: dict[str, Any], limits: Any) -> Any:
    """Parses a steer's inputs (named arrays, as a request's), each range-checked as a new
    request's field. Texts and guidance are checked now, before the job is looked up; returns
    steered(request) -> `request` with all of them: regions parsed at the request's size, which
    replace its regions (a region mode left out keeps theirs), an inpainting request's mask.
    Both raise InvalidInput naming the field."""
    given = {name for name, value in inputs.items() if value is not None}
    text = {name: inputs[name] for name in (*TEXT_FIELDS, *LORA_FIELDS) if name in given}
    parsed = parse_request({"prompt": np.array([b"steer"], np.object_), **text}, limits, default_seed=0)
    text_changes = {name: getattr(parsed, name) for name in text if name in TEXT_FIELDS}
    if parsed.loras or given & set(LORA_FIELDS):  # adapters named by the fields or the prompt's tags replace the job's
        text_changes["loras"] = parsed.loras
    for name in ("prompt", "negative_prompt"):
        if name in text_changes:  # syntax now; the steps a schedule counts are checked with the job
            schedule(text_changes[name], 1, name)

    def steered(request: Any) -> Any:
        changes = dict(text_changes)
        regions = {name: inputs[name] for name in REGION_FIELDS if name in given}
        if regions:
            if "region_mode" not in regions and request.regions is not None:
                regions["region_mode"] = np.array([request.regions.mode.encode()], np.object_)
            changes["regions"] = parse_regions(regions, limits.regions, request.height, request.width)
        if "mask" in given:
            changes["image"] = steered_mask(request.image, inputs)
        return replace(request, **changes)

    return steered


def conditioning_plan(request: Any, start: int, steer_ids: tuple[Any, ...] = ()) -> list[Any]:
    """The switches that run `request` from step `start` on; the first starts at `start` and
    carries `steer_ids`."""
    entries = scheduled_texts(request)
    first = max(i for i, (step, _, _) in enumerate(entries) if step <= start)
    segments, switches = {}, []
    for i, (step, prompt, negative) in enumerate(entries[first:]):
        if (prompt, negative) not in segments:
            segments[prompt, negative] = Segment(prompt_spec(replace(request, prompt=prompt, negative_prompt=negative)))
        switches.append(Switch(start if i == 0 else step, segments[prompt, negative], steer_ids if i == 0 else ()))
    return switches


class ConditioningPlan:
    def __init__(self, switches: list[Any]) -> None:
        self.switches = switches

    def at(self, step: int) -> Switch:
        switch: Switch = self.switches[bisect_right([s.from_step for s in self.switches], step) - 1]
        return switch

    def conditioning_at(self, step: int) -> Any:
        return self.at(step).segment.conditioning

    def steers_first_used_at(self, step: int) -> tuple[Any, ...]:
        switch = self.at(step)
        return switch.steer_ids if switch.from_step == step else ()

    def replace_from(self, switches: list[Any]) -> None:
        """Installs `switches` from their first step on. Steer ids of a replaced switch at that
        very step were never used (that step has not run): the new switch carries them too."""
        start = switches[0].from_step
        kept = [s for s in self.switches if s.from_step < start]
        unused = tuple(i for s in self.switches if s.from_step == start for i in s.steer_ids)
        if unused:
            switches = [replace(switches[0], steer_ids=unused + switches[0].steer_ids), *switches[1:]]
        self.switches = kept + switches

    def unencoded(self) -> list[Any]:
        """Distinct segments that still need their text encoding."""
        return list({id(s.segment): s.segment for s in self.switches if s.segment.conditioning is None}.values())


def plan_pending_steers(job: "Job") -> None:
    """Gives an admitted or steered job the plan of its current request from its next step,
    carrying the ids of the steers accepted since its last plan. Called under the engine's lock."""
    ids, job.pending_steers = tuple(job.pending_steers), []
    job.planned = job.request
    switches = conditioning_plan(job.request, job.index, ids)
    if job.plan is None:
        job.plan = ConditioningPlan(switches)
    else:
        job.plan.replace_from(switches)


class GenerationRegistry:
    """Jobs by request id while queued or running, and the ids of the last `remember` that
    ended (so a late steer hears FAILED_PRECONDITION, not NOT_FOUND); bounded."""

    def __init__(self, remember: int = 4096) -> None:
        self.running: dict[str, Job] = {}
        self.ended: OrderedDict[str, bool] = OrderedDict()
        self.remember = remember

    def add(self, job: "Job") -> None:
        if job.request_id:
            self.ended.pop(job.request_id, None)
            self.running[job.request_id] = job

    def end(self, job: "Job") -> None:
        if job.request_id and self.running.get(job.request_id) is job:
            del self.running[job.request_id]
            self.ended[job.request_id] = True
            while len(self.ended) > self.remember:
                self.ended.popitem(last=False)

    def find(self, request_id: str) -> "Job":
        """The running job with this id; raises SteerRefused when there is none."""
        job = self.running.get(request_id)
        if job is None:
            if request_id in self.ended:
                raise SteerRefused(FAILED_PRECONDITION, f"generation {request_id!r} has finished")
            raise SteerRefused(NOT_FOUND, f"no generation with id {request_id!r}")
        if job.timesteps is not None and job.done:  # its last step ran; it is being decoded
            raise SteerRefused(FAILED_PRECONDITION, f"generation {request_id!r} has finished")
        return job
