"""The checkpoint's diffusers modules run with torch in the pipeline's own process.

The same calls as the ONNX runner (serving/models/onnx.py), over numpy arrays, plus
`encode_image` for image conditioning. On CUDA: fp16 weights, channels_last, SDPA attention,
and for the UNet and the text encoder one CUDA graph per row bucket, captured at start-up for
the native latent size (the memory plan below). On CPU: fp32 and the same code path without
graphs, so CI runs it.

Every call is padded with zero rows up to its bucket (the smallest that holds its rows; more
rows than the largest run in chunks of it) and runs at that batch size. Rows never mix in these
models (group norm and attention are per row, there is no batch norm), so padding never changes
the real rows. Bucketing also bounds the shapes a kernel ever sees, which is what keeps a row's
result independent of its batch-mates on CPU (see torch_options.CPU_MIN_BUCKET).
"""

from typing import Any
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from families import FAMILIES
from serving.core.errors import ResourceExhausted
from serving.models.torch_options import VAE_BUCKETS, TorchOptions

# Graph capture needs free memory for the capture's own workspace beyond the activations.
CAPTURE_HEADROOM = 0.05


class BucketedCall:
    """fn(*tensors) -> tensor or tuple of tensors, over batch-first numpy inputs padded to a bucket.

    Calls whose inputs match a captured graph (bucket and per-row shapes) replay it; the others
    run eagerly at the bucket's batch size. A CUDA out-of-memory error becomes ResourceExhausted:
    the step's jobs fail with UNAVAILABLE and the server keeps serving."""

    def __init__(self, name: str, fn, buckets: tuple, device: torch.device, dtype: torch.dtype):
        self.name = name
        self.fn = fn
        self.buckets = tuple(buckets)
        self.device = device
        self.dtype = dtype  # floating inputs are cast to it; outputs come back as float32
        self.graphs = {}  # (bucket, per-row shapes and dtypes) -> CapturedGraph
        self.pool: Any = None

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def __call__(self, *arrays) -> tuple:
        rows = len(arrays[0])
        top = self.buckets[-1]
        if rows > top:
            parts = [self(*(a[i : i + top] for a in arrays)) for i in range(0, rows, top)]
            return tuple(np.concatenate(p) for p in zip(*parts))
        bucket = self.bucket(rows)
        try:
            with torch.inference_mode():
                graph = self.graphs.get(_key(bucket, arrays))
                outputs = graph.run(arrays) if graph else _as_tuple(self.fn(*self.padded(arrays, bucket)))
                return tuple(o[:rows].float().cpu().numpy() for o in outputs)
        except torch.cuda.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ResourceExhausted(f"{self.name}: out of GPU memory for {rows} rows (bucket {bucket}): {exc}") from exc

    def padded(self, arrays, bucket: int) -> list:
        """Device tensors of `bucket` rows: the arrays' rows, then zeros."""
        tensors = []
        for a in arrays:
            source = torch.from_numpy(np.ascontiguousarray(a))
            dtype = self.dtype if source.is_floating_point() else source.dtype
            t = torch.zeros((bucket, *source.shape[1:]), dtype=dtype, device=self.device)
            if t.dim() == 4 and t.is_floating_point():
                t = t.contiguous(memory_format=torch.channels_last)
            t[: len(a)].copy_(source)
            tensors.append(t)
        return tensors

    def capture(self, examples) -> None:
        """Captures a graph for the examples' bucket and per-row shapes (CUDA only). Graphs of one
        call share a memory pool: they never run at once, and each call copies its outputs out."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        bucket = self.bucket(len(examples[0]))
        with torch.inference_mode():
            self.graphs[_key(bucket, examples)] = CapturedGraph(self.fn, self.padded(examples, bucket), self.pool)


class CapturedGraph:
    def __init__(self, fn, static_inputs: list, pool):
        self.inputs = static_inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN/cuBLAS choose and allocate here)
            for _ in range(2):
                fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = _as_tuple(fn(*static_inputs))

    def run(self, arrays) -> tuple:
        for static, a in zip(self.inputs, arrays):
            static[: len(a)].copy_(torch.from_numpy(np.ascontiguousarray(a)))
            static[len(a) :].zero_()
        self.graph.replay()
        return self.outputs


def _key(bucket: int, arrays) -> tuple:
    return (bucket,) + tuple((a.shape[1:], np.dtype(a.dtype).str) for a in arrays)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


class TorchModels:
    """The checkpoint's text encoder, UNet and VAE (those in `components`) on one device.

    encode_text(input_ids int64 [N, L], **more token ids) -> {output name: float32 [N, ...]}
    unet(sample [B, C, h, w], timestep float32 [B], encoder_hidden_states [B, L, D], **inputs) -> [B, C', h, w]
        (inputs: the family's other per-row inputs, by name; the module takes them positionally
        in its export contract's order, so the graphs captured for the contract's shapes are
        the ones its calls replay)
    decode(latents [N, C, h, w], scaled) -> float32 [N, H, W, 3] in [0, 1]
    encode_image(images [N, H, W, 3] in [0, 1]) -> (mean, std), scaled, each [N, C, h, w]
    row_cap: the UNet rows per call this device serves (the largest usable bucket)."""

    COMPONENTS = ("text_encoder", "unet", "vae")

    def __init__(
        self,
        checkpoint_dir,
        options: TorchOptions = TorchOptions(),
        components=COMPONENTS,
        log=print,
        plan: bool = True,
        lora_layers: dict | None = None,
    ):
        """plan: make the memory plan now; a pipeline serving several models loads them all first
        and plans after (serving/models/assemble.py plan_gpu_memory), so every plan counts the
        weights of every served checkpoint. lora_layers: the denoiser's layers that take mixed LoRA
        adapters ({name: (in, out)}, pipeline.json's lora_unet_layers), with a bank of
        options.lora_columns columns (families/lora.py StaticBank)."""
        from families import torch_module
        from families.checkpoint import CheckpointInfo
        from families.contracts import component_contracts

        unknown = set(components) - set(self.COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {self.COMPONENTS}")
        self.info = CheckpointInfo.read(Path(checkpoint_dir))
        # the inputs and outputs of each call, in its module's order (max batch sizes unused here)
        self.contracts = component_contracts(self.info, self.info.native_size, defaultdict(lambda: 1))
        self.options = options
        self.device = torch.device(options.device)
        self.dtype = torch.float16 if options.kind == "cuda" else torch.float32
        self.log = log
        if options.kind == "cuda":
            torch.backends.cudnn.benchmark = True  # per shape, chosen once: buckets bound the shapes
        buckets = options.unet_buckets()
        vae_buckets = VAE_BUCKETS[options.kind]
        self.calls = {}
        self.lora = None  # the UNet's StaticBank where it takes LoRA adapters
        with torch.cuda.device(self.device) if options.kind == "cuda" else nullcontext():
            if "text_encoder" in components:
                self.calls["text_encoder"] = self._call(
                    "text_encoder", torch_module("text_encoder", self.info), buckets
                )
            if "unet" in components:
                unet = torch_module("unet", self.info)
                if lora_layers:
                    from families.lora import StaticBank

                    unet = self.lora = StaticBank(unet, lora_layers, options.lora_columns)
                self.calls["unet"] = self._call("unet", unet, buckets)
            if "vae" in components:
                decoder = torch_module("vae_decoder", self.info)  # the encoder shares its AutoencoderKL
                encoder = decoder.encoder()  # the family's (SDXL: with the VAE's latent statistics)
                self.calls["vae_decoder"] = self._call("vae_decoder", decoder, vae_buckets)
                self.calls["vae_encoder"] = self._call("vae_encoder", encoder, vae_buckets)
        self.memory_plan: dict[str, Any] | None = None
        self.row_cap = self.calls["unet"].buckets[-1] if "unet" in self.calls else None
        if plan:
            self.plan_memory()

    def _call(self, name, module, buckets) -> BucketedCall:
        # FP16 on CUDA, except a component its family keeps FP32 (SDXL's VAE with force_upcast)
        dtype = self.dtype if self.contracts[name].fp16 else torch.float32
        module = module.to(device=self.device, dtype=dtype)
        if name != "text_encoder":  # transformers' CLIP uses SDPA by default
            from diffusers.models.attention_processor import AttnProcessor2_0

            module = module.to(memory_format=torch.channels_last)
            if name != "unet" or FAMILIES[self.info.family].sdpa_processor:  # Flux's own processor is SDPA already
                (module.model if name == "unet" else module.vae).set_attn_processor(AttnProcessor2_0())
        fn = torch.compile(module, dynamic=False) if self.options.compile else module
        return BucketedCall(name, fn, buckets, self.device, dtype)

    # --- the models protocol -------------------------------------------------------------------

    def encode_text(self, input_ids, **more_ids):
        contract = self.contracts["text_encoder"]
        outputs = self._run("text_encoder", *self._ordered(contract, {"input_ids": input_ids, **more_ids}))
        return {spec.name: value for spec, value in zip(contract.outputs, outputs)}

    def unet(self, sample, timestep, encoder_hidden_states, **inputs):
        scales = inputs.pop("lora_scales", None)
        layers = [key.removeprefix("lora_A.") for key in inputs if key.startswith("lora_A.")]
        banks = {layer: (inputs.pop(f"lora_A.{layer}"), inputs.pop(f"lora_B.{layer}")) for layer in layers}
        inputs = {
            **inputs,
            "sample": sample,
            "timestep": np.asarray(timestep, np.float32).reshape(-1),
            "encoder_hidden_states": encoder_hidden_states,
        }
        arrays = self._ordered(self.contracts["unet"], inputs)
        if self.lora is not None:  # the bank into the static buffers (when it changed), the scales as the last input
            if scales is None or scales.shape[1] > self.lora.width:
                raise ValueError(
                    f"torch runner: the LoRA bank is {0 if scales is None else scales.shape[1]} columns wide; "
                    f"it holds {self.lora.width} (TorchOptions.lora_columns)"
                )
            self._with_device_call(lambda: self.lora.load(banks, id(next(iter(banks.values()))[0]) if banks else None))
            arrays.append(np.pad(scales, ((0, 0), (0, self.lora.width - scales.shape[1]))).astype(np.float32))
        return self._run("unet", *arrays)[0]

    def decode(self, latents):
        return self._run("vae_decoder", latents)[0]

    def encode_image(self, images):
        return self._run("vae_encoder", images)

    # --- internals -----------------------------------------------------------------------------

    @staticmethod
    def _ordered(contract, inputs: dict) -> list:
        """The contract's inputs in its order; a name it does not take is refused."""
        names = [spec.name for spec in contract.inputs]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise TypeError(f"torch runner: {contract.component} takes no input {unknown[0]!r}; its inputs are {names}")
        return [inputs[n] for n in names if n in inputs]

    def _require(self, name) -> BucketedCall:
        if name not in self.calls:
            raise RuntimeError(f"torch runner: {name} was not loaded (components: {sorted(self.calls)})")
        return self.calls[name]

    def _run(self, name, *arrays) -> tuple:
        return self._with_device(self._require(name), *arrays)

    def _with_device_call(self, fn):
        if self.options.kind == "cuda":
            with torch.cuda.device(self.device):
                return fn()
        return fn()

    def _with_device(self, call, *arrays) -> tuple:
        if self.options.kind == "cuda":
            with torch.cuda.device(self.device):
                return call(*arrays)
        return call(*arrays)

    def native_examples(self, rows: int) -> dict:
        """Zero inputs of `rows` rows at the checkpoint's native size, per call, shaped as the
        engine's calls are (an image-conditioned UNet's concatenated channels, the upscaler's
        noise level), so a graph captured for them is the one those calls find."""
        sizes = {axis: r[1] for axis, r in self.contracts["unet"].axis_ranges.items()}  # opt: the native size
        sizes["batch"] = rows
        examples = {
            name: tuple(np.zeros(contract.shape(spec, sizes), spec.dtype) for spec in contract.inputs)
            for name, contract in self.contracts.items()
            if name in ("text_encoder", "unet", "vae_decoder")
        }
        if self.lora is not None:  # the LoRA scales are the UNet's last input
            examples["unet"] += (np.zeros((rows, self.lora.width), np.float32),)
        return examples

    def plan_memory(self, reserve: int | None = None) -> dict:
        """CUDA: measure the VAE decoder's peak at its largest bucket and keep that much free, then
        capture the text encoder's and the UNet's graphs at the native size, largest bucket first
        (graphs of one call share a pool, so the largest sets the memory). A bucket whose capture
        runs out of memory, or leaves less than the VAE's reserve free, gets no graph, and the
        UNet's calls chunk at the largest captured bucket: its row cap. CPU (or graphs off): no
        graphs and nothing to measure; the row cap is the largest bucket."""
        with torch.cuda.device(self.device) if self.options.kind == "cuda" else nullcontext():
            plan: dict[str, Any] = {
                "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""),
                "weight_bytes": self.weight_bytes(),
                "graphs": {name: [] for name in self.calls},
            }
            if self.options.kind == "cuda" and self.options.cuda_graphs:
                reserve = self.vae_peak_bytes() if reserve is None else reserve
                plan["vae_reserve_bytes"] = reserve
                for name in ("text_encoder", "unet"):
                    if name in self.calls:
                        plan["graphs"][name] = self._capture(name, reserve)
                plan["free_bytes_after_capture"] = free_bytes(self.device)
        self.memory_plan = plan
        self.row_cap = self.calls["unet"].buckets[-1] if "unet" in self.calls else None
        self._report(plan)
        return plan

    def weight_bytes(self) -> dict:
        """Bytes of each call's parameters on its device (the VAE's encoder shares the decoder's):
        a T5-XXL text encoder is about 9.5 GB in fp16, which the text encoder's placement decides."""
        out = {}
        for name, call in self.calls.items():
            module = getattr(call.fn, "_orig_mod", call.fn)  # torch.compile wraps the module
            if name != "vae_encoder":
                out[name] = sum(p.numel() * p.element_size() for p in module.parameters())
        return out

    def vae_peak_bytes(self) -> int:
        """The VAE decoder's peak memory at its largest bucket (CUDA): what graphs must leave free."""
        call = self.calls.get("vae_decoder")
        if call is None:
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        call(*self.native_examples(call.buckets[-1])["vae_decoder"])
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(self.device) - before)

    def _capture(self, name: str, reserve: int) -> list:
        call = self.calls[name]
        kept = []
        for bucket in reversed(call.buckets):
            examples = self.native_examples(bucket)[name]
            try:
                call.capture(examples)
            except torch.cuda.OutOfMemoryError:
                call.graphs.pop(_key(bucket, examples), None)
                torch.cuda.empty_cache()
                continue
            except RuntimeError as exc:  # an op the module runs cannot be captured: serve it eagerly
                self.log(f"torch runner: {name} cannot be captured in a CUDA graph, runs eagerly: {exc}")
                call.graphs.clear()
                return []
            if free_bytes(self.device) < reserve * (1 + CAPTURE_HEADROOM):
                call.graphs.pop(_key(bucket, examples))
                torch.cuda.empty_cache()
                continue
            kept.append(bucket)
        if kept:
            call.buckets = tuple(b for b in call.buckets if b <= max(kept))
        return sorted(kept)

    def _report(self, plan) -> None:
        unet = self.calls.get("unet")
        cap = unet.buckets[-1] if unet else None
        free = plan.get("free_bytes_after_capture")
        free_text = f", {free / 2**30:.1f} GiB free after capture" if free is not None else ""
        reserve = plan.get("vae_reserve_bytes")
        reserve_text = f", VAE reserve {reserve / 2**30:.2f} GiB" if reserve else ""
        weights = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in plan["weight_bytes"].items())
        self.log(
            f"torch runner for {self.info.path.name} on {plan['device']} ({plan['dtype']}): weights {weights}; "
            f"row cap {cap}, buckets {unet.buckets if unet else ()}, graphs {plan['graphs']}{free_text}{reserve_text}"
        )


def free_bytes(device: torch.device) -> int:
    """Device memory an eager allocation can still get: the driver's free memory once torch has
    returned its unused cached blocks (graph pools stay held)."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]
