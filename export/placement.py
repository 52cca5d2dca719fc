"""Where the pipeline and the components run, and what tritonserver needs for it.

On GPU (`ldm export --gpu`) every instance group is KIND_GPU. Tensors a python-backend model
exchanges with a GPU model through BLS pass through Triton's CUDA memory pool (per GPU) and
pinned host memory; both must hold the largest call's inputs and outputs, or the python backend
fails the call ("Failed to allocate memory from CUDA memory pool"). Triton's defaults are 64 MiB
and 256 MiB; the sizes here are computed from the components' contracts at their largest batch
and image size, twice over (a request and its reply in flight at once)."""

import numpy as np

from families.contracts import HEIGHT, IMAGE_HEIGHT, IMAGE_WIDTH, WIDTH, ComponentContract

MIB = 2**20
TRITON_DEFAULT_CUDA_POOL = 64 * MIB
TRITON_DEFAULT_PINNED_POOL = 256 * MIB


def call_bytes(contract: ComponentContract, vae_factor: int) -> int:
    """Bytes of one call's inputs and outputs at the contract's largest shapes (a VAE's latent
    and pixel axes follow from each other by the VAE factor)."""
    largest = {axis: r[2] for axis, r in contract.axis_ranges.items()}
    for latent, pixels in ((HEIGHT, IMAGE_HEIGHT), (WIDTH, IMAGE_WIDTH)):
        if latent in largest:
            largest.setdefault(pixels, largest[latent] * vae_factor)
        elif pixels in largest:
            largest[latent] = largest[pixels] // vae_factor
    total = 0
    for spec in contract.inputs + contract.outputs:
        shape = contract.shape(spec, largest)
        total += int(np.prod(shape)) * np.dtype(spec.dtype).itemsize
    return total


def bls_pool_bytes(contracts: dict, served: tuple, vae_factor: int) -> dict:
    """CUDA and pinned memory pool sizes for the components served as models, in MiB multiples."""
    largest = max((call_bytes(contracts[name], vae_factor) for name in served), default=0)
    needed = -(-2 * largest // MIB) * MIB
    return {
        "cuda_memory_pool_bytes": max(needed, TRITON_DEFAULT_CUDA_POOL),
        "pinned_memory_pool_bytes": max(needed, TRITON_DEFAULT_PINNED_POOL),
    }


def server_flags(placement: dict, gpu_count: int) -> list:
    """tritonserver flags for a repository's placement (pipeline.json "placement")."""
    if not placement.get("gpu"):
        return []
    cuda = placement["cuda_memory_pool_bytes"]
    return [f"--cuda-memory-pool-byte-size={i}:{cuda}" for i in range(max(gpu_count, 1))] + [
        f"--pinned-memory-pool-byte-size={placement['pinned_memory_pool_bytes']}"
    ]
