"""Hopper (sm_90) warp-specialized grouped GEMMs for the routed experts, in Triton's Gluon dialect.

Shape legend as in moe.py: E experts, G planes, P padded sorted rows, DI × DJ one expert's output block, D hidden,
F expert intermediate size, Mb row-block slots.

Why beside moe.py's Triton kernels: on an H100 at V2-Lite shapes Triton's `tl.dot` pipelines reach ~450-480
TFLOP/s on the MoE GEMMs, where a persistent kernel with a dedicated TMA producer warp group, an mbarrier ring and
two consumer warp groups (Gluon: `triton.experimental.gluon`, explicit layouts, shared memory, barriers and
`warp_specialize`) reaches ~550, the rate of cuBLAS on equal-sized groups (benchmarks/README.md, "Gluon weight-
gradient GEMMs"). moe.py calls these when `usable` says the device, dtype, shapes and Triton version fit, and its
Triton kernels otherwise (and on the CPU interpreter, which does not run Gluon).

One module per kernel family, each with its design and measurements in its docstring:
  wgrad.py         weight gradients dWd, dWg / dWu (`weight_grad`)
  hgrad.py         hidden grad z = dout @ Wd[e] (`hidden_grad`)
  row_gemm.py      input grad (`input_grad`) and down projection (`down_proj`, the forward): one kernel body,
                   `_row_gemm`, with two entry points
  gate_up_proj.py  gate/up projection with SwiGLU (`gate_up`, the forward)
and what more than one of them shares:
  _common.py       host side: `usable`, `_desc`, the TMA copy names, HGRAD_BLOCK_M, FEW_ROWS
  _pipeline.py     device side: ring barriers, epilogue stores, row-block tile orders (`_slot_tile`), the
                   ping-pong main loop (`_pp_mainloop`)
Every name used outside the package (moe.py, tests, benchmarks) is re-exported here.

Written against the Gluon API of Triton 3.6 (`usable` checks the version: Gluon is experimental and its API moves
between releases; Triton 3.9, for one, renamed the TMA copies to `tma.async_load` / `async_store`: `_tma_load` /
`_tma_store` pick either name. Under 3.9 every kernel compiles for sm_90 (tests/test_moe_hopper.py compiles them
with the installed Triton, no GPU needed), and tests/test_moe_hopper.py's GPU tests pass on an H100 under 3.6 and
3.9 (58 passed with 3.9's cp312 wheel carried to the device, the same step times as under 3.6); other releases are
not admitted until they have run).
"""

from ._common import FEW_ROWS, HGRAD_BLOCK_M, TESTED_TRITON, _desc, usable
from ._pipeline import _col_halves, _pp_mainloop, _row_block_tile
from .gate_up_proj import GATE_UP_FEW_ROWS, GateUpTile, _gate_up_kernel, gate_up, gate_up_fits, gate_up_tile
from .hgrad import HGRAD_FEW_ROWS, HGRAD_TILE, HgradTile, _hidden_grad_kernel, hidden_grad, hidden_grad_fits
from .row_gemm import (
    IgradTile,
    _down_proj_kernel,
    _input_grad_kernel,
    _split_mainloop,
    down_fits,
    down_proj,
    down_tile,
    igrad_tile,
    input_grad,
    input_grad_fits,
)
from .wgrad import WgradTile, _weight_grad_kernel, weight_grad, wgrad_fits, wgrad_tile

__all__ = [
    "FEW_ROWS", "HGRAD_BLOCK_M", "TESTED_TRITON", "_desc", "usable",
    "_col_halves", "_pp_mainloop", "_row_block_tile",
    "GATE_UP_FEW_ROWS", "GateUpTile", "_gate_up_kernel", "gate_up", "gate_up_fits", "gate_up_tile",
    "HGRAD_FEW_ROWS", "HGRAD_TILE", "HgradTile", "_hidden_grad_kernel", "hidden_grad", "hidden_grad_fits",
    "IgradTile", "_down_proj_kernel", "_input_grad_kernel", "_split_mainloop", "down_fits", "down_proj",
    "down_tile", "igrad_tile", "input_grad", "input_grad_fits",
    "WgradTile", "_weight_grad_kernel", "weight_grad", "wgrad_fits", "wgrad_tile",
]
