"""Hopper Gluon kernel of the routed experts' weight gradients (shape legend: the package docstring).

Weight gradients (`weight_grad`): C[g, e] [DI, DJ] = Σ over expert e's padded rows p of A[g, p, :]ᵀ ⊗ B[p, :]
    dWd:       G = 1, A = dout_PD [1, P, D], B = hw_PF [P, F]  →  C = dWd [1, E, D, F]
    dWg, dWu:  G = 2, A = dgu_2PF [2, P, F], B = x_PD [P, D]   →  C = [dWg; dWu] [2, E, F, D]
the product of moe.py's `_moe_weight_grad_kernel`, over the same metadata: expert e's rows are pad_start_E[e] ..
+ count_E[e], padded with zero rows to a multiple of 64, so a 64-row reduction step never leaves the expert's
run and needs no mask; an expert without rows gets a zero gradient (its tiles run no step and store zeros).
A persistent grid (one program per SM) walks the output tiles (e, g, i-tile, j-tile), j fastest, expert-major
(the tiles in flight share one expert's rows in L2). The default partition (4 warps) is the TMA producer: per
reduction step it loads A [BK, BI] and B [BK, BJ] into a STAGES-deep shared-memory ring guarded by `ready` (TMA
byte count) and `empty` mbarriers. Both operands stay MN-major: the wgmma A operand is the A slot permuted in
shared memory (wgmma reads 16-bit operands either way). Two 4-warp consumer warp groups run async
`warpgroup_mma`, one group in flight, and store their accumulator through shared memory with TMA:
  * ping-pong (`pp`): each consumer owns whole 128 × 128 tiles, the two take alternate tiles (turn barriers order
    their main loops), so one's epilogue overlaps the other's main loop: at ~384 rows per expert a tile's
    32 KB store is as long as a good part of its 6-step main loop (~1.1 GB of weight gradients per step at N=4096);
  * split (`si` / `sj`): both consumers on one 256 × 128 / 128 × 256 tile, a 128 × 128 half each, reading one ring
    slot (empty count 2): a quarter less operand traffic per FLOP; wins in the step from ~576 rows per expert (`FEW_ROWS`).
Measured on an H100 at N=4096: dWd 0.255-0.264 ms vs 0.306-0.310 for the Triton kernel, dWg+dWu 0.487-0.541 vs
0.631-0.636, output bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ._common import FEW_ROWS, _desc, _tma_load
from ._pipeline import _epilogue_store, _release_ring, _ring_barriers


@gluon.jit
def _wgrad_tile(t, G: gl.constexpr, N_I: gl.constexpr, N_J: gl.constexpr):
    """Tile index → (expert, plane, i-tile, j-tile), expert-major, j fastest."""
    per_g: gl.constexpr = N_I * N_J
    e = t // (G * per_g)
    g = t // per_g % G
    return e, g, t % per_g // N_J, t % N_J


@gluon.jit
def _wgrad_producer(a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                    empty_bars, turn_bars, G: gl.constexpr, N_I: gl.constexpr, N_J: gl.constexpr,
                    SPLIT_I: gl.constexpr, SPLIT_J: gl.constexpr, ROLE: gl.constexpr):
    """TMA producer: per tile, A[g·P + start + r, i0 :] and B[start + r, j0 :] for r = 0, BK, .. < count."""
    BK: gl.constexpr = a_desc.block_type.shape[0]
    BI: gl.constexpr = a_desc.block_type.shape[1]
    BJ: gl.constexpr = b_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, g, ti, tj = _wgrad_tile(t, G, N_I, N_J)
        start = gl.load(start_ptr + e)
        count = gl.load(count_ptr + e)
        for r in range(0, count, BK):
            s = it % STAGES
            mbarrier.wait(empty_bars.index(s), ((it // STAGES) & 1) ^ 1)  # fresh barriers pass parity 1 at once
            mbarrier.expect(ready_bars.index(s), nbytes)
            _tma_load(a_desc, [g * P + start + r, ti * BI], ready_bars.index(s), a_bufs.index(s))
            _tma_load(b_desc, [start + r, tj * BJ], ready_bars.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _wgrad_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, it, nk, I_OFF: gl.constexpr, WI: gl.constexpr,
                    J_OFF: gl.constexpr, WJ: gl.constexpr):
    """acc [WI, WJ] = Σ over the next nk ring slots of A_slot[:, I_OFF : I_OFF + WI]ᵀ @ B_slot[:, J_OFF : J_OFF + WJ]
    (A permuted in shared memory: an MN-major wgmma operand), one wgmma group in flight; each slot but the last is
    released once the wgmma reading it has retired. Returns (acc, last slot); nk = 0 gives zeros. (A permuted, sliced 3-D view of
    the whole ring instead asserts in Triton 3.6 for a ring depth that is not a power of two.)"""
    STAGES: gl.constexpr = a_bufs.shape[0]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, WJ, 16])
    acc = gl.zeros([WI, WJ], gl.float32, acc_layout)
    prev = 0
    for kk in range(nk):
        s = it % STAGES
        mbarrier.wait(ready_bars.index(s), (it // STAGES) & 1)
        a = a_bufs.index(s)
        if WI < a.shape[1]:
            a = a.slice(I_OFF, WI, dim=1)
        b = b_bufs.index(s)
        if WJ < b.shape[1]:
            b = b.slice(J_OFF, WJ, dim=1)
        acc = warpgroup_mma(a.permute((1, 0)), b, acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        mbarrier.arrive(empty_bars.index(prev), pred=kk > 0)
        prev = s
        it += 1
    return acc, prev


@gluon.jit
def _wgrad_consumer(a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                    empty_bars, turn_bars, G: gl.constexpr, N_I: gl.constexpr, N_J: gl.constexpr,
                    SPLIT_I: gl.constexpr, SPLIT_J: gl.constexpr, ROLE: gl.constexpr):
    """Consumer ROLE. Ping-pong (SPLIT_I = SPLIT_J = 1): the tiles j with j % 2 == ROLE, the main loops taken in
    turns (a consumer waits on its tile's ring slots only after the other has waited on all of its previous tile's,
    so no ready barrier is ever a whole phase behind: benchmarks/gluon_grouped_gemm.py's `_pp_consumer`). Split: every
    tile, this consumer's half. Every consumer counts the ring slots of all tiles (ceil(count / BK) each)."""
    BK: gl.constexpr = a_desc.block_type.shape[0]
    BI: gl.constexpr = a_desc.block_type.shape[1]
    BJ: gl.constexpr = b_desc.block_type.shape[1]
    WI: gl.constexpr = BI // SPLIT_I
    WJ: gl.constexpr = BJ // SPLIT_J
    I_OFF: gl.constexpr = ROLE * WI if SPLIT_I > 1 else 0
    J_OFF: gl.constexpr = ROLE * WJ if SPLIT_J > 1 else 0
    PINGPONG: gl.constexpr = SPLIT_I * SPLIT_J == 1
    EPI_N: gl.constexpr = c_bufs.shape[2]
    c_smem = c_bufs.index(ROLE)
    E = n_tiles // (G * N_I * N_J)
    it = 0
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, g, ti, tj = _wgrad_tile(t, G, N_I, N_J)
        nk = (gl.load(count_ptr + e) + BK - 1) // BK
        if PINGPONG:
            owner = j % 2
        else:
            owner = ROLE
        if owner == ROLE:
            if PINGPONG:
                mbarrier.wait(turn_bars.index(ROLE), ((j // 2) & 1) ^ (1 - ROLE))  # consumer 0 passes at once
            acc, prev = _wgrad_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, it, nk, I_OFF, WI, J_OFF, WJ)
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - ROLE))  # all this tile's slots waited on: the other's turn
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty_bars.index(prev), pred=nk > 0)
            _epilogue_store(c_desc, c_smem, acc, (g * E + e) * (N_I * BI) + ti * BI + I_OFF, tj * BJ + J_OFF, WI, EPI_N)
        it += nk
        j += 1
    tma.store_wait(0)


