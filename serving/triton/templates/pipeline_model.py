"""Triton python-backend model `pipeline` (decoupled): text (and image) -> image with step-level batching.

Copied by `ldm export` into pipeline/1/model.py. `execute` only validates and enqueues; the
engine's worker thread (serving/core/engine.py) runs the denoising loop for all requests together and
answers through each request's response sender: optional progress/preview responses, then the
image with the FINAL flag, or one coded error with the FINAL flag.

Steering (serving/core/steering.py). A generation sent with a request id can be steered while it
runs: a steer message is a request to this model whose request parameter `steer_request_id`
(STEER_PARAMETER) names the generation's request id and whose inputs are any of `prompt`,
`negative_prompt`, `guidance_scale` (prompt schedules allowed), the region inputs
(`region_prompts` with `region_divisions` or `region_masks`, `region_negative_prompts`,
`base_prompt_weight`, `region_mode`: they replace the generation's regions, at its size; a mode
left out keeps its mode) and an inpainting generation's `mask`; validated as a new request's
fields (other inputs: INVALID_ARG). It gets exactly one response, FINAL: `steer_id` INT32 [1]
(1, 2, ... per generation, in arrival order), or an error whose message carries its code as
"[CODE] message" (serving/core/errors.py coded_message; parse_coded_message reads it back):
"[NOT_FOUND] no generation with id 'x'", "[FAILED_PRECONDITION] generation 'x' has finished"
(the last 4096 ended ids are remembered), "[INVALID_ARG] <field>: ...". The engine encodes the new
texts in its next admission batch and uses them from the generation's next step; the response
of the first step that used a steer carries `steer_applied` INT32 [k] (the steer ids first used
by it) next to `step`/`total_steps`, also when progress_every would skip that step (even for the
last step: then just before the image). The 0-based index of that step is `step - 1`. A steer
accepted while the generation runs its last step never applies (the stream then ends without it).

With tritonclient (gRPC streaming; serving/client/kserve.py `LdmClient.steer` does this):
    client.async_stream_infer("pipeline", inputs, request_id="gen-1")             # the generation
    steerer.async_stream_infer("pipeline", [InferInput("prompt", [1], "BYTES") ...],
                               parameters={"steer_request_id": "gen-1"})          # a steer
A cancel message names a request id the same way with `cancel_request_id` (the unary front's).

Drain, cancel and steer messages are control messages: each must carry the control secret in
its parameter `control_secret` (serving/triton/control.py), else it gets one FINAL error
"[PERMISSION_DENIED] ..." and changes nothing. A status message (parameter `engine_status`)
needs none: its one FINAL response says whether the engine admits (`accepting` BOOL [1]) and its
load (`active`, `queued` INT32 [1]), what readiness probes and the gateway ask.

LoRA messages (parameter `lora_action`: list, load, unload; serving/triton/loras.py) are control
messages too: each gets one FINAL response, the adapters as JSON in `loras`, or a coded error. A
load carries its file in the input `lora_file`; it is read on a thread of its own, so generations
keep being admitted meanwhile. This model declares those two tensors itself (auto_complete_config)."""

from typing import TYPE_CHECKING
import json
from pathlib import Path
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.triton.control import STATUS_PARAMETER, authorised, secret_from_env
from serving.triton.drain import DRAIN_PARAMETER
from serving.triton.forwarding import CANCEL_PARAMETER, CancelRegistry
from serving.triton import loras
from serving.core.config import PipelineConfig
from serving.core.errors import INTERNAL, INVALID_ARG, PERMISSION_DENIED, coded_message
from serving.core.metrics import MetricsExporter
from serving.core.request import InvalidInput
from serving.core.service import PipelineAssets, PipelineService, model_infos
from serving.core.steering import STEER_PARAMETER, SteerRefused
from serving.models.adapters import read_adapter
from serving.models.assemble import RunnerChoice, build_models, plan_gpu_memory

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CONTROL_PARAMETERS = (DRAIN_PARAMETER, CANCEL_PARAMETER, STEER_PARAMETER, loras.ACTION_PARAMETER)


