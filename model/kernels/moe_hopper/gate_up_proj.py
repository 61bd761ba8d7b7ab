"""Hopper Gluon kernel of the routed experts' gate/up projection with SwiGLU (the forward).

Gate/up projection (`gate_up`, the forward): g_p = x_p Wg[e]ᵀ, u_p = x_p Wu[e]ᵀ (rounded to the dtype), h_p =
silu(g_p) ⊙ u_p for the rows p of every used slot, moe.py's `_moe_gate_up_kernel`'s product, arithmetic and rows (h
[P, F], and for training the planes gu [2, P, F]; a full block's 128 rows, a half block's 64; padding rows 0).
Hopper TMA cannot gather rows, so moe.py first gathers x into padded-row order (x_PD [P, D], zero padding rows:
`_gather_rows`, x alone, ~0.05 ms at N=4096) and the kernel reads x_PD tiles by TMA: the hidden grad's persistent
ping-pong structure and tile order (`_slot_tile`), with one B tile per ring slot holding Wg[e]'s and Wu[e]'s [64,
64] K-major tiles one above the other, so a single 128-wide wgmma (`_pp_mainloop`, the tile transposed in shared
memory) gives [g | u] as its accumulator's column halves (a 128 × (64 + 64) tile: the hidden grad's operand bytes
per FLOP); the epilogue rounds g and u, computes h as the Triton kernel does, op for op, and stores the three [128,
64] pieces by TMA through one shared-memory buffer per consumer, which leaves room for a 6-deep ring (with few rows
per expert; `gate_up_tile`). h, g, u are identical to the bit to the Triton kernel's. Measured on an H100 (V2-Lite,
benchmarks/moe_hopper_ab.py): at N=4096 inside the step 0.473-0.478 ms against 0.578-0.582 for the Triton kernel (+
the x gather, ~0.045), alone 0.519-0.548 (546-517 TFLOP/s, + 0.051 for the gather) against 0.643-0.681; the step
2.883 → 2.836 and 2.892 → 2.823 ms (do_bench medians, same process), all device work 2.638 → 2.578 (the forward's
peak memory unchanged: y_AD reuses x_PD's memory). N=16384 (`gate_up_tile`: a 4-deep ring there) in the step 2.127 →
1.827 ms (+ 0.19 for the gather), step 9.995 → 9.737 (noisy at this size: the unchanged kernels' device times moved
by up to 5% between arms). The other design, a producer gathering the x rows itself with cp.async (16-byte pointer
copies that arrive on the ring's mbarrier, a proxy fence before each wgmma) instead of TMA, needs no x_PD but was
slower than the Triton kernel (alone 0.664-0.685 ms at N=4096, 0.619 in the step), so it was not kept. Handing
x_PD on to the backward (which gathers x again) would save ~0.05 ms per step at N=4096 for P·D·2 bytes (~106 MB)
of activations per MoE layer: not done.
"""

from __future__ import annotations

from dataclasses import dataclass

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

from ._common import HGRAD_BLOCK_M, _desc, _tma_load, _tma_store
from ._pipeline import _col_halves, _pp_mainloop, _release_ring, _ring_barriers, _slot_tile


