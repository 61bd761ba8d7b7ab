"""The host side that more than one of this package's kernels shares (the package docstring has the shape
legend and why these kernels exist): the TMA copies under either Triton release's name, the Triton releases
tested (`usable`), the host TMA descriptor (`_desc`), the row-block height HGRAD_BLOCK_M and the ping-pong /
split boundary FEW_ROWS.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Triton 3.9 renamed the TMA copies (its async_copy_* names raise); one name each for either release.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

TESTED_TRITON = ("3.6.", "3.9.")
"""Triton releases whose Gluon API these kernels were written and tested against."""


def usable(t: torch.Tensor) -> bool:
    """The Gluon kernels can run on t's device and dtype: a Hopper GPU (sm_90), 16-bit floats, a tested Triton."""
    return (t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and _hopper(t.device.index)
            and triton.__version__.startswith(TESTED_TRITON))


@functools.cache
def _hopper(device_index: int | None) -> bool:
    """The CUDA device is sm_90, asked once per device (moe.py asks before each of a step's six GEMMs; the query took
    ~20 µs of host time each on the H100 machine, where the N=4096 step is near host-bound)."""
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@functools.cache
def _shared_layout(block: tuple[int, ...], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The default swizzled shared layout of a 16-bit block, built once per (block, dtype): building it took ~9 of
    the ~13 µs of host time per descriptor, and a training step of the routed experts builds ~22 descriptors."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """Host TMA descriptor of a 2-D 16-bit tensor with the default swizzled shared layout of its block."""
    return TensorDescriptor.from_tensor(t, block, _shared_layout(tuple(block), t.dtype))


HGRAD_BLOCK_M = 128
"""Rows per tile: moe.py's row block (`MoETiles.block_m`) must be this."""

FEW_ROWS = 512
"""Below this many rows per expert the weight grads, the input grad and the down projection run ping-pong tiles,
above it split tiles (a quarter less operand traffic per FLOP). Step A/Bs on an H100 at its power cap (V2-Lite,
benchmarks/README.md): ping-pong wins at 384 rows per expert (N=4096: 2.833 against 2.880 ms all split), split at
576 (N=6144: 4.046 → 3.992) and 768 (N=8192: 5.474 → 5.237, 15 rounds; 5.430 → 5.279 in another process). It was
1024 from burst measurements of each kernel alone."""
