"""Regression tests of the engine's promise (in process, ONNX Runtime on the tiny checkpoint):
every accepted job ends in exactly one final answer, a failure touches only its own jobs,
the drain answers everyone once, and bad configurations are refused at load, named."""

from dataclasses import replace
import threading

import numpy as np
import pytest

from serving.core.errors import ResourceExhausted
from serving.core.faults import FaultPlan
from serving.core.service import PipelineAssets
from serving.core.text import CachedTextEncoder
from tests.support.fakes import RecordingSink, drain, make_service, request


class BrokenSink(RecordingSink):
    """A client whose stream breaks: finish (or progress) raises, as a response sender does
    once its client is gone."""

    def __init__(self, on="finish"):
        super().__init__()
        self.on = on
        self.calls = []

    def progress(self, step, total, preview, steer_applied=()):
        self.calls.append("progress")
        if self.on == "progress":
            raise RuntimeError("stream closed")
        super().progress(step, total, preview, steer_applied)

    def finish(self, image, seed):
        self.calls.append("finish")
        if self.on == "finish":
            raise RuntimeError("stream closed")
        super().finish(image, seed)

    def fail(self, code, message):
        self.calls.append("fail")
        super().fail(code, message)


@pytest.mark.parametrize("broken_at", [0, 1, 2])
def test_a_finish_that_raises_ends_its_own_job_alone(tiny_repo, models, broken_at):
    service = make_service(tiny_repo, models)
    sinks = [RecordingSink() for _ in range(3)]
    sinks[broken_at] = BrokenSink("finish")
    for i, sink in enumerate(sinks):  # one batch: same steps and size, they finish in one call
        service.submit(request("a red circle", i, steps=3), sink)
    drain(service)
    broken = sinks[broken_at]
    assert (
        broken.calls == ["finish", "fail"]
        and broken.error[0] == "INTERNAL"
        and "could not be delivered" in broken.error[1]
    )
    for sink in sinks:
        if sink is not broken:
            assert sink.image is not None and sink.ends == 1
    assert service.engine.active == [] and service.engine.stats.completed == 2 and service.engine.stats.failed == 1
    later = RecordingSink()  # the engine goes on serving
    service.submit(request("a red circle", 9, steps=2), later)
    drain(service)
    assert later.image is not None and later.ends == 1


def test_a_progress_report_that_raises_ends_its_own_job_alone(tiny_repo, models):
    service = make_service(tiny_repo, models)
    broken, healthy = BrokenSink("progress"), RecordingSink()
    service.submit(request("a red circle", 1, steps=6, progress_every=1), broken)
    service.submit(request("a blue circle", 2, steps=6, progress_every=1), healthy)
    drain(service)
    assert broken.calls == ["progress", "fail"] and broken.error[0] == "INTERNAL" and broken.ends == 1
    assert healthy.image is not None and healthy.ends == 1 and len(healthy.progress_log) == 5


def test_a_failing_preview_ends_its_own_job_alone(tiny_repo, models):
    service = make_service(tiny_repo, models)
    real_preview = service.engine.preview

    def preview(pred_x0, model):
        if pred_x0.shape[1] == 12:  # the 48-pixel job's latents
            raise RuntimeError("preview failed")
        return real_preview(pred_x0, model)

    service.engine.preview = preview
    broken, healthy = RecordingSink(), RecordingSink()
    service.submit(request("a red circle", 1, steps=4, preview_every=1, height=48, width=48), broken)
    service.submit(request("a blue circle", 2, steps=4, preview_every=1), healthy)
    drain(service)
    assert broken.error[0] == "INTERNAL" and "progress report failed" in broken.error[1] and broken.ends == 1
    assert healthy.image is not None and healthy.ends == 1 and len(healthy.previews) == 3


