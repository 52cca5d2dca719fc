"""The pipeline behind the Triton `pipeline` model, as plain Python: turns named input arrays
into validated jobs (and steers of running jobs) for the engine. The Triton model only adapts
tensors and response senders."""

from typing import Any
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
import json
import os
from pathlib import Path
import re
import secrets
import shutil
import tempfile

from serving.core.engine import Engine, ShuttingDown
from families import FAMILIES
from serving.core.errors import INVALID_ARG, NOT_FOUND, UNAVAILABLE
from serving.core.faults import FAULTS_ENV, FaultPlan
from serving.core.interfaces import ResultSink, RunnerModels
from serving.core.job import Job
from serving.core.lora import AdapterRejected, LoraRefused, LoraRegistry
from serving.core.preview import LatentPreview, ModelPreviews
from serving.core.regional_prompt import check_regional_job
from serving.core.config import PipelineConfig, refuse
from serving.core.request import GenerationRequest, InvalidInput, RequestLimits, parse_request, text_field
from serving.core.runner import Runner
from serving.core.scheduler import QueueFull, BatchingConfig, StepScheduler
from serving.core.steering import STEERABLE, parse_steer, scheduled_texts
from serving.core.text import CachedTextEncoder, PromptTokenizer, TextTokenizers
from serving.core.variants import VariantRunners, VariantSpec


@dataclass(frozen=True)
class PipelineAssets:
    """What `ldm export` writes into pipeline/1/: facts about the checkpoint and its tokenizer."""

    info: dict[str, Any]
    tokenizer_dir: Path
    scheduler_config: dict[str, Any]

    @classmethod
    def read(cls, version_dir: Any) -> "PipelineAssets":
        version_dir = Path(version_dir)
        return cls(
            info=json.loads((version_dir / "pipeline.json").read_text()),
            tokenizer_dir=version_dir / "tokenizer",
            scheduler_config=json.loads((version_dir / "scheduler_config.json").read_text()),
        )


def _lora_registry(config: PipelineConfig, info: dict[str, Any], reader: Any) -> LoraRegistry | None:
    """The model's adapter registry, with the folder's adapters registered, where its primary
    variant's denoiser was exported with LoRA inputs and a reader is given."""
    spec = info["variants"][info["primary"]]
    if not config.lora or not spec.get("lora_unet") or reader is None:
        return None
    checkpoint = Path(info["checkpoint"])
    registry = LoraRegistry(
        lambda path, name: reader(path, name, checkpoint),
        {layer: tuple(shape) for layer, shape in spec["lora_unet_layers"].items()},
        {layer: tuple(shape) for layer, shape in spec.get("lora_text_encoder_layers", {}).items()},
        budget_bytes=config.lora_budget_mb * 2**20,
        max_per_request=config.max_loras_per_request,
        max_file_bytes=config.max_lora_file_mb * 2**20,
        max_columns=config.lora_columns,
    )
    if config.lora_dir:
        for path in sorted(Path(config.lora_dir).glob("*.safetensors")):
            registry.register(path.stem, path)
    return registry


class LoraInUse(RuntimeError):
    """An adapter a running job holds cannot be replaced or removed now (FAILED_PRECONDITION / 409)."""


class LoraTooLarge(ValueError):
    """An uploaded adapter file over the size limit (413)."""


LORA_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class UnknownModel(LookupError):
    """A request names a model this pipeline does not serve (NOT_FOUND)."""


MAX_PLAIN_JOB_ROWS = 2  # a prompt with classifier-free guidance; regional jobs are checked at submit


def check_batching(config: BatchingConfig, variants: dict[str, Any]) -> None:
    """Refuses batching parameters the exported models cannot serve, naming the parameter. The
    text encoder's and VAE's calls are split to their max batch (serving/core/runner.py); a UNet
    call is never split, so the row cap must fit the UNet's max batch and one whole job."""
    if config.max_active < 1:
        refuse("max_active", config.max_active, "must be at least 1")
    if config.max_queue < 1:
        refuse("max_queue", config.max_queue, "must be at least 1")
    if config.max_rows < MAX_PLAIN_JOB_ROWS:
        refuse(
            "max_rows",
            config.max_rows,
            f"must be at least {MAX_PLAIN_JOB_ROWS} (the UNet rows of one request with guidance)",
        )
    for name, spec in variants.items():
        for component in ("unet", "unet_regional"):
            largest = spec.max_batch.get(component)
            if largest is not None and config.max_rows > largest:
                refuse(
                    "max_rows",
                    config.max_rows,
                    f"exceeds the {spec.components[component]} model's max batch size {largest} (variant {name})",
                )


