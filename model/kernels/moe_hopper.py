"""Hopper (sm_90) warp-specialized grouped GEMMs for the routed experts, in Triton's Gluon dialect.

Shape legend as in moe.py: E experts, G planes, P padded sorted rows, DI × DJ one expert's output block, D hidden,
F expert intermediate size, Mb row-block slots.

Why beside moe.py's Triton kernels: on an H100 at V2-Lite shapes Triton's `tl.dot` pipelines reach ~450-480
TFLOP/s on the MoE GEMMs, where a persistent kernel with a dedicated TMA producer warp group, an mbarrier ring and
two consumer warp groups (Gluon: `triton.experimental.gluon`, explicit layouts, shared memory, barriers and
`warp_specialize`) reaches ~550, the rate of cuBLAS on equal-sized groups (benchmarks/README.md, "Gluon weight-
gradient GEMMs"). moe.py calls these when `usable` says the device, dtype, shapes and Triton version fit, and its
Triton kernels otherwise (and on the CPU interpreter, which does not run Gluon).

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

Hidden grad (`hidden_grad`): z_p = dout_p @ Wd[e] [P, F] for the rows of every used row-block slot (block_3Mb: expert,
first row, rows = 128 or 64), moe.py's `_moe_hidden_grad_kernel`'s product, rows and store pattern (a full block's
128 rows, a half block's 64; padding rows come out 0 from their zero dout rows; rows outside every slot untouched).
Persistent grid, TMA producer (default partition) filling a 5-deep ring of dout [128, 64] and Wd [64, 128] tiles
(Wd read as one [E·D, F] matrix: D % 64 == 0 keeps a step inside Wd[e]; TMA zero-fills past F and clips the store),
two ping-pong consumers on alternate 128 × 128 tiles, each tile stored in 64-row halves (the second only for a full
block). Tile order: one expert after another, its column tiles outer and its row blocks inner (`_slot_tile`,
computed in the kernel from the block table and pad_start_E / count_E, so no host-built list and no device sync),
which keeps fewer experts' weights in flight per wave than moe.py's GROUP_M order (also available, `HgradTile`).
Measured on an H100 at N=4096 (benchmarks/gluon_grouped_gemm.py `pp128x64x5x`, the order then a host list):
0.255-0.261 ms vs 0.295-0.318 for the Triton kernel; inside the step 0.248 vs 0.294 ms at 384 rows per expert,
output bit-identical, but 1.027 vs 0.989 at 1536 rows, so moe.py runs it below `HGRAD_FEW_ROWS` rows per expert.

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

Written against the Gluon API of Triton 3.6 (`usable` checks the version: Gluon is experimental and its API moves
between releases; Triton 3.9, for one, renamed the TMA copies to `tma.async_load` / `async_store`: `_tma_load` /
`_tma_store` pick either name. Under 3.9 every kernel compiles for sm_90 (tests/test_moe_hopper.py compiles them
with the installed Triton, no GPU needed), and tests/test_moe_hopper.py's GPU tests pass on an H100 under 3.6 and
3.9 (50 passed with 3.9's cp312 wheel carried to the device); other releases are not admitted until they have run).
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
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Triton 3.9 renamed the TMA copies (its async_copy_* names raise); one name each for either release.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

TESTED_TRITON = ("3.6.", "3.9.")
"""Triton releases whose Gluon API these kernels were written and tested against."""


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr, EMPTY_COUNT: gl.constexpr):
    """The mbarriers of a STAGES-deep shared-memory ring, initialised and fenced: ready[s] (the producer's TMA bytes
    of slot s have landed), empty[s] (EMPTY_COUNT consumer arrivals: slot s may be refilled) and the two ping-pong
    consumers' turn barriers. Allocated after the kernel's operand buffers."""
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=EMPTY_COUNT)
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    fence_async_shared()
    return ready_bars, empty_bars, turn_bars


@gluon.jit
def _release_ring(ready_bars, empty_bars, STAGES: gl.constexpr):
    """Invalidate the ring's barriers once every partition has finished."""
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))


