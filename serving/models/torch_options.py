"""Options of the torch runner (serving/models/torch_runner.py), readable without importing torch."""

from dataclasses import dataclass

CUDA_MIN_BUCKET = 1
# Measured on the 2-core CI machine (torch 2.13 CPU, MKL/oneDNN, AVX-512, 2 threads): a UNet row
# computed in a batch of 1, 2 or 3 rows differs from the same row in a batch of 4 or more (max abs
# 2e-6 to 4e-6: the timestep-embedding GEMM takes another path below M=4, batch-1 convolutions
# another algorithm, odd batches split across threads differently), while all batches of 4 and
# more agree bit for bit. So on CPU the smallest bucket is 4 and buckets are multiples of it.
CPU_MIN_BUCKET = 4
# The VAE is convolution-bound at image resolution: graphs buy nothing, eager is used, and its
# batches are bucketed separately (finished jobs per step, not UNet rows).
VAE_BUCKETS = {"cuda": (1, 2, 4, 8), "cpu": (4,)}


def default_buckets(device: str, max_rows: int) -> tuple:
    """Powers of two from the device's smallest bucket up to the first that holds max_rows:
    (1, 2, 4, 8, 16, 32) on CUDA and (4, 8, 16, 32) on CPU for the default max_rows=32."""
    bucket = CUDA_MIN_BUCKET if device == "cuda" else CPU_MIN_BUCKET
    buckets = [bucket]
    while buckets[-1] < max_rows:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def parse_buckets(text: str) -> tuple:
    """'1,2,4' -> (1, 2, 4): positive, strictly increasing."""
    try:
        buckets = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ValueError(f"torch_buckets={text!r} must be comma-separated integers") from None
    if not buckets or buckets[0] < 1 or any(b >= c for b, c in zip(buckets, buckets[1:])):
        raise ValueError(f"torch_buckets={text!r} must be positive and increasing")
    return buckets


@dataclass(frozen=True)
class TorchOptions:
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    buckets: tuple | None = None  # UNet/text-encoder row buckets; None: default_buckets(device, max_rows)
    max_rows: int = 32
    cuda_graphs: bool = True  # CUDA only
    compile: bool = False  # torch.compile each module (each bucket compiles on first use: ~1 min on a GPU)
    lora_columns: int = 256  # the torch runner's fixed LoRA bank width: the resident adapters' ranks summed

    @property
    def kind(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def unet_buckets(self) -> tuple:
        return self.buckets or default_buckets(self.kind, self.max_rows)