class BlsModels:
    """One model's UNet variant's component models (its entry of pipeline.json's variants table),
    reached through Triton (BLS)."""

    def __init__(self, components: dict, text_outputs: list):
        self.components = components
        self.text_outputs = text_outputs  # the text encoder's output names (its family's contract)

    def encode_text(self, input_ids, **more_ids):
        ids = {"input_ids": input_ids, **more_ids}
        return dict(zip(self.text_outputs, _call(self.components["text_encoder"], ids, self.text_outputs)))

    def unet(self, sample, timestep, encoder_hidden_states, **inputs):
        return self._denoise("unet", sample, timestep, encoder_hidden_states, inputs)

    def regional_unet(self, sample, timestep, encoder_hidden_states, **inputs):
        return self._denoise("unet_regional", sample, timestep, encoder_hidden_states, inputs)

    def _denoise(self, component, sample, timestep, encoder_hidden_states, inputs):
        inputs = _per_row({"timestep": timestep, **inputs})
        return _call(
            self.components[component],
            {"sample": sample, "encoder_hidden_states": encoder_hidden_states, **inputs},
            ["noise_pred"],
        )[0]

    def decode(self, latents):
        return _call(self.components["vae_decoder"], {"latents": latents}, ["images"])[0]

    def encode_image(self, images):
        mean, std = _call(self.components["vae_encoder"], {"images": images}, ["latents_mean", "latents_std"])
        return mean, std


def _per_row(inputs: dict) -> dict:
    """One value per row is [B, 1] in the models' Triton configs (the timestep, class labels)."""
    return {name: value[:, None] if value.ndim == 1 else value for name, value in inputs.items()}


def _call(model, inputs, outputs):
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=outputs,
        inputs=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]


class TritonSink:
    """Delivers one job's results through its request's response sender. A request with an id
    can also be cancelled by a cancel message naming it (what the unary front sends)."""

    def __init__(self, request, cancels: CancelRegistry):
        self.request = request
        self.sender = request.get_response_sender()
        self.request_id = request.request_id()
        self.cancels = cancels
        self.cancel_requested = cancels.register(self.request_id) if self.request_id else None
        self.closed = False

    def progress(self, step, total, preview, steer_applied=()):
        tensors = [
            pb_utils.Tensor("step", np.array([step], np.int32)),
            pb_utils.Tensor("total_steps", np.array([total], np.int32)),
        ]
        if preview is not None:
            tensors.append(pb_utils.Tensor("preview", np.ascontiguousarray(preview)))
        if steer_applied:
            tensors.append(pb_utils.Tensor("steer_applied", np.array(steer_applied, np.int32)))
        self.sender.send(pb_utils.InferenceResponse(tensors))

    def finish(self, image, seed):
        tensors = [
            pb_utils.Tensor("image", np.ascontiguousarray(image)),
            pb_utils.Tensor("seed", np.array([seed], np.int64)),
        ]
        self._final(pb_utils.InferenceResponse(tensors))

    def fail(self, code, message):
        self._final(pb_utils.InferenceResponse(error=_error(code, message)))

    def _final(self, response):
        self.closed = True
        try:
            self.sender.send(response, flags=FINAL)
        finally:
            if self.request_id:
                self.cancels.forget(self.request_id, self.cancel_requested)

    def cancelled(self):
        if self.closed:  # asking Triton after the final response would crash tritonserver 2.51
            return False
        requested = self.cancel_requested is not None and self.cancel_requested.is_set()
        return requested or self.request.is_cancelled()


def _error(code, message):
    """A TritonError with the code in its message; Triton has no FAILED_PRECONDITION status."""
    status = getattr(pb_utils.TritonError, code, None)
    return pb_utils.TritonError(
        coded_message(code, message), pb_utils.TritonError.UNKNOWN if status is None else status
    )


def _target(parameters, parameter):
    """The request id a cancel or steer message names in `parameter`, or None."""
    target = parameters.get(parameter)
    return None if target is None else str(target)