@gluon.jit
def _weight_grad_kernel(a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, G: gl.constexpr,
                             N_I: gl.constexpr, N_J: gl.constexpr, STAGES: gl.constexpr, SPLIT_I: gl.constexpr,
                             SPLIT_J: gl.constexpr):
    """C[g, e] = Σ_rows A[g, rows]ᵀ B[rows] for every (expert, plane, BI × BJ tile); see the module docstring.
    a_desc: A as [G·P, DI], block [BK, BI]; b_desc: B [P, DJ], block [BK, BJ]; c_desc: C as [G·E·DI, DJ], block
    [64, EPI_N] (the consumer's 128-row half tile goes out in two 64-row stores)."""
    BK: gl.constexpr = a_desc.block_type.shape[0]
    BI: gl.constexpr = a_desc.block_type.shape[1]
    BJ: gl.constexpr = b_desc.block_type.shape[1]
    EPI_N: gl.constexpr = c_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BK, BI], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BK, BJ], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BI // SPLIT_I, EPI_N], c_desc.layout)
    ready_bars, empty_bars, turn_bars = _ring_barriers(STAGES, 1 if SPLIT_I * SPLIT_J == 1 else 2)
    gl.warp_specialize([
        (_wgrad_producer, (a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                           empty_bars, turn_bars, G, N_I, N_J, SPLIT_I, SPLIT_J, 0)),
        (_wgrad_consumer, (a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                           empty_bars, turn_bars, G, N_I, N_J, SPLIT_I, SPLIT_J, 0)),
        (_wgrad_consumer, (a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                           empty_bars, turn_bars, G, N_I, N_J, SPLIT_I, SPLIT_J, 1)),
    ], [4, 4], [232, 232])
    _release_ring(ready_bars, empty_bars, STAGES)


