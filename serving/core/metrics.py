"""Which engine statistics are exported as Prometheus metrics, and of what kind.

The Triton model copies EngineStats into python-backend custom metrics (they appear on Triton's
metrics port next to its own nv_* metrics). Counters go up by the change since the last copy."""

from typing import Any

# (metric name, EngineStats attribute, kind, help)
METRICS = (
    ("ldm_queue_length", "queued", "gauge", "requests waiting for admission"),
    ("ldm_active_requests", "active", "gauge", "requests holding latents in the running batch"),
    ("ldm_unet_rows_last_step", "last_rows", "gauge", "UNet rows in the latest denoising call"),
    ("ldm_unet_row_cap", "row_cap", "gauge", "UNet rows per call: max_rows, lowered to what the GPU memory plan fits"),
    ("ldm_step_latency_last_seconds", "last_step_seconds", "gauge", "duration of the latest denoising step"),
    ("ldm_unet_steps_total", "steps", "counter", "denoising iterations (UNet calls)"),
    ("ldm_unet_rows_total", "rows", "counter", "UNet rows over all steps (rows/steps: mean batch)"),
    ("ldm_unet_rows_saved_total", "rows_saved", "counter", "unconditional UNet rows left out by guidance intervals"),
    ("ldm_step_seconds_total", "step_seconds", "counter", "time spent in denoising steps"),
    ("ldm_images_completed_total", "completed", "counter", "images returned"),
    ("ldm_cancellations_total", "cancelled", "counter", "requests cancelled by their client"),
    ("ldm_deadline_expirations_total", "expired", "counter", "requests that ran past their timeout_s"),
    ("ldm_rejections_total", "rejected", "counter", "requests refused because the admission queue was full"),
    ("ldm_failures_total", "failed", "counter", "requests failed by a model error"),
    ("ldm_steers_total", "steers", "counter", "steers of running generations accepted"),
)


class MetricsExporter:
    """Copies stats into metric objects made by `make(name, help, kind) -> object with set/increment`."""

    def __init__(self, make: Any) -> None:
        self.metrics = {name: (attr, kind, make(name, help_text, kind)) for name, attr, kind, help_text in METRICS}
        self.exported = {name: 0 for name in self.metrics}

    def update(self, stats: Any) -> None:
        for name, (attr, kind, metric) in self.metrics.items():
            value = getattr(stats, attr)
            if kind == "gauge":
                metric.set(value)
            elif value > self.exported[name]:
                metric.increment(value - self.exported[name])
            self.exported[name] = value
