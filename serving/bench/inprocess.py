"""The engine without Triton, behind the client's generate(): what the GPU benchmark measures
when tritonserver cannot start on a machine, and the serving overhead Triton adds otherwise."""

from typing import TYPE_CHECKING
import threading

from tritonclient.utils import InferenceServerException

from serving.core.config import PipelineConfig
from serving.client.kserve import request_arrays
from serving.core.service import PipelineAssets, PipelineService, model_infos
from serving.models.adapters import read_adapter
from serving.models.assemble import RunnerChoice, build_models, plan_gpu_memory


class _Waiter:
    """A job's sink that one client thread waits on."""

    def __init__(self):
        self.done = threading.Event()
        self.image = self.error = None

    def progress(self, step, total, preview, steer_applied=()):
        pass

    def finish(self, image, seed):
        self.image = image
        self.done.set()

    def fail(self, code, message):
        self.error = (code, message)
        self.done.set()

    def cancelled(self):
        return False


class InProcessPipeline:
    """The pipeline model's service, built from an exported repository as the Triton model builds it."""

    def __init__(self, repo, device: str, log=print):
        import json

        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        config = text_format.Parse((repo / "pipeline" / "config.pbtxt").read_text(), mc.ModelConfig())
        params = {k: v.string_value for k, v in config.parameters.items()}
        config = PipelineConfig.parse(params)
        choice = RunnerChoice.from_config(config, device)
        assets = PipelineAssets.read(repo / "pipeline" / "1")
        models = {
            (model, variant): build_models(choice, repo, "1", None, facts, log=log)
            for model, info in model_infos(assets.info).items()
            for variant, facts in info["variants"].items()
        }
        plan_gpu_memory(models.values())
        self.service = PipelineService(assets, config, models, lora_reader=read_adapter).start()
        self.info = json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())

    def client(self):
        return EngineClient(self.service)

    def stop(self):
        self.service.stop()


class EngineClient:
    def __init__(self, service: PipelineService):
        self.service = service

    def generate(self, prompt, **fields):
        waiter = _Waiter()
        self.service.submit(request_arrays(prompt, **fields), waiter)
        waiter.done.wait()
        if waiter.error:
            code, message = waiter.error
            raise InferenceServerException(message, status=code)
        return waiter.image


if TYPE_CHECKING:  # mypy checks the implementations against the core's Protocols (serving/core/interfaces.py)
    from serving.core.interfaces import ResultSink

    _checked: type[ResultSink] = _Waiter
