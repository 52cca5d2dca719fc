"""The pipeline's configuration is read once into a typed object (serving/core/config.py): what
`ldm export` writes parses to its declared types, defaults fill what is absent, a malformed value
is refused naming the parameter, and other readers' parameters are left alone."""

import pytest

from export.cli import pipeline_parameters
from serving.core.config import PipelineConfig


def test_what_export_writes_parses_to_typed_values():
    written = {k: str(v) for k, v in pipeline_parameters(unet="torch", torch_buckets="1,2", torch_compile=True).items()}
    config = PipelineConfig.parse({**written, "native_size": "32", "models": "[]", "scheduler_config": "{}"})
    assert (config.unet, config.torch_buckets, config.torch_compile, config.cuda_graphs) == ("torch", "1,2", True, True)
    assert (config.max_rows, config.max_active, config.max_queue, config.step_batching) == (32, 16, 64, True)
    assert isinstance(config.drain_grace_s, float) and config.drain_grace_s == 120.0
    assert config.default_size is None and config.default_sampler == ""
    assert config.batching().max_rows == 32


def test_absent_and_empty_parameters_take_the_defaults():
    assert PipelineConfig.parse({}) == PipelineConfig() == PipelineConfig.parse({"max_rows": "", "default_size": ""})
    assert PipelineConfig.parse({"default_size": "48"}).default_size == 48


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_rows": "many"}, "max_rows='many' is not a valid int"),
        ({"cuda_graphs": "yes"}, "cuda_graphs='yes' must be true or false"),
        ({"drain_grace_s": "inf"}, "drain_grace_s=inf must be a finite number >= 0"),
        ({"default_region_mode": "pixels"}, "default_region_mode='pixels' must be one of"),
        ({"max_regions": "0"}, "max_regions=0 must be at least 1"),
    ],
)
def test_a_malformed_parameter_is_refused_by_name(params, message):
    with pytest.raises(ValueError, match="pipeline config.pbtxt parameter " + message.replace("(", r"\(")):
        PipelineConfig.parse(params)
