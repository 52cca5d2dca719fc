"""The core's two outward interfaces (serving/core/interfaces.py) over the tests' fakes: mypy
checks each fake class against its Protocol (scripts/lint.sh); the real implementations carry the
same check in their own modules. A fake whose method is out of step with the Protocol (a progress
without steer_applied) fails the type check, not a steer test that happens to reach it."""

from serving.core.interfaces import ResultSink, RunnerModels
from tests.engine.test_engine import DeadlineSink
from tests.engine.test_engine_reliability import BlockingModels, BrokenSink
from tests.engine.test_fuzz_engine import WaitingSink
from tests.support.fakes import RecordingSink
from tests.support.image_inputs import Sink

SINKS: list[type[ResultSink]] = [RecordingSink, DeadlineSink, BrokenSink, WaitingSink, Sink]
MODELS: list[type[RunnerModels]] = [BlockingModels]


def test_the_fakes_have_every_method_of_their_protocol() -> None:
    for fake in SINKS:
        assert all(callable(getattr(fake, name, None)) for name in ("progress", "finish", "fail", "cancelled")), fake
    for models in MODELS:  # BlockingModels forwards what it does not override to the real models
        assert callable(getattr(models, "unet", None)), models
