"""Triton python-backend model running one exported component with ONNX Runtime.

Copied by `ldm export` into <component>/1/model.py. Requests that Triton batches together
run as one ONNX Runtime call."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.models.onnx import OnnxComponent


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        onnx_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.component = OnnxComponent(onnx_path)
        declared = ([i["name"] for i in config["input"]], [o["name"] for o in config["output"]])
        actual = (self.component.input_names, self.component.output_names)
        if sorted(declared[0]) != sorted(actual[0]) or sorted(declared[1]) != sorted(actual[1]):
            raise pb_utils.TritonModelException(
                f"{self.name}: config.pbtxt declares inputs {declared[0]} and outputs {declared[1]}, "
                f"but {onnx_path} has inputs {actual[0]} and outputs {actual[1]}; re-run `ldm export`"
            )

    def execute(self, requests):
        inputs = [
            {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.component.input_names}
            for r in requests
        ]
        try:
            outputs = self.component.run_batched(inputs)
        except Exception as exc:
            error = pb_utils.TritonError(f"{self.name}: {exc}", pb_utils.TritonError.INTERNAL)
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in out.items()])
            for out in outputs
        ]
