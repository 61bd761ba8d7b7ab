"""Hopper Gluon kernel of the routed experts' hidden grad (shape legend: the package docstring).

Hidden grad (`hidden_grad`): z_p = dout_p @ Wd[e] [P, F] for the rows of every used row-block slot (block_3Mb: expert,
first row, rows = 128 or 64), moe.py's `_moe_hidden_grad_kernel`'s product, rows and store pattern (a full block's
128 rows, a half block's 64; padding rows come out 0 from their zero dout rows; rows outside every slot untouched).
Persistent grid, TMA producer (default partition) filling a 6-deep ring of dout [128, 64] and Wd [64, 128] tiles
(Wd read as one [E·D, F] matrix: D % 64 == 0 keeps a step inside Wd[e]; TMA zero-fills past F and clips the store),
two ping-pong consumers on alternate 128 × 128 tiles, each tile stored in 64 × 64 pieces through a 64 × 64 buffer
per consumer (the second row half only for a full block; `HGRAD_TILE`). Tile order: one expert after another, its
column tiles outer and its row blocks inner (`_slot_tile`, computed in the kernel from the block table and
pad_start_E / count_E, so no host-built list and no device sync), which keeps fewer experts' weights in flight per
wave than moe.py's GROUP_M order (also available, `HgradTile`). Measured on an H100 at N=4096 with a 5-deep ring
(benchmarks/gluon_grouped_gemm.py `pp128x64x5x`, the order then a host list): 0.255-0.261 ms vs 0.295-0.318 for the
Triton kernel; inside the step 0.248 vs 0.294 ms at 384 rows per expert, output bit-identical, but 1.027 vs 0.989 at
1536 rows, so moe.py runs it below `HGRAD_FEW_ROWS` rows per expert; the 6-deep ring took off another 6% (`HGRAD_TILE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma_wait

from ._common import HGRAD_BLOCK_M, _desc, _tma_load
from ._pipeline import _epilogue_store, _pp_mainloop, _release_ring, _ring_barriers, _slot_tile


@gluon.jit
def _hgrad_producer(a_desc, a_half_desc, b_desc, c_desc, block_ptr, start_ptr, count_ptr, n_tiles, n_mb, K, a_bufs,
                    b_bufs, c_bufs, ready_bars, empty_bars, turn_bars, GROUP_M: gl.constexpr, N_COLS: gl.constexpr,
                    HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr, ROLE: gl.constexpr):
    """TMA producer: per used tile, K / BK ring slots of dout[p0 :, k0 :] [BM, BK] and Wd[e·K + k0 :, n-tile]
    [BK, BN]. With HALF_ROWS a half block's A tiles are its BM / 2 rows only (the first half of the slot; the ready
    barrier expects those bytes)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.shape[0]
    full_bytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    half_bytes: gl.constexpr = a_half_desc.block_type.nbytes + b_desc.block_type.nbytes
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            p0 = gl.load(block_ptr + n_mb + m)
            if HALF_ROWS:
                half = gl.load(block_ptr + 2 * n_mb + m) <= BM // 2
            else:
                half = False  # a compile-time False: the half-block branch below is not built
            for k0 in range(0, K, BK):
                s = it % STAGES
                mbarrier.wait(empty_bars.index(s), ((it // STAGES) & 1) ^ 1)  # fresh barriers pass parity 1 at once
                if half:
                    mbarrier.expect(ready_bars.index(s), half_bytes)
                    _tma_load(a_half_desc, [p0, k0], ready_bars.index(s), a_bufs.index(s).slice(0, BM // 2))
                else:
                    mbarrier.expect(ready_bars.index(s), full_bytes)
                    _tma_load(a_desc, [p0, k0], ready_bars.index(s), a_bufs.index(s))
                _tma_load(b_desc, [e * K + k0, n * BN], ready_bars.index(s), b_bufs.index(s))
                it += 1


@gluon.jit
def _hgrad_consumer(a_desc, a_half_desc, b_desc, c_desc, block_ptr, start_ptr, count_ptr, n_tiles, n_mb, K, a_bufs,
                    b_bufs, c_bufs, ready_bars, empty_bars, turn_bars, GROUP_M: gl.constexpr, N_COLS: gl.constexpr,
                    HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr, ROLE: gl.constexpr):
    """Ping-pong consumer ROLE: the used tiles j with j % 2 == ROLE, each a whole BM × BN tile, so one consumer's
    epilogue overlaps the other's main loop. The other consumer's ring slots are skipped by counting (every used
    tile takes K / BK slots). The main loops take turns through turn_bars: a consumer starts waiting on its tile's
    slots only after the other has waited on all of its previous tile's, so a ready barrier is never more than one
    phase behind the parity waited for (without the turns consumer 1 waited on slots several phases ahead, took a
    stale phase of the same parity as ready, and the kernel faulted). With HALF_ROWS a half block runs BM / 2-row
    wgmmas; else it runs the full tile (its second half computes the next expert's rows, which are not stored)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.shape[0]
    EPI_N: gl.constexpr = c_bufs.shape[2]
    c_smem = c_bufs.index(ROLE)
    k_steps = K // BK
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            if j % 2 == ROLE:
                mbarrier.wait(turn_bars.index(ROLE), ((j // 2) & 1) ^ (1 - ROLE))  # consumer 0 passes at once
                p0 = gl.load(block_ptr + n_mb + m)
                rows = gl.load(block_ptr + 2 * n_mb + m)
                if HALF_ROWS:
                    half = rows <= BM // 2
                else:
                    half = False  # compile-time: only the full-tile branch is built
                if half:
                    acc_h, prev, it = _pp_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, j * k_steps, k_steps,
                                                      BM // 2, BN, STAGES, False)  # (own name: branches merge by name)
                    mbarrier.arrive(turn_bars.index(1 - ROLE))  # all this tile's slots waited on: the other's turn
                    acc_h = warpgroup_mma_wait(0, deps=[acc_h])
                    mbarrier.arrive(empty_bars.index(prev))
                    _epilogue_store(c_desc, c_smem, acc_h, p0, n * BN, rows, EPI_N)
                else:
                    acc, prev, it = _pp_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, j * k_steps, k_steps,
                                                    BM, BN, STAGES, False)
                    mbarrier.arrive(turn_bars.index(1 - ROLE))
                    acc = warpgroup_mma_wait(0, deps=[acc])
                    mbarrier.arrive(empty_bars.index(prev))
                    _epilogue_store(c_desc, c_smem, acc, p0, n * BN, rows, EPI_N)
            j += 1
    tma.store_wait(0)


@gluon.jit
def _hidden_grad_kernel(a_desc, a_half_desc, b_desc, c_desc, block_ptr, start_ptr, count_ptr, n_tiles, n_mb, K,
                        STAGES: gl.constexpr, GROUP_M: gl.constexpr, N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr,
                        EXPERT_ORDER: gl.constexpr, EPI_M: gl.constexpr):
    """z[p0 : p0 + rows, n-tile] = dout[p0 : p0 + BM] @ Wd[e][:, n-tile] for every used (row-block slot, column
    tile); see the module docstring. a_desc: dout [P, K], block [BM, BK] (a_half_desc: block [BM / 2, BK], read only
    with HALF_ROWS); b_desc: Wd as [E·K, F], block [BK, BN] (K % BK == 0: a step never reads the next expert's rows;
    zero fill past F); c_desc: z [P, F], block [BM / 2, EPI_N] (a tile goes out in 64-row halves, the second only
    for a full block; clipped past F). The producer is the default partition (4 warps), the two consumers 4-warp
    workers (232 registers); an epilogue buffer [EPI_M, EPI_N] per consumer (EPI_M = BM / 2: a tile's two row halves
    go out one after the other, which leaves room for a 6-deep ring)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    EPI_N: gl.constexpr = c_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BK, BN], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, EPI_M, EPI_N], c_desc.layout)
    ready_bars, empty_bars, turn_bars = _ring_barriers(STAGES, 1)
    gl.warp_specialize([
        (_hgrad_producer, (a_desc, a_half_desc, b_desc, c_desc, block_ptr, start_ptr, count_ptr, n_tiles, n_mb, K,
                           a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars, GROUP_M, N_COLS, HALF_ROWS,
                           EXPERT_ORDER, 0)),
        (_hgrad_consumer, (a_desc, a_half_desc, b_desc, c_desc, block_ptr, start_ptr, count_ptr, n_tiles, n_mb, K,
                           a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars, GROUP_M, N_COLS, HALF_ROWS,
                           EXPERT_ORDER, 0)),
        (_hgrad_consumer, (a_desc, a_half_desc, b_desc, c_desc, block_ptr, start_ptr, count_ptr, n_tiles, n_mb, K,
                           a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars, GROUP_M, N_COLS, HALF_ROWS,
                           EXPERT_ORDER, 1)),
    ], [4, 4], [232, 232])
    _release_ring(ready_bars, empty_bars, STAGES)


@dataclass(frozen=True)
class HgradTile:
    """One hidden-grad launch shape: ping-pong consumers on HGRAD_BLOCK_M × block_n tiles."""

    block_n: int = 128
    """Output columns per tile (over F)."""
    block_k: int = 64
    """Reduction step over D; divides D (Wd is read as one [E·D, F] matrix)."""
    stages: int = 5
    """Depth of the shared-memory ring."""
    epi_n: int | None = None
    """Columns per epilogue store piece (None: the whole tile width; else block_n / 2)."""
    epi_m: int = HGRAD_BLOCK_M
    """Rows of each consumer's epilogue buffer: the tile's, or half of them (its row halves stored one after the
    other: a smaller buffer, room for a deeper ring)."""
    half_rows: bool = False
    """A half block as HGRAD_BLOCK_M / 2-row wgmmas (measured no faster on an H100: benchmarks/README.md)."""
    expert_order: bool = True
    """Tiles one expert after another (`_slot_tile`), else moe.py's GROUP_M order."""
    group_m: int = 8
    """Row blocks per group of the GROUP_M order."""


HGRAD_TILE = HgradTile(stages=6, epi_n=64, epi_m=64)
"""moe.py's launch shape: a 6-deep ring beside two 64 × 64 epilogue buffers (208 KB of shared memory; the whole-tile
buffers left room for 5 stages). H100, N = 4096, same-process step A/B at the power cap (9 rounds, outputs identical
to the bit): step 2.886 → 2.817 ms, hidden grad 0.253 → 0.237 ms of device time; N = 8192 5.443 → 5.376, 0.495 →
0.463 (benchmarks/README.md "Session 10"). The 5-deep whole-buffer tile was benchmarks/gluon_grouped_gemm.py's
`pp128x64x5x` (0.255-0.261 ms against 0.295-0.318 for moe.py's Triton kernel)."""

HGRAD_FEW_ROWS = 1024
"""moe.py runs this kernel below this many rows per expert. Device time inside the step on an H100 (V2-Lite shapes,
benchmarks/README.md): 384 rows 0.248 ms against 0.294 for the Triton kernel; 1536 rows 1.027 against 0.989, where
the Triton kernel's 128 × 256 tiles, with a quarter less operand traffic per FLOP, win as the weight gradients'
split tiles do. Not measured in between (1024 was the weight gradients' boundary then, `FEW_ROWS`)."""


def hidden_grad_fits(D: int, F: int, block_m: int, tile: HgradTile = HGRAD_TILE) -> bool:
    """The row blocks are this kernel's tile height, a reduction step stays inside one expert's Wd[e] (D % BK), row
    strides are TMA-aligned (16 bytes: D and F multiples of 8). F needs no multiple of the tile (TMA zero-fills the
    loads past F and clips the stores)."""
    return block_m == HGRAD_BLOCK_M and D % tile.block_k == 0 and D % 8 == 0 and F % 8 == 0


def hidden_grad(dout_PD: torch.Tensor, wd_EDF: torch.Tensor, block_3Mb: torch.Tensor, pad_start_E: torch.Tensor,
                count_E: torch.Tensor, z_PF: torch.Tensor, tile: HgradTile = HGRAD_TILE) -> None:
    """z_PF[p] ← dout_PD[p] @ wd_EDF[e] for the rows of every used slot of the row-block table block_3Mb (e, first
    row, rows: moe.py's `route_metadata`), in place: moe.py's `_moe_hidden_grad_kernel`'s product and rows (a full
    block's BM rows, a half block's BM / 2; rows outside every slot untouched). pad_start_E / count_E: each expert's
    first padded row and rows (the expert order's run lengths). The caller checks `usable` and `hidden_grad_fits`;
    all tensors contiguous, 16-byte aligned."""
    P, D = dout_PD.shape
    E, _, F = wd_EDF.shape
    if (wd_EDF.shape[1] != D or z_PF.shape != (P, F) or block_3Mb.dim() != 2 or block_3Mb.shape[0] != 3
            or pad_start_E.numel() != E or count_E.numel() != E):
        raise ValueError(f"hidden_grad: shapes dout {tuple(dout_PD.shape)}, Wd {tuple(wd_EDF.shape)}, z "
                         f"{tuple(z_PF.shape)}, block table {tuple(block_3Mb.shape)}, {pad_start_E.numel()} / "
                         f"{count_E.numel()} expert offsets do not fit together")
    epi_n = tile.epi_n or tile.block_n
    if D % tile.block_k or tile.block_n // epi_n not in (1, 2) or tile.epi_m not in (HGRAD_BLOCK_M, HGRAD_BLOCK_M // 2):
        raise ValueError(f"hidden_grad: {tile} does not fit D={D} (block_k must divide it) or gives other than 1 or 2 "
                         "store pieces per tile along either side")
    BM = HGRAD_BLOCK_M
    n_mb, n_cols = block_3Mb.shape[1], triton.cdiv(F, tile.block_n)
    n_tiles = n_mb * n_cols
    if n_tiles == 0 or P == 0:
        return
    a = _desc(dout_PD, [BM, tile.block_k])
    a_half = _desc(dout_PD, [BM // 2, tile.block_k])  # read only with half_rows (Triton 3.9 checks its shape anyway)
    b = _desc(wd_EDF.view(E * D, F), [tile.block_k, tile.block_n])
    c = _desc(z_PF, [BM // 2, epi_n])
    n_sm = torch.cuda.get_device_properties(dout_PD.device).multi_processor_count
    _hidden_grad_kernel[(min(n_sm, n_tiles),)](a, a_half, b, c, block_3Mb, pad_start_E, count_E, n_tiles, n_mb, D,
                                               STAGES=tile.stages, GROUP_M=tile.group_m, N_COLS=n_cols,
                                               HALF_ROWS=tile.half_rows, EXPERT_ORDER=tile.expert_order,
                                               EPI_M=tile.epi_m,
                                               num_warps=4, maxnreg=168)