def _drain_grace(parameters):
    """The grace in seconds a drain message carries (serving/triton/drain.py), or None."""
    grace = parameters.get(DRAIN_PARAMETER)
    if grace is None:
        return None
    if not 0 <= float(grace) < float("inf"):
        raise ValueError(f"must be a finite number of seconds >= 0, got {grace!r}")
    return float(grace)


def _inputs(request) -> dict:
    return {t.name(): t.as_numpy() for t in request.inputs()}


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Declares the LoRA messages' tensors (serving/triton/loras.py) beside config.pbtxt's."""
        config = auto_complete_model_config.as_dict()
        have_inputs = {i["name"] for i in config.get("input", [])}
        have_outputs = {o["name"] for o in config.get("output", [])}
        for tensor in loras.CONTROL_INPUTS:
            if tensor["name"] not in have_inputs:
                auto_complete_model_config.add_input(dict(tensor))
        for tensor in loras.CONTROL_OUTPUTS:
            if tensor["name"] not in have_outputs:
                auto_complete_model_config.add_output(dict(tensor))
        return auto_complete_model_config

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.cancels = CancelRegistry()  # requests in flight by id, for cancel messages
        self.control_secret = secret_from_env()  # None: every control message is refused
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "pipeline: config.pbtxt must set model_transaction_policy { decoupled: true }"
            )
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # the instance's placement decides the torch runner's device
        device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
        try:
            config = PipelineConfig.parse(params)
            choice = RunnerChoice.from_config(config, device)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"pipeline: {exc}") from None
        model_dir = Path(args["model_repository"])
        assets = PipelineAssets.read(model_dir / args["model_version"])
        models = {
            (model, variant): build_models(
                choice,
                model_dir.parent,
                args["model_version"],
                BlsModels(facts["components"], facts["text_outputs"]),
                facts,
                log=lambda m: print(m, flush=True),
            )
            for model, info in model_infos(assets.info).items()
            for variant, facts in info["variants"].items()
        }
        plan_gpu_memory(models.values())  # once every model's weights are loaded
        self.service = PipelineService(assets, config, models, lora_reader=read_adapter)
        if any(served.lora is not None for served in self.service.models.values()):
            loras.warm_reader()  # on this thread, before the engine's (serving/triton/loras.py says why)
        self.service.start()
        self.families = []  # a MetricFamily must outlive its metrics
        self.exporter = MetricsExporter(self._make_metric)
        self.stop_metrics = threading.Event()
        self.metrics_thread = threading.Thread(target=self._export_metrics, name="ldm-metrics", daemon=True)
        self.metrics_thread.start()

    def _make_metric(self, name, help_text, kind):
        family = pb_utils.MetricFamily(
            name=name,
            description=help_text,
            kind=pb_utils.MetricFamily.GAUGE if kind == "gauge" else pb_utils.MetricFamily.COUNTER,
        )
        self.families.append(family)
        return family.Metric(labels={"model": "pipeline"})

    def _export_metrics(self):
        while True:  # first copy at once: gauges such as the row cap are set before any request
            self.exporter.update(self.service.engine.stats)
            if self.stop_metrics.wait(0.5):
                return

    def execute(self, requests):
        for request in requests:
            parameters = json.loads(request.parameters() or "{}")
            if STATUS_PARAMETER in parameters:
                self._status(request)
                continue
            control = [p for p in CONTROL_PARAMETERS if p in parameters]
            if control and not authorised(parameters, self.control_secret):
                message = (
                    f"{control[0]}: a control message needs the control secret (the gateway or the local operator)"
                )
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(error=_error(PERMISSION_DENIED, message)), flags=FINAL
                )
                continue
            if loras.action_of(parameters) is not None:
                # its inputs are read here (numpy copies): a load is answered on a thread of its
                # own (it reads the file), so generations keep being admitted meanwhile
                job = (parameters, _inputs(request), request.get_response_sender())
                if loras.action_of(parameters) == "load":
                    threading.Thread(target=self._lora, args=job, name="ldm-lora", daemon=True).start()
                else:
                    self._lora(*job)
                continue
            target = _target(parameters, CANCEL_PARAMETER)
            if target is not None:
                self.cancels.cancel(target)
                request.get_response_sender().send(flags=FINAL)
                continue
            try:
                grace = _drain_grace(parameters)
            except ValueError as exc:
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(error=_error(INVALID_ARG, f"{DRAIN_PARAMETER}: {exc}")), flags=FINAL
                )
                continue
            if grace is not None:
                threading.Thread(
                    target=self._drain, args=(grace, request.get_response_sender()), name="ldm-drain", daemon=True
                ).start()
                continue
            target = _target(parameters, STEER_PARAMETER)
            if target is not None:
                self._steer(request, target)
                continue
            sink = TritonSink(request, self.cancels)
            try:
                self.service.submit(_inputs(request), sink, request_id=sink.request_id)
            except Exception as exc:  # every request ends with a FINAL response, whatever broke
                sink.fail(INTERNAL, f"pipeline could not accept the request: {exc}")
        return None

    def _status(self, request):
        """A status message's one FINAL response: whether the engine admits, and its load."""
        stats = self.service.engine.stats
        tensors = [
            pb_utils.Tensor("accepting", np.array([self.service.accepting], np.bool_)),
            pb_utils.Tensor("active", np.array([stats.active], np.int32)),
            pb_utils.Tensor("queued", np.array([stats.queued], np.int32)),
        ]
        request.get_response_sender().send(pb_utils.InferenceResponse(tensors), flags=FINAL)

    def _drain(self, grace_s, sender):
        """Answers a drain message: one empty response once nothing more is admitted, the final
        one once every request taken has its answer."""
        stopping = threading.Thread(target=self.service.stop, args=(grace_s,), name="ldm-drain-stop", daemon=True)
        stopping.start()
        while self.service.accepting and stopping.is_alive():
            time.sleep(0.01)
        try:
            sender.send(pb_utils.InferenceResponse([]))
        finally:
            stopping.join()
            sender.send(flags=FINAL)

    def _steer(self, request, target):
        """A steer message's one FINAL response: its steer id, or a coded error."""
        try:
            steer_id = self.service.steer(target, _inputs(request))
            response = pb_utils.InferenceResponse([pb_utils.Tensor("steer_id", np.array([steer_id], np.int32))])
        except InvalidInput as exc:
            response = pb_utils.InferenceResponse(error=_error(INVALID_ARG, str(exc)))
        except SteerRefused as exc:
            response = pb_utils.InferenceResponse(error=_error(exc.code, str(exc)))
        except Exception as exc:
            response = pb_utils.InferenceResponse(error=_error(INTERNAL, f"pipeline could not steer {target!r}: {exc}"))
        request.get_response_sender().send(response, flags=FINAL)

    def _lora(self, parameters, inputs, sender):
        """A LoRA message's one FINAL response: the adapters after it, or a coded error."""
        try:
            entries = loras.answer(self.service, parameters, inputs)
            response = pb_utils.InferenceResponse([pb_utils.Tensor(loras.LIST_OUTPUT, loras.encode(entries))])
        except loras.LoraMessageError as exc:
            response = pb_utils.InferenceResponse(error=_error(exc.code, str(exc)))
        except Exception as exc:
            response = pb_utils.InferenceResponse(
                error=_error(INTERNAL, f"pipeline could not {loras.action_of(parameters)} the LoRA adapter: {exc}")
            )
        sender.send(response, flags=FINAL)

    def finalize(self):
        self.stop_metrics.set()
        self.metrics_thread.join()
        self.service.stop()


if TYPE_CHECKING:  # mypy checks the implementations against the core's Protocols (serving/core/interfaces.py)
    from serving.core.interfaces import ResultSink, RunnerModels

    _checked: tuple[type[RunnerModels], type[ResultSink]] = (BlsModels, TritonSink)
