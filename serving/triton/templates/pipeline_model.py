"""Triton python-backend model `pipeline` (decoupled): text -> image with step-level batching.

Copied by `ldm export` into pipeline/1/model.py. `execute` only validates and enqueues; the
engine's worker thread (serving/core/engine.py) runs the denoising loop for all requests together and
answers through each request's response sender: optional progress/preview responses, then the
image with the FINAL flag, or one coded error with the FINAL flag."""
import json
from pathlib import Path
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.core.errors import INTERNAL, coded_message
from serving.core.metrics import MetricsExporter
from serving.models.onnx import LocalUnet, regional_unet
from serving.core.service import PipelineAssets, PipelineService

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
UNET_MODES = ("bls", "inprocess")


class BlsModels:
    """The component models, reached through Triton (BLS)."""

    def __init__(self, unet_local=None, regional_local=None):
        self.unet_local = unet_local
        self.regional_local = regional_local

    def encode_text(self, input_ids):
        return _call("text_encoder", {"input_ids": input_ids}, "last_hidden_state")

    def unet(self, sample, timestep, encoder_hidden_states):
        if self.unet_local is not None:
            return self.unet_local(sample, timestep, encoder_hidden_states)
        inputs = {"sample": sample, "timestep": timestep[:, None], "encoder_hidden_states": encoder_hidden_states}
        return _call("unet", inputs, "noise_pred")

    def regional_unet(self, sample, timestep, encoder_hidden_states, region_weights):
        if self.regional_local is not None:
            return self.regional_local(sample, timestep, encoder_hidden_states, region_weights=region_weights)
        inputs = {"sample": sample, "timestep": timestep[:, None], "encoder_hidden_states": encoder_hidden_states,
                  "region_weights": region_weights}
        return _call("unet_regional", inputs, "noise_pred")

    def decode(self, latents):
        return _call("vae_decoder", {"latents": latents}, "images")


def _call(model, inputs, output):
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=[output],
        inputs=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return pb_utils.get_output_tensor_by_name(response, output).as_numpy()


class TritonSink:
    """Delivers one job's results through its request's response sender."""

    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()

    def progress(self, step, total, preview):
        tensors = [
            pb_utils.Tensor("step", np.array([step], np.int32)),
            pb_utils.Tensor("total_steps", np.array([total], np.int32)),
        ]
        if preview is not None:
            tensors.append(pb_utils.Tensor("preview", np.ascontiguousarray(preview)))
        self.sender.send(pb_utils.InferenceResponse(tensors))

    def finish(self, image, seed):
        tensors = [pb_utils.Tensor("image", np.ascontiguousarray(image)), pb_utils.Tensor("seed", np.array([seed], np.int64))]
        self.sender.send(pb_utils.InferenceResponse(tensors), flags=FINAL)

    def fail(self, code, message):
        error = pb_utils.TritonError(coded_message(code, message), getattr(pb_utils.TritonError, code))
        self.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def cancelled(self):
        return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("pipeline: config.pbtxt must set model_transaction_policy { decoupled: true }")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        unet_mode = params.get("unet", "bls")
        if unet_mode not in UNET_MODES:
            raise pb_utils.TritonModelException(f"pipeline: parameter unet must be one of {UNET_MODES}, got {unet_mode!r}")
        model_dir = Path(args["model_repository"])
        unet_local = regional_local = None
        if unet_mode == "inprocess":
            unet_local = LocalUnet(model_dir.parent / "unet" / "1" / "model.onnx")
            regional_local = regional_unet(model_dir.parent)
        assets = PipelineAssets.read(model_dir / args["model_version"])
        self.service = PipelineService(assets, params, BlsModels(unet_local, regional_local)).start()
        self.families = []  # a MetricFamily must outlive its metrics
        self.exporter = MetricsExporter(self._make_metric)
        self.stop_metrics = threading.Event()
        self.metrics_thread = threading.Thread(target=self._export_metrics, name="ldm-metrics", daemon=True)
        self.metrics_thread.start()

    def _make_metric(self, name, help_text, kind):
        family = pb_utils.MetricFamily(
            name=name, description=help_text,
            kind=pb_utils.MetricFamily.GAUGE if kind == "gauge" else pb_utils.MetricFamily.COUNTER,
        )
        self.families.append(family)
        return family.Metric(labels={"model": "pipeline"})

    def _export_metrics(self):
        while not self.stop_metrics.wait(0.5):
            self.exporter.update(self.service.engine.stats)

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request)
            try:
                self.service.submit({t.name(): t.as_numpy() for t in request.inputs()}, sink)
            except Exception as exc:  # every request ends with a FINAL response, whatever broke
                sink.fail(INTERNAL, f"pipeline could not accept the request: {exc}")
        return None

    def finalize(self):
        self.stop_metrics.set()
        self.metrics_thread.join()
        self.service.stop()