@dataclass(frozen=True)
class WgradTile:
    """One weight-gradient launch shape."""

    kind: str
    """'pp' ping-pong 128 × 128 tiles; 'si' / 'sj' split 256 × 128 / 128 × 256 tiles (module docstring)."""
    block_i: int
    """Output rows per tile (DI)."""
    block_j: int
    """Output columns per tile (DJ)."""
    block_k: int = 64
    """Rows per reduction step; divides 64 (the experts' row padding)."""
    stages: int = 5
    """Depth of the shared-memory ring."""
    epi_n: int | None = None
    """Columns per epilogue store piece (None: a consumer's whole tile width)."""

    @property
    def split(self) -> tuple[int, int]:
        return {"pp": (1, 1), "si": (2, 1), "sj": (1, 2)}[self.kind]


def wgrad_tile(G: int, rows_per_expert: float) -> WgradTile:
    """Fastest measured launch shape (H100, V2-Lite): ping-pong with a 6-deep ring and 64-column epilogue pieces
    for short reductions; split tiles for long ones (dWd along I, dWg/dWu along J)."""
    if rows_per_expert < FEW_ROWS:
        return WgradTile("pp", 128, 128, stages=6, epi_n=64)
    if G == 1:
        return WgradTile("si", 256, 128, stages=4, epi_n=64)
    return WgradTile("sj", 128, 256, stages=3)


def wgrad_fits(DI: int, DJ: int, row_padding: int, tile: WgradTile) -> bool:
    """An output tile stays inside one expert's DI rows, reduction steps inside its padded rows, rows TMA-aligned."""
    return DI % tile.block_i == 0 and row_padding % tile.block_k == 0 and DJ % 8 == 0 and DI % 8 == 0


def weight_grad(a_GPI: torch.Tensor, b_PJ: torch.Tensor, pad_start_E: torch.Tensor, count_E: torch.Tensor,
                c_GEIJ: torch.Tensor, tile: WgradTile) -> None:
    """c_GEIJ[g, e] ← Σ over expert e's rows A[g, rows]ᵀ B[rows] (moe.py `_weight_grad`'s product), in place.
    The caller checks `usable` and `wgrad_fits`."""
    G, P, DI = a_GPI.shape
    E, DJ = c_GEIJ.shape[1], c_GEIJ.shape[3]
    if c_GEIJ.shape != (G, E, DI, DJ) or b_PJ.shape[0] != P or pad_start_E.numel() != E or count_E.numel() != E:
        raise ValueError(f"weight_grad: shapes A {tuple(a_GPI.shape)}, B {tuple(b_PJ.shape)}, C {tuple(c_GEIJ.shape)}, "
                         f"{pad_start_E.numel()} / {count_E.numel()} expert offsets do not fit together")
    split_i, split_j = tile.split
    WI, WJ = tile.block_i // split_i, tile.block_j // split_j
    epi_n = tile.epi_n or WJ
    if (WI, WJ) != (128, 128) or WJ // epi_n not in (1, 2):
        raise ValueError(f"weight_grad: {tile} does not give 128 × 128 consumer tiles with 1 or 2 store pieces")
    n_i, n_j = DI // tile.block_i, triton.cdiv(DJ, tile.block_j)
    n_tiles = G * E * n_i * n_j
    if n_tiles == 0:
        return
    a = _desc(a_GPI.view(G * P, DI), [tile.block_k, tile.block_i])
    b = _desc(b_PJ, [tile.block_k, tile.block_j])
    c = _desc(c_GEIJ.view(G * E * DI, DJ), [WI // 2, epi_n])
    n_sm = torch.cuda.get_device_properties(a_GPI.device).multi_processor_count
    _weight_grad_kernel[(min(n_sm, n_tiles),)](a, b, c, pad_start_E, count_E, n_tiles, P, G=G, N_I=n_i, N_J=n_j,
                                               STAGES=tile.stages, SPLIT_I=split_i, SPLIT_J=split_j,
                                               num_warps=4, maxnreg=168)
