"""The device a trial trains on: which one, what precision it can run, its compiled steps, and the dataset's
copy on it.

Plain PyTorch, used by the trainer (``provlae.train``), the fused trainer and the benchmarks.
"""
from __future__ import annotations

import types
import warnings

import numpy as np
import torch

from provlae.config import TrialConfig
from provlae.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


def check_precision(cfg: TrialConfig, device: torch.device) -> None:
    """Refuse a dtype the device cannot run, before anything is built."""
    if cfg.dtype != "bfloat16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it")
    if device.type == "cpu" and not _cpu_has_bf16():
        raise ConfigError("dtype bfloat16: this CPU has no bfloat16 support (AVX512-BF16 or AMX); "
                          "use float32, or a GPU")


def _cpu_has_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and convolutions, on or off explicitly (the process-wide switch)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """The trainers' optimizer. On CUDA Adam's fused implementation: its step is a few kernels for all the
    parameters, where the per-tensor loop launches several per tensor (a launch-bound GPU's cost). On a
    CPU PyTorch's default loop, which the CPU's numbers (and the fused groups' bitwise equality with solo
    trials) are made with. A resumed checkpoint keeps the implementation it was saved with."""
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr)


def compiled(fn):
    """``torch.compile(fn)`` over a copy of ``fn`` with a code object of its own.

    Dynamo keeps a function's graphs, and counts its recompiles, per code object; past the limit
    (``recompile_limit``, 8) it silently runs that code eagerly. Trainers compile the same code for each
    family and stage, fused stacks the same vmap wrapper, and a reused Tune actor trains one trial after
    another: with one shared code object, the ninth compiled stage in a process would run eagerly. A copy
    per compiled stage compiles once, and its graphs go with it."""
    code = fn.__code__.replace()  # equal, but another object
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, dynamic=False)


_DEVICE_IMAGES: dict[tuple, tuple[np.ndarray, torch.Tensor]] = {}  # one device copy of a dataset per process


def images_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 (N,H,W,C) images as a tensor: zero-copy over the (memory-mapped) array on CPU, the
    whole set resident on the GPU otherwise (batches are then indexed there). On a GPU the copy is kept
    per process and shared by every trainer over the same array (fused members, reused Tune actors)."""
    with warnings.catch_warnings():  # read-only memory map: the trainer never writes to it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(images)
    if device.type == "cpu":
        return t
    key = (_array_identity(images), str(device))
    if key not in _DEVICE_IMAGES:
        _DEVICE_IMAGES.clear()  # a new dataset replaces the last one (a reused actor's next trial)
        check_device_memory(device, t.numel() * t.element_size(), "the dataset's images")
        _DEVICE_IMAGES[key] = (images, t.to(device))  # the array is kept: its id stays unique
    return _DEVICE_IMAGES[key][1]


def _array_identity(images: np.ndarray) -> tuple:
    """What names an image array: its memory-mapped file (the cache), else the array object itself."""
    filename = getattr(images, "filename", None) or getattr(getattr(images, "base", None), "filename", None)
    return (str(filename), images.shape) if filename else (id(images), images.shape)


def check_device_memory(device: torch.device, nbytes: int, what: str, headroom: float = 1.1) -> None:
    """ConfigError naming ``what`` unless ``nbytes`` (plus 10%) fits in the device's free memory."""
    if device.type != "cuda":
        return
    free, total = available_memory(device)
    if nbytes * headroom > free:
        raise ConfigError(f"{what} ({nbytes / 2**30:.2f} GiB) do not fit on {device} "
                          f"({free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB)")


def available_memory(device: torch.device) -> tuple[int, int]:
    """(bytes this process can still allocate on a CUDA ``device``, its total): what the driver reports free
    plus what PyTorch's caching allocator holds reserved but unused (freed tensors it keeps for reuse)."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + max(0, cached), total


def device_name(device: torch.device) -> str:
    """What a throughput measurement says it ran on: the GPU's name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