@gluon.jit
def _col_halves(x):
    """[R, W] register tensor → its column halves [R, W/2] (a register split: the column bit W/2 is a register
    bit of the wgmma accumulator layout, so no data moves)."""
    R: gl.constexpr = x.shape[0]
    W: gl.constexpr = x.shape[1]
    return x.reshape([R, 2, W // 2]).permute(0, 2, 1).split()


@gluon.jit
def _epilogue_store_piece(c_desc, c_smem, x, p0, n0, rows):
    """x [R, EPI_N] → c_smem → TMA store in 64-row halves (the second only if the block has its rows)."""
    R: gl.constexpr = x.shape[0]
    HALF: gl.constexpr = c_desc.block_type.shape[0]
    tma.store_wait(0)  # the previous store has finished reading c_smem
    if R < c_smem.shape[0]:
        c_smem.slice(0, R).store(x.to(c_desc.dtype))
    else:
        c_smem.store(x.to(c_desc.dtype))
    fence_async_shared()
    _tma_store(c_desc, [p0, n0], c_smem.slice(0, HALF))
    if R > HALF:
        if rows > HALF:
            _tma_store(c_desc, [p0 + HALF, n0], c_smem.slice(HALF, HALF))


@gluon.jit
def _epilogue_store(c_desc, c_smem, acc, p0, n0, rows, EPI_N: gl.constexpr):
    """acc [R, W] → C[p0 :, n0 : n0 + W] in pieces of EPI_N columns (W / EPI_N in 1, 2)."""
    if acc.shape[1] == EPI_N:
        _epilogue_store_piece(c_desc, c_smem, acc, p0, n0, rows)
    else:
        lo, hi = _col_halves(acc)
        _epilogue_store_piece(c_desc, c_smem, lo, p0, n0, rows)
        _epilogue_store_piece(c_desc, c_smem, hi, p0, n0 + EPI_N, rows)


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


FEW_ROWS = 512
"""Below this many rows per expert the weight grads, the input grad and the down projection run ping-pong tiles,
above it split tiles (a quarter less operand traffic per FLOP). Step A/Bs on an H100 at its power cap (V2-Lite,
benchmarks/README.md): ping-pong wins at 384 rows per expert (N=4096: 2.833 against 2.880 ms all split), split at
576 (N=6144: 4.046 → 3.992) and 768 (N=8192: 5.474 → 5.237, 15 rounds; 5.430 → 5.279 in another process). It was
1024 from burst measurements of each kernel alone."""

GATE_UP_FEW_ROWS = 1024
"""gate_up's boundary (`gate_up_tile`): its 4-deep-ring tile was no faster at 768 rows per expert in the step
(N=8192: 5.276 against 5.237 ms with the 6-deep ring, both with split tiles elsewhere)."""


def wgrad_tile(G: int, rows_per_expert: float) -> WgradTile:
    """Fastest measured launch shape (H100, V2-Lite): ping-pong with a 6-deep ring and 64-column epilogue pieces
    for short reductions; split tiles for long ones (dWd along I, dWg/dWu along J)."""
    if rows_per_expert < FEW_ROWS:
        return WgradTile("pp", 128, 128, stages=6, epi_n=64)
    if G == 1:
        return WgradTile("si", 256, 128, stages=4, epi_n=64)
    return WgradTile("sj", 128, 256, stages=3)


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """Host TMA descriptor of a 2-D 16-bit tensor with the default swizzled shared layout of its block."""
    elem = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, elem))


def usable(t: torch.Tensor) -> bool:
    """The Gluon kernels can run on t's device and dtype: a Hopper GPU (sm_90), 16-bit floats, a tested Triton."""
    return (t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(t.device) == (9, 0)
            and triton.__version__.startswith(TESTED_TRITON))


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


