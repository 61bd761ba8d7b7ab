"""Hopper Gluon row-block scatter GEMM: the routed experts' input grad and down projection, one kernel body.

Input grad (`input_grad`): dx_a = dg_p @ Wg[e] + du_p @ Wu[e] for the rows p of every used slot, scattered to their
assignments a = row_P[p] (padding rows, row_P = −1, not stored), moe.py's `_moe_input_grad_kernel`'s product. The
producer fills one ring with the F / 64 steps of (dg rows, Wg[e] tile) and then the F / 64 steps of (du rows,
Wu[e] tile) per tile (dgu read as [2P, F], the weights as [E·F, D]); ping-pong consumers on 128 × 128 tiles below
FEW_ROWS rows per expert, both consumers on one 128 × 256 tile (64 rows each, `_split_mainloop`) above; the same
expert tile order (`_slot_tile`). Hopper TMA cannot scatter rows, so the epilogue stores with pointers, after a
layout conversion to 8 consecutive columns per thread (16-byte stores; from the accumulator registers each output
sector was written in two halves). Measured on an H100 (benchmarks/gluon_input_grad.py): N=4096 0.523 ms vs 0.618
for the Triton kernel, N=16384 1.904 vs 2.080; inside the step 0.58 → 0.48 ms at N=4096. The two K segments are
summed in another order than the Triton kernel's (which interleaves them), so dx differs from it in the last bits.

Down projection (`down_proj`, the forward): y_a = h_p @ Wd[e]ᵀ for the rows p of every used slot, scattered to a =
row_P[p], moe.py's `_moe_down_kernel`'s product and rows. Not a copy of the input grad: the same kernel body
(`_row_gemm`; `_input_grad_kernel` and `_down_proj_kernel` are its two entry points, so that profilers tell the
launches apart), parametrised by the number of K segments (SEGMENTS: 2 there, 1 here, K = F) and a transposed
weight tile (B_TRANS: [BN, BK] tiles of Wd viewed as [E·D, F] at (e·D + n·BN, k0), given to wgmma as the permuted
shared-memory view, as the weight grads' A operand; `_b_operand`). F need not be a multiple of 64 here: TMA zero-fills
h and Wd past F alike. Same tile choice as the input grad (`down_tile`). Output identical to the bit to the Triton
kernel's (the same 64-wide steps in order, k16 wgmmas either way). Measured on an H100 (benchmarks/moe_hopper_ab.py,
benchmarks/README.md): in the step 0.283 → 0.255 ms at N=4096 and 1.028 → 0.870 at N=16384 (profiler); alone 0.307
→ 0.274 ms (518 TFLOP/s) and 1.107 → 1.001.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from ._common import FEW_ROWS, HGRAD_BLOCK_M, _desc, _tma_load
from ._pipeline import _b_operand, _col_halves, _pp_mainloop, _release_ring, _ring_barriers, _slot_tile


@gluon.jit
def _split_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, it, K,
                    HALF: gl.constexpr, W: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                    ROLE: gl.constexpr, B_TRANS: gl.constexpr):
    """acc [HALF, W] = this warpgroup's HALF rows of the A tiles @ the first W columns of the B tiles
    (`_b_operand`), over the next K / BK ring slots; every slot is released (empty arrive) once the wgmma reading it
    has retired."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, W, 16])
    acc = gl.zeros([HALF, W], gl.float32, acc_layout)
    prev = 0
    for k0 in range(0, K, BK):
        s = it % STAGES
        mbarrier.wait(ready_bars.index(s), (it // STAGES) & 1)
        a = a_bufs.index(s).slice(ROLE * HALF, HALF, dim=0)
        b = _b_operand(b_bufs, s, B_TRANS)
        if W < b.shape[1]:
            b = b.slice(0, W, dim=1)
        acc = warpgroup_mma(a, b, acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        mbarrier.arrive(empty_bars.index(prev), pred=k0 > 0)
        prev = s
        it += 1
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(empty_bars.index(prev))
    return acc, it


@gluon.jit
def _load_b(b_desc, e, n, k0, D, F, BN: gl.constexpr, bar, buf, B_TRANS: gl.constexpr):
    """Expert e's weight tile for column tile n and reduction step k0: B_TRANS: W viewed as [E·D, F], the [BN, BK]
    tile at (e·D + n·BN, k0) (D % BN == 0 keeps it inside W[e]; TMA zero-fills past F); else W viewed as [E·F, D],
    the [BK, BN] tile at (e·F + k0, n·BN) (F % BK == 0 keeps it inside W[e])."""
    if B_TRANS:
        _tma_load(b_desc, [e * D + n * BN, k0], bar, buf)
    else:
        _tma_load(b_desc, [e * F + k0, n * BN], bar, buf)


@gluon.jit
def _row_gemm_producer(a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
                       a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                       BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                       N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                       CONVERT: gl.constexpr, EPI_N: gl.constexpr, SEGMENTS: gl.constexpr, B_TRANS: gl.constexpr,
                       ROLE: gl.constexpr):
    """TMA producer: for each used tile, per K segment s < SEGMENTS, cdiv(F, BK) ring slots of (A rows s·P + p0 ..,
    the weight tile of segment s: b0_desc, b1_desc; `_load_b`). With HALF_ROWS a half block's A tiles are its 64
    rows only (first half of the slot)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    full_bytes: gl.constexpr = a_desc.block_type.nbytes + b0_desc.block_type.nbytes
    half_bytes: gl.constexpr = a_half_desc.block_type.nbytes + b0_desc.block_type.nbytes
    HALF_LIM: gl.constexpr = BM // 2 if HALF_ROWS else 0  # rows <= HALF_LIM: a half block loaded as one
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            p0 = gl.load(block_ptr + n_mb + m)
            half = gl.load(block_ptr + 2 * n_mb + m) <= HALF_LIM
            for seg in gl.static_range(SEGMENTS):  # input grad: plane 0 = dg against Wg, plane 1 = du against Wu
                for k0 in range(0, F, BK):
                    s = it % STAGES
                    mbarrier.wait(empty_bars.index(s), ((it // STAGES) & 1) ^ 1)  # fresh barriers pass parity 1
                    if half:
                        mbarrier.expect(ready_bars.index(s), half_bytes)
                        _tma_load(a_half_desc, [seg * P + p0, k0], ready_bars.index(s),
                                  a_bufs.index(s).slice(0, BM // 2))
                    else:
                        mbarrier.expect(ready_bars.index(s), full_bytes)
                        _tma_load(a_desc, [seg * P + p0, k0], ready_bars.index(s), a_bufs.index(s))
                    if seg == 0:
                        _load_b(b0_desc, e, n, k0, D, F, BN, ready_bars.index(s), b_bufs.index(s), B_TRANS)
                    else:
                        _load_b(b1_desc, e, n, k0, D, F, BN, ready_bars.index(s), b_bufs.index(s), B_TRANS)
                    it += 1


@gluon.jit
def _scatter_piece(x, row_ptr, out_ptr, p0, n0, rows, D, CONVERT: gl.constexpr):
    """x [R, W] fp32 → out[row[p0 + r], n0 : n0 + W] for r < rows with row ≥ 0 (padding rows skipped), as bf16
    pointer stores: from the accumulator layout (4-byte pieces), or, with CONVERT, after a layout conversion to
    8 consecutive columns per thread (16-byte stores, a warp writing whole 128–512-byte row segments)."""
    R: gl.constexpr = x.shape[0]
    W: gl.constexpr = x.shape[1]
    y = x.to(out_ptr.dtype.element_ty)
    if CONVERT:
        TC: gl.constexpr = 32 if W >= 256 else W // 8  # threads along a row
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TC, TC], [4, 1], [1, 0])
        y = gl.convert_layout(y, layout)
    else:
        layout: gl.constexpr = x.type.layout
    r = gl.arange(0, R, layout=gl.SliceLayout(1, layout))
    a = gl.load(row_ptr + p0 + r, mask=r < rows, other=-1)
    c = gl.arange(0, W, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(a.to(gl.int64) * D, 1) + gl.expand_dims(n0 + c, 0)
    mask = gl.expand_dims(a >= 0, 1) & gl.expand_dims(c < W, 0)
    gl.store(out_ptr + offs, y, mask=mask)


@gluon.jit
def _scatter(acc, row_ptr, out_ptr, p0, n0, rows, D, CONVERT: gl.constexpr, EPI_N: gl.constexpr):
    """acc [R, W] → its rows' assignments, in W / EPI_N column pieces (1 or 2; CONVERT only: the conversion's
    shared-memory scratch is one piece)."""
    if CONVERT and acc.shape[1] > EPI_N:
        lo, hi = _col_halves(acc)
        _scatter_piece(lo, row_ptr, out_ptr, p0, n0, rows, D, CONVERT)
        _scatter_piece(hi, row_ptr, out_ptr, p0, n0 + EPI_N, rows, D, CONVERT)
    else:
        _scatter_piece(acc, row_ptr, out_ptr, p0, n0, rows, D, CONVERT)


@gluon.jit
def _row_gemm_pp_turn(a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, row_ptr, out_ptr, j, k_steps, p0, n0, rows,
                      D, ROWS: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, CONVERT: gl.constexpr,
                      EPI_N: gl.constexpr, B_TRANS: gl.constexpr, ROLE: gl.constexpr):
    """One ping-pong consumer's tile j (its ring slots start at j·k_steps): main loop, pass the turn once all its
    slots were waited on, retire the last wgmma, release its slot, scatter the ROWS x BN accumulator."""
    acc, prev, it = _pp_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, j * k_steps, k_steps, ROWS, BN, STAGES,
                                 B_TRANS)
    mbarrier.arrive(turn_bars.index(1 - ROLE))
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(empty_bars.index(prev))
    _scatter(acc, row_ptr, out_ptr, p0, n0, rows, D, CONVERT, EPI_N)


@gluon.jit
def _row_gemm_pp_consumer(a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
                          a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                          BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                          N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                          CONVERT: gl.constexpr, EPI_N: gl.constexpr, SEGMENTS: gl.constexpr,
                          B_TRANS: gl.constexpr, ROLE: gl.constexpr):
    """Ping-pong consumer ROLE: takes the used tiles j with j % 2 == ROLE; before its main loop it waits for its
    turn (the other consumer has waited on all slots of the tile before), which keeps every ready barrier within
    one phase of the parity waited for (`_hgrad_consumer` says why)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    HALF_LIM: gl.constexpr = BM // 2 if HALF_ROWS else 0
    k_steps = SEGMENTS * ((F + BK - 1) // BK)
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            if j % 2 == ROLE:
                mbarrier.wait(turn_bars.index(ROLE), ((j // 2) & 1) ^ (1 - ROLE))  # consumer 0 passes at once
                p0 = gl.load(block_ptr + n_mb + m)
                rows = gl.load(block_ptr + 2 * n_mb + m)
                if rows <= HALF_LIM:
                    _row_gemm_pp_turn(a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, row_ptr, out_ptr, j,
                                      k_steps, p0, n * BN, rows, D, BM // 2, BN, STAGES, CONVERT, EPI_N, B_TRANS,
                                      ROLE)
                else:
                    _row_gemm_pp_turn(a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, row_ptr, out_ptr, j,
                                      k_steps, p0, n * BN, rows, D, BM, BN, STAGES, CONVERT, EPI_N, B_TRANS, ROLE)
            j += 1


@gluon.jit
def _row_gemm_split_consumer(a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr,
                             out_ptr, a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                             BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                             N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                             CONVERT: gl.constexpr, EPI_N: gl.constexpr, SEGMENTS: gl.constexpr,
                             B_TRANS: gl.constexpr, ROLE: gl.constexpr):
    """Row half ROLE (64 rows) of every 128 x BN tile (`_split_mainloop` releases each slot; empty count 2). On
    a half block the second warpgroup only passes its slots on (its rows belong to the next expert)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    HALF: gl.constexpr = BM // 2
    k_steps = SEGMENTS * ((F + BK - 1) // BK)
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            rows = gl.load(block_ptr + 2 * n_mb + m) - ROLE * HALF
            if rows > 0:
                acc, it = _split_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, it, k_steps * BK, HALF, BN, BK,
                                          STAGES, ROLE, B_TRANS)
                _scatter(acc, row_ptr, out_ptr, gl.load(block_ptr + n_mb + m) + ROLE * HALF, n * BN, rows, D,
                         CONVERT, EPI_N)
            else:
                for _ in range(k_steps):
                    s = it % STAGES
                    mbarrier.wait(ready_bars.index(s), (it // STAGES) & 1)
                    mbarrier.arrive(empty_bars.index(s))
                    it += 1


@gluon.jit
def _row_gemm_consumer(a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
                       a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                       BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                       N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                       CONVERT: gl.constexpr, EPI_N: gl.constexpr, SEGMENTS: gl.constexpr, B_TRANS: gl.constexpr,
                       SPLIT: gl.constexpr, ROLE: gl.constexpr):
    """Consumer ROLE: the split consumer (SPLIT) or the ping-pong one, chosen at compile time (a kernel function
    cannot be held in a variable, so `_row_gemm` names this one in its partition list)."""
    if SPLIT:
        _row_gemm_split_consumer(a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr,
                                 out_ptr, a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                                 BN, BK, STAGES, GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, SEGMENTS,
                                 B_TRANS, ROLE)
    else:
        _row_gemm_pp_consumer(a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr,
                              out_ptr, a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                              BN, BK, STAGES, GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, SEGMENTS,
                              B_TRANS, ROLE)


@gluon.jit
def _row_gemm(a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr, n_tiles,
              n_mb, P, D, F, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
              N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr, CONVERT: gl.constexpr,
              EPI_N: gl.constexpr, SPLIT: gl.constexpr, SEGMENTS: gl.constexpr, B_TRANS: gl.constexpr):
    """out[row[p]] = Σ over the SEGMENTS K segments s of A[s·P + p] @ W_s[e] for the rows p of every used row-block
    slot (module docstring). Default partition (num_warps = 4) = TMA producer; two 4-warp consumers, ping-pong or
    (SPLIT) on one tile. The B ring holds the weight tiles as loaded: [BK, BN], or [BN, BK] with B_TRANS."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    B_ROWS: gl.constexpr = b0_desc.block_type.shape[0]
    B_COLS: gl.constexpr = b0_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b0_desc.dtype, [STAGES, B_ROWS, B_COLS], b0_desc.layout)
    ready_bars, empty_bars, turn_bars = _ring_barriers(STAGES, 2 if SPLIT else 1)
    # (the argument tuples written out: a tuple built by concatenation turned the constexprs into tensors)
    gl.warp_specialize([
        (_row_gemm_producer,
         (a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
          a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
          GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, SEGMENTS, B_TRANS, 0)),
        (_row_gemm_consumer,
         (a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
          a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
          GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, SEGMENTS, B_TRANS, SPLIT, 0)),
        (_row_gemm_consumer,
         (a_desc, a_half_desc, b0_desc, b1_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
          a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
          GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, SEGMENTS, B_TRANS, SPLIT, 1)),
    ], [4, 4], [232, 232])
    _release_ring(ready_bars, empty_bars, STAGES)


@gluon.jit
def _input_grad_kernel(a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr,
                       out_ptr, n_tiles, n_mb, P, D, F,
                       BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                       N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                       CONVERT: gl.constexpr, EPI_N: gl.constexpr, SPLIT: gl.constexpr):
    """dx[row[p]] = dg_p @ Wg[e] + du_p @ Wu[e]: `_row_gemm` with two K segments, a_desc the planes dgu [2, P, F] as
    [2P, F], bg_desc / bu_desc Wg / Wu as [E·F, D] ([BK, BN] tiles). (Its own entry point, like `_down_proj_kernel`,
    so that profilers tell the two launches apart.)"""
    _row_gemm(a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr, n_tiles,
              n_mb, P, D, F, BN, BK, STAGES, GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, SPLIT, 2,
              False)


@gluon.jit
def _down_proj_kernel(a_desc, a_half_desc, b_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr, n_tiles,
                      n_mb, P, D, F,
                      BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                      N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                      CONVERT: gl.constexpr, EPI_N: gl.constexpr, SPLIT: gl.constexpr):
    """y[row[p]] = h_p @ Wd[e]ᵀ: `_row_gemm` with one K segment, a_desc h [P, F], b_desc Wd as [E·D, F] ([BN, BK]
    tiles, transposed in shared memory for the wgmma)."""
    _row_gemm(a_desc, a_half_desc, b_desc, b_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr, n_tiles,
              n_mb, P, D, F, BN, BK, STAGES, GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, SPLIT, 1,
              True)


@dataclass(frozen=True)
class IgradTile:
    """One launch shape of the row-block scatter GEMM (`_row_gemm`: the input grad and the down projection):
    ping-pong consumers on 128 × block_n tiles, or both on one (split)."""

    block_n: int = 128
    """Output columns per tile (over D); divides D."""
    block_k: int = 64
    """Reduction step over F; for the input grad it divides F (a step stays inside one expert's Wg[e] / Wu[e]);
    the down projection's last step may pass F (TMA zero-fills both operands there)."""
    stages: int = 5
    """Depth of the shared-memory ring (deeper rings read up to twice the DRAM bytes: benchmarks/README.md)."""
    split: bool = False
    """Both consumers on one 128 × block_n tile, 64 rows each (for block_n = 256), instead of ping-pong."""
    convert: bool = True
    """Scatter through a row-contiguous layout (16-byte stores) instead of from the accumulator registers."""
    epi_n: int | None = None
    """Columns per scatter piece with `convert` (None: the whole tile width; else block_n / 2)."""
    half_rows: bool = False
    """A half block as 64-row wgmmas (ping-pong; split always skips the idle half). Off: in the N=4096 step at the
    H100's power cap the input grad took 0.536 ms with it against 0.491 without (the down projection 0.256 / 0.261),
    benchmarks/README.md "Session 9"."""
    expert_order: bool = True
    """Tiles one expert after another (`_slot_tile`), else moe.py's GROUP_M order."""
    group_m: int = 8
    """Row blocks per group of the GROUP_M order."""


def igrad_tile(rows_per_expert: float) -> IgradTile:
    """Fastest measured launch shape (H100, V2-Lite, benchmarks/gluon_input_grad.py): ping-pong 128 × 128 × 64 with a
    5-deep ring below FEW_ROWS rows per expert (N=4096: 0.523 ms vs 0.618 for the Triton kernel), split 128 × 256
    with a 3-deep ring above (N=16384: 1.904 vs 2.080)."""
    if rows_per_expert < FEW_ROWS:
        return IgradTile()
    return IgradTile(block_n=256, stages=3, split=True)


def down_tile(rows_per_expert: float) -> IgradTile:
    """The down projection's launch shape: the input grad's choice (`igrad_tile`). Alone on an H100 (3 rounds,
    benchmarks/moe_hopper_ab.py --down-tiles): N=4096 ping-pong 5-deep 0.274 ms (6-deep 0.267, 4-deep 0.297, split
    0.285), N=16384 split 3-deep 1.001 (ping-pong 4-deep 0.998, 5-deep 1.062): within a few % of the best measured,
    not confirmed in the step, so not changed."""
    return igrad_tile(rows_per_expert)


def input_grad_fits(D: int, F: int, block_m: int, tile: IgradTile) -> bool:
    """Row blocks of this kernel's height, reduction steps inside one expert's weights (F % block_k), whole column
    tiles (D % block_n), TMA-aligned rows."""
    return (block_m == HGRAD_BLOCK_M and F % tile.block_k == 0 and D % tile.block_n == 0 and D % 8 == 0
            and F % 8 == 0)


def down_fits(D: int, F: int, block_m: int, tile: IgradTile) -> bool:
    """Row blocks of this kernel's height, whole column tiles (D % block_n: a weight tile stays inside Wd[e]'s D
    rows), TMA-aligned rows. F needs no multiple of block_k: TMA zero-fills h and Wd past F alike."""
    return block_m == HGRAD_BLOCK_M and D % tile.block_n == 0 and D % 8 == 0 and F % 8 == 0


def _check_row_gemm_tile(name: str, tile: IgradTile, D: int, F: int, whole_k: bool) -> int:
    """The tile's scatter piece width (epi_n), after checking that the tile fits D (and F where whole_k)."""
    epi_n = tile.epi_n or tile.block_n
    if ((whole_k and F % tile.block_k) or D % tile.block_n or tile.block_n // epi_n not in (1, 2)
            or (epi_n != tile.block_n and not tile.convert)):
        raise ValueError(f"{name}: {tile} does not fit D={D}, F={F} ({'block_k | F, ' if whole_k else ''}block_n | D; "
                         "two scatter pieces only with convert)")
    return epi_n


def _launch_row_gemm(kernel, a_XF: torch.Tensor, weights: list[torch.Tensor], b_block: list[int], row_P: torch.Tensor,
                     block_3Mb: torch.Tensor, pad_start_E: torch.Tensor, count_E: torch.Tensor, out_AD: torch.Tensor,
                     P: int, F: int, tile: IgradTile, epi_n: int) -> None:
    """One persistent launch of `kernel` over every (row-block slot, column tile): A tiles [128, block_k] of a_XF
    (the segments' planes stacked, [SEGMENTS·P, F]), weight tiles b_block of each 2-D weight view."""
    D = out_AD.shape[1]
    n_mb = block_3Mb.shape[1]
    n_tiles = n_mb * (D // tile.block_n)
    if n_tiles == 0 or P == 0:
        return
    BM = HGRAD_BLOCK_M
    a = _desc(a_XF, [BM, tile.block_k])
    a_half = _desc(a_XF, [BM // 2, tile.block_k])
    b = [_desc(w, b_block) for w in weights]
    n_sm = torch.cuda.get_device_properties(out_AD.device).multi_processor_count
    kernel[(min(n_sm, n_tiles),)](
        a, a_half, *b, row_P, block_3Mb, pad_start_E, count_E, out_AD, n_tiles, n_mb, P, D, F, BN=tile.block_n,
        BK=tile.block_k, STAGES=tile.stages, GROUP_M=tile.group_m, N_COLS=D // tile.block_n,
        HALF_ROWS=tile.half_rows or tile.split, EXPERT_ORDER=tile.expert_order, CONVERT=tile.convert, EPI_N=epi_n,
        SPLIT=tile.split, num_warps=4, maxnreg=168)


def input_grad(dgu_2PF: torch.Tensor, wg_EFD: torch.Tensor, wu_EFD: torch.Tensor, row_P: torch.Tensor,
               block_3Mb: torch.Tensor, pad_start_E: torch.Tensor, count_E: torch.Tensor, dxa_AD: torch.Tensor,
               tile: IgradTile) -> None:
    """dxa_AD[row_P[p]] ← dgu_2PF[0, p] @ wg_EFD[e] + dgu_2PF[1, p] @ wu_EFD[e] for the rows p of every used slot of
    block_3Mb whose row_P is not −1 (moe.py's `_moe_input_grad_kernel`'s product and rows; other rows of dxa_AD
    untouched), in place. The caller checks `usable` and `input_grad_fits`; all tensors contiguous."""
    _, P, F = dgu_2PF.shape
    E, _, D = wg_EFD.shape
    if (dgu_2PF.shape[0] != 2 or wg_EFD.shape != (E, F, D) or wu_EFD.shape != (E, F, D) or row_P.numel() != P
            or dxa_AD.shape[1] != D or block_3Mb.dim() != 2 or block_3Mb.shape[0] != 3 or pad_start_E.numel() != E
            or count_E.numel() != E):
        raise ValueError(f"input_grad: shapes dgu {tuple(dgu_2PF.shape)}, Wg {tuple(wg_EFD.shape)}, Wu "
                         f"{tuple(wu_EFD.shape)}, {row_P.numel()} rows, dx {tuple(dxa_AD.shape)}, block table "
                         f"{tuple(block_3Mb.shape)}, {pad_start_E.numel()} / {count_E.numel()} expert offsets do not "
                         "fit together")
    epi_n = _check_row_gemm_tile("input_grad", tile, D, F, whole_k=True)
    _launch_row_gemm(_input_grad_kernel, dgu_2PF.view(2 * P, F), [wg_EFD.view(E * F, D), wu_EFD.view(E * F, D)],
                     [tile.block_k, tile.block_n], row_P, block_3Mb, pad_start_E, count_E, dxa_AD, P, F, tile, epi_n)


def down_proj(h_PF: torch.Tensor, wd_EDF: torch.Tensor, row_P: torch.Tensor, block_3Mb: torch.Tensor,
              pad_start_E: torch.Tensor, count_E: torch.Tensor, ya_AD: torch.Tensor, tile: IgradTile) -> None:
    """ya_AD[row_P[p]] ← h_PF[p] @ wd_EDF[e]ᵀ for the rows p of every used slot of block_3Mb whose row_P is not −1
    (moe.py's `_moe_down_kernel`'s product and rows; other rows of ya_AD untouched), in place. The caller checks
    `usable` and `down_fits`; all tensors contiguous, 16-byte aligned."""
    P, F = h_PF.shape
    E, D, _ = wd_EDF.shape
    if (wd_EDF.shape != (E, D, F) or row_P.numel() != P or ya_AD.shape[1] != D or block_3Mb.dim() != 2
            or block_3Mb.shape[0] != 3 or pad_start_E.numel() != E or count_E.numel() != E):
        raise ValueError(f"down_proj: shapes h {tuple(h_PF.shape)}, Wd {tuple(wd_EDF.shape)}, {row_P.numel()} rows, "
                         f"y {tuple(ya_AD.shape)}, block table {tuple(block_3Mb.shape)}, {pad_start_E.numel()} / "
                         f"{count_E.numel()} expert offsets do not fit together")
    epi_n = _check_row_gemm_tile("down_proj", tile, D, F, whole_k=False)
    _launch_row_gemm(_down_proj_kernel, h_PF, [wd_EDF.view(E * D, F)], [tile.block_n, tile.block_k], row_P,
                     block_3Mb, pad_start_E, count_E, ya_AD, P, F, tile, epi_n)
