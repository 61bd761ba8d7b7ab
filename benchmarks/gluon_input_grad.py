"""Exploratory: a warp-specialized persistent Gluon kernel for the MoE input-gradient GEMM (GPU, bf16).

    python benchmarks/gluon_input_grad.py [--n 4096,16384] [--configs pp128x64x5xc,...]
                                          [--mode bench|check|profile] [--ab auto|CONFIG|none] [--rounds 5]

    dx_a = dg_p @ Wg[e] + du_p @ Wu[e]   for every padded row p of expert e, a = row_P[p]

the product of model/kernels/moe.py's `_moe_input_grad_kernel`, over the same routing metadata. Shapes: P padded
rows, A = N·K assignments, E experts, D hidden, F expert width; dgu_2PF the planes [dg; du] [2, P, F], Wg, Wu
[E, F, D], dxa_AD [A, D]. One reduction of K = 2F in two segments (dg against Wg, then du against Wu), each output
row scattered to its assignment a = row_P[p] (padding rows, row_P = −1, are not stored). Row-block table
block_3Mb [3, Mb]: expert (−1: unused slot), first padded row, rows (128, or 64 for an expert's last block when
that covers it). Not wired into the model.

Design (Triton 3.6's `triton.experimental.gluon`; the hidden-grad kernels of benchmarks/gluon_grouped_gemm.py
with the input grad's two operand pairs and its scatter epilogue; their main loops are imported from there):
  * persistent grid, one program per SM, walking the (row block, column tile) list;
  * a TMA producer (4-warp default partition) fills a STAGES-deep shared-memory ring with [BM, BK] tiles of
    dgu viewed as [2P, F] and [BK, BN] tiles of Wg / Wu viewed as [E·F, D]: per tile first the F / BK steps of
    (dg, Wg), then the F / BK steps of (du, Wu), in one ring (F % BK == 0, so no step crosses an expert);
    each slot has a `ready` mbarrier (TMA byte count) and an `empty` one (released once its wgmma retired);
  * `pp` (ping-pong): two 4-warp consumer warpgroups each own whole 128 x BN tiles and alternate, so one's
    epilogue overlaps the other's main loop (`_pp_mainloop`, turn barriers as in gluon_grouped_gemm.py);
    `sp` (split): both warpgroups on one 128 x BN tile, 64 rows each (`_split_mainloop`), for BN = 256 (a
    128 x 256 fp32 accumulator does not fit one warpgroup's registers);
  * epilogue: the scatter cannot go through a TMA store (Hopper TMA has no row scatter); default: bf16 pointer
    stores straight from the wgmma accumulator registers (4-byte pieces, no shared memory, so the ring gets the
    room: 7 stages of 128 x 128 x 64); `c`: convert to a row-contiguous blocked layout first (through shared
    memory, compiler-managed), 16-byte stores of whole row segments, in EPI_N-column pieces;
  * options (config '[pp|sp]BNxBKxSTAGES' + letters, gluon_grouped_gemm.parse_config's grammar plus a final c):
    h: a half block as a 64-row tile (64-row A loads and wgmmas; `sp` always skips the idle half's wgmmas),
    x: expert-major tile order (one expert after another, its column tiles outer, its row blocks inner; the
    hidden grad's best option), computed in the kernel from the block table and the per-expert row starts and
    counts (no host list, so no device sync in a training step), gN: GROUP_M, eN: epilogue piece width.
Output: per N, the committed Triton launch (moe_gemm_ceiling.triton_launches, on the step's real tensors), each
config and cuBLAS bmm on 64 equal groups, three rounds of do_bench medians, rel.err against an fp32 torch reference
on NaN-poisoned outputs; then (--ab) the whole moe_experts fwd+bwd step, committed vs a config, alternating
rounds in one process, with `model.kernels.moe._launch` wrapped so that a launch of `_moe_input_grad_kernel` runs
this kernel (moe.py unchanged), plus the input-grad kernel's device time inside the step (torch profiler).

Result (H100, benchmarks/README.md "Gluon input-gradient GEMM"): all configs correct (rel.err 1.66e-3, as the
Triton kernel). Best at N=4096 `pp128x64x5xc` 0.501-0.581 ms (median 0.523, 542 TFLOP/s) vs Triton 0.587-0.623
(0.618); at N=16384 `sp256x64x3xc` 1.83-2.07 ms (1.904, 596) vs Triton 1.99-2.20 (2.080); cuBLAS bmm on 64 equal
groups 0.43-0.48 / 1.59-1.74. Inside the step (profiler) the input grad drops 0.58 -> 0.48 ms at N=4096 and 1.98 ->
1.66-1.70 ms at 16384; step medians moved by -0.03 to -0.07 ms at 4096, within the rounds' spread, and not
measurably at 16384. Stores straight from the accumulator write every output sector in two halves and, with rings
deeper than 5 stages, came with up to 2x the DRAM bytes (ncu); the converted epilogue (`c`) is the one to use.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the repo's model/ (not benchmarks/model.py) for moe_hopper here and moe_gemm_ceiling's imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gluon_grouped_gemm import _pp_mainloop, _split_mainloop, _tile_of, parse_config  # noqa: E402

from model.kernels.moe_hopper import _col_halves  # noqa: E402

BM = 128  # rows per row block (moe.py's MoETiles.block_m for 16-bit dtypes)


@gluon.jit
def _ig_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM: gl.constexpr, N_COLS: gl.constexpr,
             GROUP_M: gl.constexpr, EXPERT_ORDER: gl.constexpr):
    """Tile t → (expert or −1, row block, column tile). EXPERT_ORDER: the slots are expert-sorted (used ones
    first), so expert e's run of L = cdiv(count_e, BM) slots from m0 takes the list positions
    [m0·N_COLS, (m0 + L)·N_COLS), column tile outer: t = m0·N_COLS + n·L + (m − m0). Slot t // N_COLS lies in
    that run, and m0 = slot − (its first row − start_e) / BM. Else moe.py's GROUP_M order (`_tile_of`)."""
    if EXPERT_ORDER:
        s = t // N_COLS
        e = gl.load(block_ptr + s)
        m = s
        n = t % N_COLS
        if e >= 0:
            m0 = s - (gl.load(block_ptr + n_mb + s) - gl.load(start_ptr + e)) // BM
            run = (gl.load(count_ptr + e) + BM - 1) // BM
            q = t - m0 * N_COLS
            m = m0 + q % run
            n = q // run
    else:
        m, n = _tile_of(t, n_mb, N_COLS, GROUP_M)
        e = gl.load(block_ptr + m)
    return e, m, n