# ----------------------------------------------------------------------------------------------- hidden grad
@gluon.jit
def _row_block_tile(t, n_mb, n_n, GROUP_M: gl.constexpr):
    """Tile index → (row block, column tile), GROUP_M row blocks at a time over every column tile (moe.py's
    `_row_block_tile`)."""
    width = GROUP_M * n_n
    first_m = (t // width) * GROUP_M
    size_m = gl.minimum(n_mb - first_m, GROUP_M)
    return first_m + (t % width) % size_m, (t % width) // size_m


@gluon.jit
def _slot_tile(t, block_ptr, start_ptr, count_ptr, n_mb, BM: gl.constexpr, N_COLS: gl.constexpr,
                GROUP_M: gl.constexpr, EXPERT_ORDER: gl.constexpr):
    """Tile t of n_mb · N_COLS → (expert or −1 for an unused slot, row-block slot, column tile).
    EXPERT_ORDER: one expert after another, its column tiles outer and its row blocks inner. The block table
    lists each expert's slots in a run, in expert order, unused slots last (`route_metadata`), so expert e's run of
    L = cdiv(count_e, BM) slots from m0 takes the positions [m0·N_COLS, (m0 + L)·N_COLS) of this order, at
    m0·N_COLS + n·L + (m − m0); slot t // N_COLS lies in that run, and m0 = slot − (its first row − start_e) / BM.
    Computed here from the table, so the order needs no host-built list (no device sync). Else moe.py's GROUP_M
    order."""
    if EXPERT_ORDER:
        m = t // N_COLS
        n = t % N_COLS
        e = gl.load(block_ptr + m)
        if e >= 0:
            m0 = m - (gl.load(block_ptr + n_mb + m) - gl.load(start_ptr + e)) // BM
            run = (gl.load(count_ptr + e) + BM - 1) // BM
            q = t - m0 * N_COLS
            m = m0 + q % run
            n = q // run
    else:
        m, n = _row_block_tile(t, n_mb, N_COLS, GROUP_M)
        e = gl.load(block_ptr + m)
    return e, m, n


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
def _b_operand(b_bufs, s, B_TRANS: gl.constexpr):
    """Ring slot s of B as the wgmma [BK, BN] operand: the tile as loaded, or (B_TRANS) the [BN, BK] tile permuted
    in shared memory (a K-major operand: wgmma reads 16-bit operands either way, as the weight grads' A)."""
    b = b_bufs.index(s)
    if B_TRANS:
        b = b.permute((1, 0))
    return b


@gluon.jit
def _pp_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, it, k_steps, ROWS: gl.constexpr, BN: gl.constexpr,
                    STAGES: gl.constexpr, B_TRANS: gl.constexpr):
    """acc [ROWS, BN] = Σ over the next k_steps ring slots of A_slot[:ROWS] @ B_slot (`_b_operand`), one wgmma group
    in flight; every slot but the last is released as soon as the wgmma reading it has retired. Returns (acc, last
    slot, it)."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    acc = gl.zeros([ROWS, BN], gl.float32, acc_layout)
    prev = 0
    for kk in range(k_steps):
        s = it % STAGES
        mbarrier.wait(ready_bars.index(s), (it // STAGES) & 1)
        a = a_bufs.index(s)
        if ROWS < a.shape[0]:
            a = a.slice(0, ROWS)
        acc = warpgroup_mma(a, _b_operand(b_bufs, s, B_TRANS), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        mbarrier.arrive(empty_bars.index(prev), pred=kk > 0)
        prev = s
        it += 1
    return acc, prev, it


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
                        EXPERT_ORDER: gl.constexpr):
    """z[p0 : p0 + rows, n-tile] = dout[p0 : p0 + BM] @ Wd[e][:, n-tile] for every used (row-block slot, column
    tile); see the module docstring. a_desc: dout [P, K], block [BM, BK] (a_half_desc: block [BM / 2, BK], read only
    with HALF_ROWS); b_desc: Wd as [E·K, F], block [BK, BN] (K % BK == 0: a step never reads the next expert's rows;
    zero fill past F); c_desc: z [P, F], block [BM / 2, EPI_N] (a tile goes out in 64-row halves, the second only
    for a full block; clipped past F). The producer is the default partition (4 warps), the two consumers 4-warp
    workers (232 registers); an epilogue buffer [BM, EPI_N] per consumer."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[1]
    EPI_N: gl.constexpr = c_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BK, BN], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BM, EPI_N], c_desc.layout)
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
    half_rows: bool = False
    """A half block as HGRAD_BLOCK_M / 2-row wgmmas (measured no faster on an H100: benchmarks/README.md)."""
    expert_order: bool = True
    """Tiles one expert after another (`_slot_tile`), else moe.py's GROUP_M order."""
    group_m: int = 8
    """Row blocks per group of the GROUP_M order."""


HGRAD_BLOCK_M = 128
"""Rows per tile: moe.py's row block (`MoETiles.block_m`) must be this."""

HGRAD_TILE = HgradTile()
"""moe.py's launch shape, benchmarks/gluon_grouped_gemm.py's `pp128x64x5x` (H100, N = 4096: 0.255-0.261 ms against
0.295-0.318 for moe.py's Triton kernel)."""

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
    if D % tile.block_k or tile.block_n // epi_n not in (1, 2):
        raise ValueError(f"hidden_grad: {tile} does not fit D={D} (block_k must divide it) or gives other than 1 or 2 "
                         "store pieces per tile")
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
                                               num_warps=4, maxnreg=168)


# ------------------------------------------------------------------------------- input grad and down projection
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
    """A half block as 64-row wgmmas (ping-pong; split always skips the idle half)."""
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


# ----------------------------------------------------------------------------------------------------- gate_up
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