@pytest.mark.parametrize(
    "fault, what",
    [
        ("unet_raise_at_call=2", "denoising step failed"),
        ("vae_raise_at_call=1", "VAE decoding failed"),
        ("text_raise_at_call=1", "text encoding failed"),
    ],
)
def test_a_model_failure_is_internal_for_its_call_alone_and_serving_goes_on(tiny_repo, models, fault, what):
    service = make_service(tiny_repo, FaultPlan(fault).models(models))
    victims = [RecordingSink(), RecordingSink()]
    for i, sink in enumerate(victims):
        service.submit(request("a red circle", i, steps=3), sink)
    drain(service)
    for sink in victims:  # INTERNAL: this request broke a model; the client's retry does not replay it
        assert sink.ends == 1 and sink.error[0] == "INTERNAL" and sink.error[1].startswith(what), sink.error
    later = RecordingSink()
    service.submit(request("a red circle", 0, steps=3), later)
    drain(service)
    assert later.image is not None and later.ends == 1
    assert service.engine.stats.failed == 2


def test_a_passing_shortage_is_unavailable(tiny_repo, models):
    class OutOfMemoryOnce:
        def __init__(self, inner):
            self.inner, self.raised = inner, False

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def unet(self, *args, **kwargs):
            if not self.raised:
                self.raised = True
                raise ResourceExhausted("unet: out of GPU memory for 2 rows")
            return self.inner.unet(*args, **kwargs)

    service = make_service(tiny_repo, OutOfMemoryOnce(models))
    sink = RecordingSink()
    service.submit(request("a red circle", 0, steps=3), sink)
    drain(service)
    assert sink.ends == 1 and sink.error[0] == "UNAVAILABLE"


class BlockingModels:
    """The real models, with one UNet call held until the test releases it (a step in flight)."""

    def __init__(self, inner):
        self.inner = inner
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def unet(self, *args, **kwargs):
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(60), "the test never released the UNet call"
        return self.inner.unet(*args, **kwargs)


def test_stop_never_fails_a_job_the_worker_still_finishes(tiny_repo, models):
    blocking = BlockingModels(models)
    service = make_service(tiny_repo, blocking).start()
    short, long = RecordingSink(), RecordingSink()
    service.submit(request("a red circle", 1, steps=1), short)
    service.submit(request("a blue circle", 2, steps=50), long)
    assert blocking.entered.wait(60)  # the worker is mid-step
    stopper = threading.Thread(target=service.stop, args=(0,))
    stopper.start()
    blocking.release.set()
    stopper.join(60)
    assert not stopper.is_alive()
    # the step in flight completed `short`: its image, never a failure first
    assert short.ends == 1 and short.image is not None and short.error is None
    assert long.ends == 1 and long.error[0] == "UNAVAILABLE" and "shutting down" in long.error[1]


def test_drain_refuses_new_jobs_fails_waiting_ones_and_finishes_those_in_flight(tiny_repo, models):
    service = make_service(tiny_repo, models, max_active=2)
    running = [RecordingSink(), RecordingSink()]
    waiting = RecordingSink()
    for i, sink in enumerate(running + [waiting]):
        service.submit(request("a red circle", i, steps=6), sink)
    service.engine.run_iteration()  # two admitted and stepped once, one waits
    assert len(service.engine.active) == 2
    service.stop(grace_s=3600)  # never started: drains in this thread, long before the grace ends
    assert waiting.ends == 1 and waiting.error == ("UNAVAILABLE", "server is shutting down")
    assert all(s.ends == 1 and s.image is not None for s in running)
    late = RecordingSink()
    service.submit(request("a red circle", 5, steps=2), late)
    assert late.ends == 1 and late.error == ("UNAVAILABLE", "server is shutting down")
    assert not service.accepting and service.engine.active == []