@dataclass
class ServedModel:
    """One model of the pipeline: its limits (defaults, sizes, variants) and its texts' tokenizers
    per variant."""

    name: str
    limits: RequestLimits
    tokenizers: dict[str, Any]  # variant -> TextTokenizers
    lora: LoraRegistry | None = None  # its LoRA adapters, where its denoiser takes them


def model_infos(info: dict[str, Any]) -> dict[str, Any]:
    """{model name: its pipeline.json facts}: the `models` table, or the one model of an export
    made before there could be several."""
    return info.get("models") or {info.get("name", ""): info}


def _by_model_and_variant(models: Any, default_model: str, primary: str) -> dict[tuple[str, str], Any]:
    if not isinstance(models, Mapping):
        return {(default_model, primary): models}
    return {key if isinstance(key, tuple) else (default_model, key): value for key, value in models.items()}


class PipelineService:
    def __init__(
        self,
        assets: PipelineAssets,
        config: PipelineConfig,
        models: "RunnerModels | Mapping[Any, RunnerModels]",
        lora_reader: Any = None,
    ) -> None:
        """config: the pipeline's parameters (PipelineConfig.parse of config.pbtxt's); models: the
        runner models of each served model's UNet variants, {(model, variant): models}; for a
        repository with one model also {variant: models}, or one models object when that model
        holds one variant. lora_reader(path, name, checkpoint_dir) -> Adapter reads LoRA files
        (serving/models/adapters.py read_adapter), where the export has LoRA inputs."""
        infos = model_infos(assets.info)
        self.default_model = assets.info.get("default_model", next(iter(infos)))
        models = _by_model_and_variant(models, self.default_model, infos[self.default_model]["primary"])
        self.faults = FaultPlan(os.environ[FAULTS_ENV]) if os.environ.get(FAULTS_ENV) else None  # a test hook
        if self.faults is not None:
            models = {key: self.faults.models(m) for key, m in models.items()}
        self.drain_grace_s = config.drain_grace_s
        self.lora_per_set = config.lora_batching == "per_set"
        # uploaded adapters: beside the registered folder's, else in a temporary folder made at
        # the first upload and removed by stop()
        self.lora_upload_dir = Path(config.lora_dir) if config.lora_dir else None
        self._temporary_upload_dir: Path | None = None
        # one tokenizer per folder and one text-encoder cache per (model, tokenizers): variants
        # that share their text encoder share its cache
        tokenizers, encoders, runners = {}, {}, {}
        self.models = {}
        for model, info in infos.items():
            limits = RequestLimits.from_config(config, {**info, "name": model})
            missing = sorted(set(limits.variants) - {v for m, v in models if m == model})
            if missing:
                raise ValueError(f"no models given for variants {missing} of model {model!r} of this repository")
            served = self.models[model] = ServedModel(model, limits, {}, _lora_registry(config, info, lora_reader))
            for name, spec in limits.variants.items():
                lengths = {n: spec.token_lengths.get(n, spec.text_length) for n in spec.tokenizers}
                for n, folder in spec.tokenizers.items():
                    if (folder, lengths[n]) not in tokenizers:
                        tokenizers[folder, lengths[n]] = PromptTokenizer(
                            assets.tokenizer_dir.parent / folder, lengths[n]
                        )
                served.tokenizers[name] = TextTokenizers(
                    {n: tokenizers[f, lengths[n]] for n, f in spec.tokenizers.items()}, checked=spec.checked_inputs
                )
                key = (spec.components["text_encoder"], tuple(spec.tokenizers.items()))
                if key not in encoders:
                    encoders[key] = CachedTextEncoder(
                        served.tokenizers[name],
                        models[model, name].encode_text,
                        dict(zip(spec.text_outputs, FAMILIES[spec.family].text_inputs().values())),
                        zero_unconditional=spec.zero_empty_negative,
                        max_batch=spec.max_batch.get("text_encoder"),
                        lora=served.lora if spec.lora_text_encoder else None,
                    )
                runners[model, name] = Runner(
                    models[model, name], spec, encoders[key], lora=served.lora if spec.lora_unet else None
                )
        previews = {model: LatentPreview.from_info(info) for model, info in infos.items()}  # each model's own
        preview = ModelPreviews(previews) if any(p is not None for p in previews.values()) else None
        batching = config.batching()
        check_batching(batching, {key: spec for key, spec in self._variant_specs()})
        # what the UNets' device can serve (GPU memory plan)
        caps = [cap for m in models.values() if (cap := getattr(m, "row_cap", None)) is not None]
        if caps and min(caps) < batching.max_rows:
            if min(caps) < MAX_PLAIN_JOB_ROWS:
                raise ValueError(
                    f"the UNet's GPU memory plan fits {min(caps)} rows per call; a request with guidance needs "
                    f"{MAX_PLAIN_JOB_ROWS} (lower torch_buckets' smallest size or use a larger GPU)"
                )
            batching = replace(batching, max_rows=min(caps))
        self.engine = Engine(VariantRunners(runners), StepScheduler(batching), preview=preview)
        self.engine.stats.row_cap = batching.max_rows

    @property
    def limits(self) -> RequestLimits:
        """The default model's limits."""
        return self.models[self.default_model].limits

    def _variant_specs(self) -> Iterator[tuple[str, VariantSpec]]:
        for model, served in self.models.items():
            for name, spec in served.limits.variants.items():
                yield f"{model}/{name}", spec

    def start(self) -> "PipelineService":
        self.engine.start()
        return self

    def stop(self, grace_s: float | None = None) -> bool:
        """Drains the engine (Engine.stop): refuses new requests at once with UNAVAILABLE, lets
        the generations in flight finish for up to `grace_s` seconds (default: the pipeline's
        config.pbtxt parameter drain_grace_s, 120), then fails those left with UNAVAILABLE.
        Returns whether the engine's worker ended."""
        ended = self.engine.stop(self.drain_grace_s if grace_s is None else grace_s)
        if self._temporary_upload_dir is not None:
            shutil.rmtree(self._temporary_upload_dir, ignore_errors=True)
        return ended

    @property
    def accepting(self) -> bool:
        """False from the moment `stop` is called: readiness should report it."""
        return self.engine.accepting

    def submit(self, inputs: dict[str, Any], sink: ResultSink, request_id: str | None = None) -> None:
        """Validates and queues one request; a rejected request gets its error through `sink`.
        A request with an id can be steered by it (`steer`)."""
        if self.faults is not None:
            sink = self.faults.sink(sink)
        try:
            served = self.model_of(inputs)
            request = parse_request(inputs, served.limits, default_seed=secrets.randbelow(2**31))
            variant = request.image.variant if request.image is not None else "base"
            job = Job(
                request,
                sink,
                request_id=request_id or None,
                model=served.name,
                variant=variant,
                lora_per_set=self.lora_per_set,
            )
            self._check(job, request)
        except UnknownModel as exc:
            sink.fail(NOT_FOUND, str(exc))
            return
        except InvalidInput as exc:
            sink.fail(INVALID_ARG, str(exc))
            return
        try:
            self.engine.submit(job)
        except InvalidInput as exc:
            sink.fail(INVALID_ARG, str(exc))
        except ShuttingDown as exc:
            sink.fail(UNAVAILABLE, str(exc))
        except QueueFull as exc:
            sink.fail(UNAVAILABLE, f"server overloaded, retry later: {exc}")

    # --- LoRA adapters at run time (the gateway's POST/DELETE/GET /v1/loras, through control messages)

    def loras(self, model: str = "") -> list[Any]:
        """[{"id", "model", "resident"}] of every adapter registered for `model` (all models when "")."""
        out = []
        for name, served in self.models.items():
            if served.lora is not None and model in ("", name):
                out += [
                    {"id": adapter, "model": name, "resident": adapter in served.lora.resident}
                    for adapter in served.lora.names()
                ]
        return out

    def load_lora(self, name: str, data: bytes, model: str = "") -> None:
        """Registers an uploaded adapter file under `name` (replacing one of that name not in use),
        after reading it once: a file that is not a LoRA for the model is refused (InvalidInput)."""
        served = self._lora_model(model)
        assert served.lora is not None  # _lora_model refuses a model without
        if not LORA_NAME.fullmatch(name):
            raise InvalidInput("name", f"must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
        if len(data) > served.lora.max_file_bytes:
            raise LoraTooLarge(f"file: {len(data)} bytes; at most {served.lora.max_file_bytes} bytes per adapter file")
        if self.lora_upload_dir is None:
            self.lora_upload_dir = self._temporary_upload_dir = Path(tempfile.mkdtemp(prefix="ldm-loras-"))
        folder = self.lora_upload_dir / served.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.safetensors"
        partial = folder / f".{name}.{secrets.token_hex(4)}.partial"
        partial.write_bytes(data)
        try:
            served.lora.read(partial, name)  # refuses a file that is not an adapter of this model, naming why
        except AdapterRejected as exc:
            partial.unlink()
            raise InvalidInput("file", str(exc)) from None
        partial.replace(path)
        if not served.lora.register(name, path):
            raise LoraInUse(f"{name!r} is used by a running generation; retry when it has finished")

    def unload_lora(self, name: str, model: str = "") -> None:
        served = self._lora_model(model)
        assert served.lora is not None  # _lora_model refuses a model without
        if name not in served.lora.files:
            raise UnknownModel(f"name: no adapter named {name!r}; loaded: {', '.join(served.lora.names()) or 'none'}")
        if not served.lora.unregister(name):
            raise LoraInUse(f"{name!r} is used by a running generation; retry when it has finished")

    def _lora_model(self, model: str) -> ServedModel:
        served = self.model_of({"model": model} if model else {})
        if served.lora is None:
            raise InvalidInput(
                "model", f"model {served.name!r} takes no LoRA adapters (export it with --lora or --lora-dir)"
            )
        return served

    def model_of(self, inputs: dict[str, Any]) -> ServedModel:
        """The served model a request names in `model` (empty or absent: the default model)."""
        name = text_field(inputs, "model")
        if not name:
            return self.models[self.default_model]
        if name not in self.models:
            raise UnknownModel(f"model: no model named {name!r}; this server serves {', '.join(self.models)}")
        return self.models[name]

    def steer(self, request_id: str, inputs: dict[str, Any]) -> int:
        """Steers the generation named `request_id` with the inputs given (any of STEERABLE:
        texts, guidance, regions, an inpainting mask), validated as a new request's; returns the
        steer id. Raises InvalidInput, or SteerRefused (NOT_FOUND, FAILED_PRECONDITION)."""
        given = {name for name, value in inputs.items() if value is not None}
        others = sorted(given - set(STEERABLE))
        if others:
            raise InvalidInput(others[0], f"cannot be steered; a steer may change only {', '.join(STEERABLE)}")
        if not given:
            raise InvalidInput("steer", f"needs at least one of {', '.join(STEERABLE)}")
        # fields are range-checked (and regions parsed) with the limits of the job's own model
        # (the default model's when no job has the id: the engine refuses the steer then)
        job = self.engine.registry.running.get(request_id)
        limits = self.models[job.model].limits if job is not None else self.limits
        return self.engine.steer(request_id, parse_steer(inputs, limits), self._check)

    def _check(self, job: Job, request: GenerationRequest) -> None:
        """What parse_request cannot see: texts (each text of a prompt schedule) within the text
        encoder's length, regions' rows within one UNet call, regions on a family that serves them."""
        served = self.models[job.model]
        family = served.limits.family
        if request.loras:
            if served.lora is None or not served.limits.variants[job.variant].lora_unet:
                raise InvalidInput(
                    "loras",
                    f"model {job.model!r} ({job.variant} UNet) takes no LoRA adapters"
                    + ("" if served.lora is not None else "; export it with --lora or --lora-dir"),
                )
            try:
                served.lora.check(request.loras)
            except LoraRefused as exc:
                raise InvalidInput(exc.field, str(exc).split(": ", 1)[1]) from None
        if request.regions is not None and not FAMILIES[family].regions:
            raise InvalidInput(
                "region_prompts", f"regional prompts are not served for family {family} (model {job.model!r})"
            )
        tokenizer = self.models[job.model].tokenizers[job.variant]
        checked = set()
        for _, prompt, negative in scheduled_texts(request):
            for field, text in (("prompt", prompt), ("negative_prompt", negative)):
                if (field, text) not in checked:
                    checked.add((field, text))
                    tokenizer.check(field, text)
        check_regional_job(
            replace(job, request=request, conditioning=None),
            tokenizer.check,
            self.engine.scheduler.config.max_rows,
            self.models[job.model].limits.regions,
        )
