"""Helpers shared by the kernel host functions: device checks and block-size choices."""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def check_inputs(name: str, *tensors: torch.Tensor, dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> None:
    """All tensors on one device that Triton can run on, floating tensors of a supported dtype."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{name}: tensors on different devices ({device} and {t.device})")
        if t.is_floating_point() and t.dtype not in dtypes:
            raise TypeError(f"{name}: dtype {t.dtype} not supported (use one of {dtypes})")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{name}: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
                           "model.kernels is imported to run them on the CPU; or use kernels='torch'")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (`ieee`), not TF32: the fp32 path is the one tests compare."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