def test_drain_fails_what_is_left_when_the_grace_ends(tiny_repo, models):
    service = make_service(tiny_repo, models)
    sinks = [RecordingSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        service.submit(request("a red circle", i, steps=40), sink)
    service.engine.run_iteration()
    service.stop(grace_s=0)
    for sink in sinks:
        assert sink.ends == 1 and sink.error[0] == "UNAVAILABLE" and "drain grace period passed" in sink.error[1]


def test_drain_grace_comes_from_the_pipeline_parameter(tiny_repo, models):
    assert make_service(tiny_repo, models).drain_grace_s == 120.0
    assert make_service(tiny_repo, models, drain_grace_s=7.5).drain_grace_s == 7.5
    with pytest.raises(ValueError, match=r"parameter drain_grace_s=-1.0 must be"):
        make_service(tiny_repo, models, drain_grace_s=-1)


@pytest.mark.parametrize(
    "params, named",
    [
        (dict(max_active=0), r"parameter max_active=0 must be at least 1"),
        (dict(max_queue=0), r"parameter max_queue=0 must be at least 1"),
        (dict(max_rows=1), r"parameter max_rows=1 must be at least 2"),
        (dict(max_rows=65), r"parameter max_rows=65 exceeds the unet model's max batch size 64"),
        (dict(default_steps=151), r"parameter default_steps=151 must be in \[1, max_steps=150\]"),
        (dict(max_steps=1001), r"parameter max_steps=1001 must be in \[1, 1000\]"),
        (dict(default_steps=0), r"parameter default_steps=0 must be"),
        (dict(default_size=30), r"parameter default_size=30 must be a multiple of 8"),
        (dict(max_size=4096), r"parameter max_size=4096 must be a multiple of 8 in \[8, 64\]"),
        (
            dict(default_size=48, max_size=40),
            r"parameter default_size=48 must be a multiple of 8 in \[8, max_size=40\]",
        ),
        (
            dict(default_guidance_scale=60),
            r"parameter default_guidance_scale=60.0 must be in \[0, max_guidance_scale=50.0\]",
        ),
        (dict(default_eta="nan"), r"parameter default_eta=nan must be in \[0, 1\]"),
        (dict(max_prompt_bytes=0), r"parameter max_prompt_bytes=0 must be at least 1"),
        (dict(default_base_prompt_weight=2), r"parameter default_base_prompt_weight=2.0 must be in \[0, 1\]"),
    ],
)
def test_contradicting_parameters_are_refused_at_load_by_name(tiny_repo, models, params, named):
    with pytest.raises(ValueError, match=named):
        make_service(tiny_repo, models, **params)


def test_text_encoder_calls_are_split_to_its_max_batch(tiny_repo, models):
    sizes = []

    def encode_ids(input_ids):
        sizes.append(len(input_ids))
        if len(input_ids) > 3:  # what Triton answers past a model's max_batch_size
            raise RuntimeError("inference request batch-size must be <= 3")
        return models.encode_text(input_ids)

    tokenizers = make_service(tiny_repo, models).models["tiny"].tokenizers["base"]
    texts = [
        "a blue square",
        "a green triangle at the top",
        "a yellow star",
        "a small purple circle",
        "two cats",
        "an orange square on the right",
        "a white circle",
    ]
    outputs = {"last_hidden_state": "encoder_hidden_states"}
    split = CachedTextEncoder(tokenizers, encode_ids, outputs, max_batch=3).encode(texts)
    whole = CachedTextEncoder(tokenizers, models.encode_text, outputs).encode(texts)
    assert sizes == [3, 3, 1]
    for a, b in zip(split, whole):
        np.testing.assert_array_equal(a["encoder_hidden_states"], b["encoder_hidden_states"])


def test_vae_decoding_is_split_to_its_max_batch(tiny_repo, models):
    class TwoAtATime:
        def __init__(self, inner):
            self.inner, self.sizes = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode(self, latents):
            self.sizes.append(len(latents))
            if len(latents) > 2:
                raise RuntimeError("inference request batch-size must be <= 2")
            return self.inner.decode(latents)

    limited = TwoAtATime(models)
    service = make_service(tiny_repo, limited)
    runner = service.engine.runner.runners["tiny", "base"]
    runner.variant = replace(runner.variant, max_batch={**runner.variant.max_batch, "vae_decoder": 2})
    sinks = [RecordingSink() for _ in range(5)]
    for i, sink in enumerate(sinks):
        service.submit(request("a red circle", i, steps=2), sink)
    drain(service)
    assert limited.sizes == [2, 2, 1]
    assert all(s.image is not None and s.ends == 1 for s in sinks)


def test_every_unet_call_fits_the_row_cap(tiny_repo, models):
    class RowCounter:
        def __init__(self, inner):
            self.inner, self.rows = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def unet(self, sample, *args, **kwargs):
            self.rows.append(len(sample))
            return self.inner.unet(sample, *args, **kwargs)

    counter = RowCounter(models)
    service = make_service(tiny_repo, counter, max_rows=5)
    sinks = [RecordingSink() for _ in range(6)]
    for i, sink in enumerate(sinks):
        service.submit(request("a red circle", i, steps=3, guidance_scale=1.0 if i % 2 else 5.0), sink)
    drain(service)
    assert max(counter.rows) <= 5 and all(s.image is not None for s in sinks)


@pytest.mark.parametrize("field, value", [("prompt", "a" * 4097), ("negative_prompt", "é" * 2049)])
def test_text_longer_than_the_byte_cap_is_refused_before_tokenizing(tiny_repo, models, field, value):
    service = make_service(tiny_repo, models)
    tokenizer = service.models["tiny"].tokenizers["base"].tokenizers["input_ids"]
    calls = []
    real = tokenizer.tokenizer
    tokenizer.tokenizer = lambda *a, **k: calls.append(a) or real(*a, **k)
    sink = RecordingSink()
    arrays = request("a red circle", 1)
    arrays[field] = np.array([value.encode()], object)
    service.submit(arrays, sink)
    assert (
        sink.error[0] == "INVALID_ARG"
        and sink.error[1].startswith(f"{field}: is ")
        and "at most 4096 UTF-8 bytes" in sink.error[1]
    )
    assert calls == []


def test_region_prompt_byte_cap_names_the_region(tiny_repo, models):
    service = make_service(tiny_repo, models, max_prompt_bytes=64)
    sink = RecordingSink()
    arrays = request("a red circle", 1)
    arrays["region_prompts"] = np.array([b"a cat", b"b" * 65], object)
    arrays["region_divisions"] = np.array([b"1,1"], object)
    service.submit(arrays, sink)
    assert sink.error == (
        "INVALID_ARG",
        "region_prompts[1]: is 65 bytes long; at most 64 UTF-8 bytes (max_prompt_bytes)",
    )


@pytest.mark.parametrize("prompt", ["\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \u3000\u00a0\t\n", "\u202e\u2066"])
def test_prompts_of_invisible_characters_are_empty(tiny_repo, models, prompt):
    service = make_service(tiny_repo, models)
    sink = RecordingSink()
    service.submit(request(prompt, 1), sink)
    assert sink.error[0] == "INVALID_ARG" and sink.error[1].startswith("prompt: must not be empty")
    regional = RecordingSink()
    arrays = request("a red circle", 1)
    arrays["region_prompts"] = np.array([b"a cat", prompt.encode()], object)
    arrays["region_divisions"] = np.array([b"1,1"], object)
    service.submit(arrays, regional)
    assert regional.error[0] == "INVALID_ARG" and regional.error[1].startswith(
        "region_prompts: text 1 must not be empty"
    )


def test_assets_carry_each_components_max_batch(tiny_repo):
    # the checks above rely on pipeline.json recording the exported max batch sizes
    info = PipelineAssets.read(tiny_repo / "pipeline" / "1").info
    assert info["variants"]["base"]["max_batch"]["unet"] == 64