@gluon.jit
def _ig_producer(a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
                 a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                 BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                 N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                 CONVERT: gl.constexpr, EPI_N: gl.constexpr, ROLE: gl.constexpr):
    """TMA producer: for each used tile, F / BK ring slots of (dg rows, Wg[e] tile), then F / BK of (du rows,
    Wu[e] tile). With HALF_ROWS a half block's A tiles are its 64 rows only (first half of the slot)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    full_bytes: gl.constexpr = a_desc.block_type.nbytes + bg_desc.block_type.nbytes
    half_bytes: gl.constexpr = a_half_desc.block_type.nbytes + bg_desc.block_type.nbytes
    HALF_LIM: gl.constexpr = BM // 2 if HALF_ROWS else 0  # rows <= HALF_LIM: a half block loaded as one
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _ig_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            p0 = gl.load(block_ptr + n_mb + m)
            half = gl.load(block_ptr + 2 * n_mb + m) <= HALF_LIM
            for seg in gl.static_range(2):  # plane 0 = dg against Wg, plane 1 = du against Wu
                for k0 in range(0, F, BK):
                    s = it % STAGES
                    mbarrier.wait(empty_bars.index(s), ((it // STAGES) & 1) ^ 1)  # fresh barriers pass parity 1
                    if half:
                        mbarrier.expect(ready_bars.index(s), half_bytes)
                        tma.async_copy_global_to_shared(a_half_desc, [seg * P + p0, k0], ready_bars.index(s),
                                                        a_bufs.index(s).slice(0, BM // 2))
                    else:
                        mbarrier.expect(ready_bars.index(s), full_bytes)
                        tma.async_copy_global_to_shared(a_desc, [seg * P + p0, k0], ready_bars.index(s),
                                                        a_bufs.index(s))
                    if seg == 0:
                        tma.async_copy_global_to_shared(bg_desc, [e * F + k0, n * BN], ready_bars.index(s),
                                                        b_bufs.index(s))
                    else:
                        tma.async_copy_global_to_shared(bu_desc, [e * F + k0, n * BN], ready_bars.index(s),
                                                        b_bufs.index(s))
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
def _pp_turn(a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, row_ptr, out_ptr, j, k_steps, p0, n0, rows, D,
             ROWS: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, CONVERT: gl.constexpr,
             EPI_N: gl.constexpr, ROLE: gl.constexpr):
    """One ping-pong consumer's tile j (its ring slots start at j·k_steps): main loop, pass the turn once all its
    slots were waited on, retire the last wgmma, release its slot, scatter the ROWS x BN accumulator."""
    acc, prev, it = _pp_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, j * k_steps, k_steps, ROWS, BN, STAGES)
    mbarrier.arrive(turn_bars.index(1 - ROLE))
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(empty_bars.index(prev))
    _scatter(acc, row_ptr, out_ptr, p0, n0, rows, D, CONVERT, EPI_N)


@gluon.jit
def _pp_consumer(a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
                 a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                 BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                 N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                 CONVERT: gl.constexpr, EPI_N: gl.constexpr, ROLE: gl.constexpr):
    """Ping-pong consumer ROLE: takes the used tiles j with j % 2 == ROLE; before its main loop it waits for its
    turn (the other consumer has waited on all slots of the tile before), which keeps every ready barrier within
    one phase of the parity waited for (gluon_grouped_gemm.py's `_pp_consumer` says why)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    HALF_LIM: gl.constexpr = BM // 2 if HALF_ROWS else 0
    k_steps = 2 * (F // BK)
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _ig_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            if j % 2 == ROLE:
                mbarrier.wait(turn_bars.index(ROLE), ((j // 2) & 1) ^ (1 - ROLE))  # consumer 0 passes at once
                p0 = gl.load(block_ptr + n_mb + m)
                rows = gl.load(block_ptr + 2 * n_mb + m)
                if rows <= HALF_LIM:
                    _pp_turn(a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, row_ptr, out_ptr, j, k_steps, p0,
                             n * BN, rows, D, BM // 2, BN, STAGES, CONVERT, EPI_N, ROLE)
                else:
                    _pp_turn(a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, row_ptr, out_ptr, j, k_steps, p0,
                             n * BN, rows, D, BM, BN, STAGES, CONVERT, EPI_N, ROLE)
            j += 1


@gluon.jit
def _split_consumer(a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
                    a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F,
                    BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                    N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                    CONVERT: gl.constexpr, EPI_N: gl.constexpr, ROLE: gl.constexpr):
    """Row half ROLE (64 rows) of every 128 x BN tile (`_split_mainloop` releases each slot; empty count 2). On
    a half block the second warpgroup only passes its slots on (its rows belong to the next expert)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    HALF: gl.constexpr = BM // 2
    k_steps = 2 * (F // BK)
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _ig_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            rows = gl.load(block_ptr + 2 * n_mb + m) - ROLE * HALF
            if rows > 0:
                acc, it = _split_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, it, k_steps * BK, HALF, BN, BK,
                                          STAGES, ROLE)
                _scatter(acc, row_ptr, out_ptr, gl.load(block_ptr + n_mb + m) + ROLE * HALF, n * BN, rows, D,
                         CONVERT, EPI_N)
            else:
                for _ in range(k_steps):
                    s = it % STAGES
                    mbarrier.wait(ready_bars.index(s), (it // STAGES) & 1)
                    mbarrier.arrive(empty_bars.index(s))
                    it += 1


@gluon.jit
def gluon_input_grad_kernel(a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr,
                            out_ptr, n_tiles, n_mb, P, D, F,
                            BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                            N_COLS: gl.constexpr, HALF_ROWS: gl.constexpr, EXPERT_ORDER: gl.constexpr,
                            CONVERT: gl.constexpr, EPI_N: gl.constexpr, SPLIT: gl.constexpr):
    """dx[row[p]] = dg_p @ Wg[e] + du_p @ Wu[e] for the rows p of every used row-block slot (module docstring).
    Default partition (num_warps = 4) = TMA producer; two 4-warp consumers, ping-pong or (SPLIT) on one tile."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(bg_desc.dtype, [STAGES, BK, BN], bg_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2 if SPLIT else 1)
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    fence_async_shared()
    # (the argument tuples written out: a tuple built by concatenation turned the constexprs into tensors)
    if SPLIT:
        gl.warp_specialize([
            (_ig_producer,
             (a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
              a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
              GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, 0)),
            (_split_consumer,
             (a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
              a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
              GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, 0)),
            (_split_consumer,
             (a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
              a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
              GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, 1)),
        ], [4, 4], [232, 232])
    else:
        gl.warp_specialize([
            (_ig_producer,
             (a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
              a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
              GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, 0)),
            (_pp_consumer,
             (a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
              a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
              GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, 0)),
            (_pp_consumer,
             (a_desc, a_half_desc, bg_desc, bu_desc, row_ptr, block_ptr, start_ptr, count_ptr, out_ptr,
              a_bufs, b_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, BN, BK, STAGES,
              GROUP_M, N_COLS, HALF_ROWS, EXPERT_ORDER, CONVERT, EPI_N, 1)),
        ], [4, 4], [232, 232])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    gl_dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl_dtype))


def gluon_input_grad(dgu_2PF, wg_EFD, wu_EFD, row_P, block_3Mb, pad_start_E, count_E, dxa_AD, BN=128, BK=64,
                     STAGES=5, GROUP_M=8, pingpong=True, split=False, half_rows=False, expert_order=True,
                     convert=True, EPI_N=None, n_sm=None, **_):
    """dxa_AD[row_P[p]] = dgu_2PF[0, p] @ wg_EFD[e] + dgu_2PF[1, p] @ wu_EFD[e] over block_3Mb's used slots.
    Keywords as gluon_grouped_gemm.parse_config returns them (NBUF is ignored), plus convert (the `c` epilogue)."""
    _, P, F = dgu_2PF.shape
    E, _, D = wg_EFD.shape
    assert F % BK == 0 and D % BN == 0 and pingpong != split, (F, D, BN, BK)
    n_mb = block_3Mb.shape[1]
    EPI_N = EPI_N or BN
    assert BN // EPI_N in (1, 2) and (convert or EPI_N == BN), (BN, EPI_N, convert)
    dgu_2PF = dgu_2PF.view(2 * P, F)
    a, a_half = _desc(dgu_2PF, [BM, BK]), _desc(dgu_2PF, [BM // 2, BK])
    bg, bu = _desc(wg_EFD.view(E * F, D), [BK, BN]), _desc(wu_EFD.view(E * F, D), [BK, BN])
    n_sm = n_sm or torch.cuda.get_device_properties(dxa_AD.device).multi_processor_count
    n_tiles = n_mb * (D // BN)
    gluon_input_grad_kernel[(min(n_sm, n_tiles),)](
        a, a_half, bg, bu, row_P, block_3Mb, pad_start_E, count_E, dxa_AD, n_tiles, n_mb, P, D, F, BN=BN, BK=BK,
        STAGES=STAGES, GROUP_M=GROUP_M, N_COLS=D // BN, HALF_ROWS=half_rows or split, EXPERT_ORDER=expert_order,
        CONVERT=convert, EPI_N=EPI_N, SPLIT=split, num_warps=4, maxnreg=168)
    return dxa_AD


def config_kwargs(cfg: str) -> dict:
    """'[pp|sp]BNxBKxSTAGES' + options (gluon_grouped_gemm.parse_config: h, x, gN, eN) + a final 'c' for the
    converted epilogue → gluon_input_grad's keywords."""
    kw = parse_config(cfg.removesuffix("c"))
    kw["convert"] = cfg.endswith("c")
    return kw


# ----------------------------------------------------------------------------------------------- benchmark
def input_grad_reference(dgu_2PF, wg_EFD, wu_EFD, row_P, pad_start: list[int], used: int, A: int) -> torch.Tensor:
    """dx [A, D] in fp32, expert by expert over the used padded rows, each row put at its assignment."""
    dx_ref = torch.zeros(A, wg_EFD.shape[2], device=dgu_2PF.device, dtype=torch.float32)
    row = row_P[:used].long()
    for e, p0 in enumerate(pad_start):
        p1 = pad_start[e + 1] if e + 1 < len(pad_start) else used
        valid = row[p0:p1] >= 0
        dx_e = dgu_2PF[0, p0:p1].float() @ wg_EFD[e].float() + dgu_2PF[1, p0:p1].float() @ wu_EFD[e].float()
        dx_ref[row[p0:p1][valid]] = dx_e[valid]
    return dx_ref


def isolated(n: int, configs: list[str], mode: str, rounds: int) -> dict[str, float]:
    """Committed Triton launch, each config and cuBLAS bmm on the input-grad GEMM at N = n, checked, then (mode
    "bench") timed over `rounds` rounds, or (mode "profile") launched once each between cudaProfilerStart/Stop
    (for `ncu --profile-from-start off`). Returns the median ms of each config (inf where its output is wrong)."""
    from kernels import bench
    from moe_gemm_ceiling import dense_launches, flops, problem, triton_launches

    tri, T = triton_launches(n, *problem(n))
    used = int(T["used_rows_1"].item())
    A = T["dxa_AD"].shape[0]
    dx_ref = input_grad_reference(T["dgu_2PF"], T["wg"], T["wu"], T["row_P"], T["pad_start_E"].tolist(), used, A)

    def rel_err(out):  # nan if any assignment row was left unwritten
        return ((out.float() - dx_ref).norm() / dx_ref.norm()).item()

    print(f"\nN={n}: {used} padded rows, {T['block_3Mb'].shape[1]} row-block slots, A={A}")
    T["dxa_AD"].fill_(float("nan"))
    tri["input grad"]()
    torch.cuda.synchronize()
    rows = [("triton (moe.py)", tri["input grad"], rel_err(T["dxa_AD"]))]
    print(f"{rows[0][0]:34s} rel.err {rows[0][2]:.2e}", flush=True)
    for cfg in configs:
        out = torch.full_like(T["dxa_AD"], float("nan"))
        fn = functools.partial(gluon_input_grad, T["dgu_2PF"], T["wg"], T["wu"], T["row_P"], T["block_3Mb"],
                               T["pad_start_E"], T["count_E"], out, **config_kwargs(cfg))
        try:
            for _ in range(3):  # a race or a stale ring phase would rarely show in one launch
                fn()
            torch.cuda.synchronize()
            rows.append((f"gluon {cfg}", fn, rel_err(out)))
            print(f"gluon {cfg:28s} rel.err {rows[-1][2]:.2e}", flush=True)
        except Exception as exc:  # a config that does not compile or launch is reported, the others still run
            print(f"gluon {cfg}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if mode == "profile":
        torch.cuda.cudart().cudaProfilerStart()
        for _, fn, _ in rows:
            fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    if mode != "bench":
        return {}
    fl = flops(n)["input grad"]
    bmm = dense_launches(n)[1]["input grad"]
    times: dict[str, list[float]] = {}
    for rnd in range(rounds):
        for name, fn, _ in rows + [("cuBLAS bmm, 64 equal groups", bmm, 0.0)]:
            ms = bench(fn)
            times.setdefault(name, []).append(ms)
            print(f"{name:34s} {ms:7.3f} ms {fl / ms / 1e9:5.0f} TFLOP/s  (round {rnd})", flush=True)
    ok = {name: err < 1e-2 for name, _, err in rows}
    return {name.removeprefix("gluon "): statistics.median(t) if ok.get(name, True) else float("inf")
            for name, t in times.items()}


class InputGradSwitch:
    """`model.kernels.moe._launch` wrapped: with `cfg` set, a launch of `_moe_input_grad_kernel` runs
    `gluon_input_grad` on the same tensors instead. The per-expert row starts and counts the expert order needs
    are taken from moe.py's `_weight_grad` calls of the same backward (wrapped too: they run first, with them)."""

    def __init__(self, moe):
        self.moe, self.launch, self.weight_grad = moe, moe._launch, moe._weight_grad
        self.cfg, self.expert_rows = None, None
        moe._launch = self
        moe._weight_grad = self.remember_expert_rows

    def remember_expert_rows(self, tile, a_GPI, b_PJ, pad_start_E, count_E, *args, **kwargs):
        self.expert_rows = pad_start_E, count_E
        return self.weight_grad(tile, a_GPI, b_PJ, pad_start_E, count_E, *args, **kwargs)

    def __call__(self, kernel, tile, n_programs, *args, **meta):
        if kernel is self.moe._moe_input_grad_kernel and self.cfg is not None:
            dgu_desc, wg_desc, wu_desc, row_P, block_3Mb, dxa_AD, n_mb, P, D, F = args
            gluon_input_grad(dgu_desc.base.view(2, P, F), wg_desc.base, wu_desc.base, row_P, block_3Mb,
                             *self.expert_rows, dxa_AD, **config_kwargs(self.cfg))
            return
        self.launch(kernel, tile, n_programs, *args, **meta)


def step_ab(n: int, cfg: str, rounds: int):
    """Whole moe_experts fwd+bwd step, committed vs cfg, alternating rounds (order flipped every round)."""
    from kernels import PEAK_TFLOPS, bench, rel_err
    from moe_gemm_ceiling import D, F, K, problem, profile_step, step_fn

    import model.kernels.moe as moe

    switch = moe._launch if isinstance(moe._launch, InputGradSwitch) else InputGradSwitch(moe)
    step = step_fn(*problem(n))
    grads = {}
    for label in ("committed", cfg):
        switch.cfg = None if label == "committed" else cfg
        grads[label] = step()
    errs = [rel_err(a, b) for a, b in zip(grads[cfg], grads["committed"])]
    print(f"\nstep A/B, N={n}: gradients vs committed (x, Wg, Wu, Wd, w) rel.err " +
          ", ".join(f"{e:.1e}" for e in errs))
    times: dict[str, list[float]] = {"committed": [], cfg: []}
    for rnd in range(rounds):
        for label in (("committed", cfg) if rnd % 2 == 0 else (cfg, "committed")):
            switch.cfg = None if label == "committed" else cfg
            times[label].append(bench(step))
    fl = 18 * n * K * D * F
    for label, t in times.items():
        med = statistics.median(t)
        print(f"{label:16s} median {med:.3f} ms ({100 * fl / med / 1e9 / PEAK_TFLOPS:.1f}% of peak), rounds "
              + " ".join(f"{v:.3f}" for v in t), flush=True)
    for label in ("committed", cfg):  # device time of the input-grad kernel inside the step (less noisy)
        switch.cfg = None if label == "committed" else cfg
        prof = profile_step(step)
        ig = sum(v for k, v in prof.items() if "input_grad" in k)
        print(f"{label:16s} profiler: input-grad kernel {ig:.3f} ms per step, all device work "
              f"{sum(prof.values()):.3f} ms")
    switch.cfg = None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="4096,16384")
    parser.add_argument("--configs", default="pp128x64x5xc,pp128x64x5x,pp128x64x4xc,sp256x64x3xc,sp256x64x3c")
    parser.add_argument("--mode", choices=("bench", "check", "profile"), default="bench")
    parser.add_argument("--ab", default="auto", help="config for the step A/B; auto: at each N the fastest config "
                        "there, if faster than the Triton kernel; none: no A/B")
    parser.add_argument("--rounds", type=int, default=5, help="step A/B rounds (isolated timings: 3)")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    ns = [int(v) for v in args.n.split(",") if v]
    configs = [c for c in args.configs.split(",") if c]
    medians = {}
    for n in ns:
        medians[n] = isolated(n, configs, args.mode, 3)
        torch.cuda.empty_cache()
    if args.mode != "bench" or args.ab == "none":
        return
    for n in ns:
        cfg = args.ab
        if cfg == "auto":
            cfg = min(configs, key=lambda c: medians[n].get(c, float("inf")))
            if not medians[n].get(cfg, float("inf")) < medians[n]["triton (moe.py)"]:
                print(f"\nno config faster than the Triton kernel at N={n}: no step A/B")
                continue
        step_ab(n, cfg, args.rounds)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