@gluon.jit
def _gate_up_producer(a_desc, wg_desc, wu_desc, h_desc, gu_desc, block_ptr, start_ptr, count_ptr, a_bufs, b_bufs,
                      c_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, GROUP_M: gl.constexpr,
                      N_COLS: gl.constexpr, EXPERT_ORDER: gl.constexpr, STORE_GU: gl.constexpr, ROLE: gl.constexpr):
    """TMA producer: per used tile (slot m of expert e, F columns n·FT ..), D / BK ring slots of x_PD[p0 :, k0 :]
    [BM, BK] and the weight tiles Wg[e], Wu[e] [FT, BK] at (e·F + n·FT, k0) into the slot's B tile rows [0, FT) and
    [FT, 2·FT): one [2·FT, BK] K-major operand, so g and u come out of one 2·FT-wide wgmma as its accumulator's
    column halves."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    FT: gl.constexpr = wg_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + 2 * wg_desc.block_type.nbytes
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            p0 = gl.load(block_ptr + n_mb + m)
            f0 = e * F + n * FT
            for k0 in range(0, D, BK):
                s = it % STAGES
                mbarrier.wait(empty_bars.index(s), ((it // STAGES) & 1) ^ 1)  # fresh barriers pass parity 1 at once
                mbarrier.expect(ready_bars.index(s), nbytes)
                _tma_load(a_desc, [p0, k0], ready_bars.index(s), a_bufs.index(s))
                _tma_load(wg_desc, [f0, k0], ready_bars.index(s), b_bufs.index(s).slice(0, FT))
                _tma_load(wu_desc, [f0, k0], ready_bars.index(s), b_bufs.index(s).slice(FT, FT))
                it += 1


@gluon.jit
def _gate_up_store(desc, buf, x, p0, f0, rows):
    """x [BM, FT] → buf → TMA store at (p0, f0) in BM / 2-row pieces, the second only if the block has the rows (no
    wait: the caller has waited for the stores that last read buf)."""
    HALF: gl.constexpr = desc.block_type.shape[0]
    buf.store(x.to(desc.dtype))
    fence_async_shared()
    _tma_store(desc, [p0, f0], buf.slice(0, HALF))
    if rows > HALF:
        _tma_store(desc, [p0 + HALF, f0], buf.slice(HALF, HALF))


@gluon.jit
def _gate_up_epilogue(acc, h_desc, gu_desc, c_bufs, ROLE: gl.constexpr, p0, f0, rows, P, STORE_GU: gl.constexpr):
    """acc [BM, 2·FT] = [g | u] → g, u rounded to the activation dtype, h = silu(g) · u (in fp32 from the rounded
    g, u, then rounded: moe.py's `_gate_up_tile`, op for op), stored to h [P, F] and (STORE_GU) the planes gu as
    [2P, F], through this consumer's NB epilogue buffers (u reuses h's buffer with 2, all three share one with 1,
    each after waiting for the stores that read it); columns past F clipped by TMA."""
    g, u = _col_halves(acc)
    g = g.to(h_desc.dtype)
    u = u.to(h_desc.dtype)
    g32 = g.to(gl.float32)
    h = g32 * (1 / (1 + gl.exp(-g32))) * u.to(gl.float32)  # tl.sigmoid's formula
    NB: gl.constexpr = c_bufs.shape[0] // 2
    HALF: gl.constexpr = h_desc.block_type.shape[0]
    tma.store_wait(0)  # this consumer's previous tile's stores have read its buffers
    _gate_up_store(h_desc, c_bufs.index(ROLE * NB), h, p0, f0, rows)
    if STORE_GU:
        if NB == 1:
            tma.store_wait(0)
        _gate_up_store(gu_desc, c_bufs.index(ROLE * NB + 1 % NB), g, p0, f0, rows)
        if NB == 1:
            tma.store_wait(0)
        elif NB == 2:  # h's stores done, g's (one per piece) may still run
            if rows > HALF:
                tma.store_wait(2)
            else:
                tma.store_wait(1)
        _gate_up_store(gu_desc, c_bufs.index(ROLE * NB + 2 % NB), u, P + p0, f0, rows)


@gluon.jit
def _gate_up_consumer(a_desc, wg_desc, wu_desc, h_desc, gu_desc, block_ptr, start_ptr, count_ptr, a_bufs, b_bufs,
                      c_bufs, ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, GROUP_M: gl.constexpr,
                      N_COLS: gl.constexpr, EXPERT_ORDER: gl.constexpr, STORE_GU: gl.constexpr, ROLE: gl.constexpr):
    """Ping-pong consumer ROLE: the used tiles j with j % 2 == ROLE, whole BM × 2·FT tiles (`_pp_mainloop` with the
    B tile transposed in shared memory), main loops in turns (`_hgrad_consumer` says why). A half block runs the
    full tile (its second half computes rows that are not stored)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    FT: gl.constexpr = wg_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    k_steps = D // BK
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, m, n = _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM, N_COLS, GROUP_M, EXPERT_ORDER)
        if e >= 0:
            if j % 2 == ROLE:
                mbarrier.wait(turn_bars.index(ROLE), ((j // 2) & 1) ^ (1 - ROLE))  # consumer 0 passes at once
                acc, prev, it = _pp_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, j * k_steps, k_steps, BM,
                                             2 * FT, STAGES, True)
                mbarrier.arrive(turn_bars.index(1 - ROLE))  # all this tile's slots waited on: the other's turn
                acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(empty_bars.index(prev))
                _gate_up_epilogue(acc, h_desc, gu_desc, c_bufs, ROLE, gl.load(block_ptr + n_mb + m), n * FT,
                                  gl.load(block_ptr + 2 * n_mb + m), P, STORE_GU)
            j += 1
    tma.store_wait(0)


@gluon.jit
def _gate_up_kernel(a_desc, wg_desc, wu_desc, h_desc, gu_desc, block_ptr, start_ptr, count_ptr, n_tiles, n_mb, P, D,
                    F, STAGES: gl.constexpr, GROUP_M: gl.constexpr, N_COLS: gl.constexpr,
                    EXPERT_ORDER: gl.constexpr, STORE_GU: gl.constexpr, EPI_BUFS: gl.constexpr):
    """g = x_p Wg[e]ᵀ, u = x_p Wu[e]ᵀ, h = silu(g) ⊙ u for the rows p of every used row-block slot; see the host
    function `gate_up`. a_desc: x_PD [P, D] in padded-row order, block [BM, BK] (D % BK == 0); wg_desc / wu_desc:
    Wg / Wu as [E·F, D], block [FT, BK]; h_desc: h [P, F], gu_desc: gu as [2P, F], block [BM / 2, FT]. Producer =
    default partition (4 warps), two 4-warp ping-pong consumers on BM × (FT + FT) tiles, each with EPI_BUFS [BM, FT]
    epilogue buffers (one without STORE_GU)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    FT: gl.constexpr = wg_desc.block_type.shape[0]
    NB: gl.constexpr = EPI_BUFS if STORE_GU else 1
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(wg_desc.dtype, [STAGES, 2 * FT, BK], wg_desc.layout)
    c_bufs = gl.allocate_shared_memory(h_desc.dtype, [2 * NB, BM, FT], h_desc.layout)
    ready_bars, empty_bars, turn_bars = _ring_barriers(STAGES, 1)
    gl.warp_specialize([
        (_gate_up_producer,
         (a_desc, wg_desc, wu_desc, h_desc, gu_desc, block_ptr, start_ptr, count_ptr, a_bufs, b_bufs, c_bufs,
          ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, GROUP_M, N_COLS, EXPERT_ORDER, STORE_GU, 0)),
        (_gate_up_consumer,
         (a_desc, wg_desc, wu_desc, h_desc, gu_desc, block_ptr, start_ptr, count_ptr, a_bufs, b_bufs, c_bufs,
          ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, GROUP_M, N_COLS, EXPERT_ORDER, STORE_GU, 0)),
        (_gate_up_consumer,
         (a_desc, wg_desc, wu_desc, h_desc, gu_desc, block_ptr, start_ptr, count_ptr, a_bufs, b_bufs, c_bufs,
          ready_bars, empty_bars, turn_bars, n_tiles, n_mb, P, D, F, GROUP_M, N_COLS, EXPERT_ORDER, STORE_GU, 1)),
    ], [4, 4], [232, 232])
    _release_ring(ready_bars, empty_bars, STAGES)


@dataclass(frozen=True)
class GateUpTile:
    """One gate_up launch shape: ping-pong consumers on HGRAD_BLOCK_M × (block_f + block_f) tiles ([g | u])."""

    block_f: int = 64
    """F columns per tile (of g and of u each: the wgmma is 2·block_f wide)."""
    block_k: int = 64
    """Reduction step over D; divides D."""
    stages: int = 6
    """Depth of the shared-memory ring; a stage takes 32 KB (x 128 × 64, Wg and Wu 64 × 64 each)."""
    epi_bufs: int = 1
    """Epilogue buffers [128, block_f] per consumer, 16 KB each: 3 (h, g, u) leave room for 4 stages, 2 (u reusing
    h's) for 5, 1 (one after another) for 6."""
    expert_order: bool = True
    """Tiles one expert after another (`_slot_tile`), else moe.py's GROUP_M order."""
    group_m: int = 8
    """Row blocks per group of the GROUP_M order."""


GATE_UP_FEW_ROWS = 1024
"""gate_up's boundary (`gate_up_tile`): its 4-deep-ring tile was no faster at 768 rows per expert in the step
(N=8192: 5.276 against 5.237 ms with the 6-deep ring, both with split tiles elsewhere)."""


def gate_up_tile(rows_per_expert: float) -> GateUpTile:
    """Fastest measured launch shape (H100, V2-Lite, bench beside benchmarks/moe_hopper_ab.py): below
    GATE_UP_FEW_ROWS rows per expert a 6-deep ring with one epilogue buffer (N=4096 alone 0.519-0.548 ms; 5 stages /
    2 buffers 0.554, 4 / 3 0.593-0.605; in the step 0.473-0.478 against 0.578-0.582 for the Triton kernel), above a
    4-deep ring with a buffer per output (N=16384 alone 1.941-2.174 against 2.107-2.545 for 6 / 1; in the step 1.827
    against 2.127)."""
    if rows_per_expert < GATE_UP_FEW_ROWS:
        return GateUpTile()
    return GateUpTile(stages=4, epi_bufs=3)


def gate_up_fits(D: int, F: int, block_m: int, tile: GateUpTile) -> bool:
    """Row blocks of this kernel's height, whole reduction steps over D (D % block_k), TMA-aligned rows (D, F
    multiples of 8). F needs no multiple of block_f: a tile past F reads the next expert's (or TMA's zero) weight
    rows into columns that the stores clip."""
    return block_m == HGRAD_BLOCK_M and D % tile.block_k == 0 and D % 8 == 0 and F % 8 == 0


def gate_up(x_PD: torch.Tensor, wg_EFD: torch.Tensor, wu_EFD: torch.Tensor, block_3Mb: torch.Tensor,
            pad_start_E: torch.Tensor, count_E: torch.Tensor, h_PF: torch.Tensor, gu_2PF: torch.Tensor | None,
            tile: GateUpTile) -> None:
    """For the rows p of every used slot of block_3Mb (a full block's 128 rows, a half block's 64), e the slot's
    expert:  g_p = x_p Wg[e]ᵀ,  u_p = x_p Wu[e]ᵀ  (fp32 sums, rounded to the dtype),  h_p = silu(g_p) ⊙ u_p,
    into h_PF and (gu_2PF not None) gu_2PF[0], gu_2PF[1], in place: moe.py's `_moe_gate_up_kernel`'s product and
    rows (padding rows 0, from x_PD's zero rows; rows outside every slot untouched), x_PD being x in padded-row order
    (moe.py's `_gather_rows`: Hopper TMA cannot gather rows). The caller checks `usable` and `gate_up_fits`; all
    tensors contiguous, 16-byte aligned."""
    P, F = h_PF.shape
    E, _, D = wg_EFD.shape
    if (wg_EFD.shape != (E, F, D) or wu_EFD.shape != (E, F, D) or x_PD.shape != (P, D)
            or (gu_2PF is not None and gu_2PF.shape != (2, P, F)) or block_3Mb.dim() != 2 or block_3Mb.shape[0] != 3
            or pad_start_E.numel() != E or count_E.numel() != E):
        raise ValueError(f"gate_up: shapes x {tuple(x_PD.shape)}, Wg {tuple(wg_EFD.shape)}, Wu {tuple(wu_EFD.shape)}, "
                         f"h {tuple(h_PF.shape)}, gu {None if gu_2PF is None else tuple(gu_2PF.shape)}, block table "
                         f"{tuple(block_3Mb.shape)}, {pad_start_E.numel()} / {count_E.numel()} expert offsets do not "
                         "fit together")
    if D % tile.block_k:
        raise ValueError(f"gate_up: {tile} does not fit D={D} (block_k must divide it)")
    BM = HGRAD_BLOCK_M
    n_mb, n_cols = block_3Mb.shape[1], triton.cdiv(F, tile.block_f)
    n_tiles = n_mb * n_cols
    if n_tiles == 0 or P == 0:
        return
    a = _desc(x_PD, [BM, tile.block_k])
    wg = _desc(wg_EFD.view(E * F, D), [tile.block_f, tile.block_k])
    wu = _desc(wu_EFD.view(E * F, D), [tile.block_f, tile.block_k])
    h = _desc(h_PF, [BM // 2, tile.block_f])
    gu = _desc(h_PF if gu_2PF is None else gu_2PF.view(2 * P, F), [BM // 2, tile.block_f])
    n_sm = torch.cuda.get_device_properties(h_PF.device).multi_processor_count
    _gate_up_kernel[(min(n_sm, n_tiles),)](a, wg, wu, h, gu, block_3Mb, pad_start_E, count_E, n_tiles, n_mb, P, D, F,
                                           STAGES=tile.stages, GROUP_M=tile.group_m, N_COLS=n_cols,
                                           EXPERT_ORDER=tile.expert_order, STORE_GU=gu_2PF is not None,
                                           EPI_BUFS=tile.epi_bufs, num_warps=4, maxnreg=168)
