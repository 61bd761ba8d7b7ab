"""The device-side building blocks that more than one of this package's warp-specialized kernels shares: the
shared-memory ring's barriers, the TMA epilogue stores, the row-block tile orders (`_row_block_tile`,
`_slot_tile`) and the ping-pong main loop (`_pp_mainloop`, its B operand `_b_operand`).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._common import _tma_store


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
def _row_halves(x):
    """[R, W] wgmma accumulator → its row halves [R/2, W] (a register split when R/2 ≥ 64: the row bit R/2 is a
    repetition of the 4 warps' 64 rows, so no data moves)."""
    R: gl.constexpr = x.shape[0]
    W: gl.constexpr = x.shape[1]
    return x.reshape([2, R // 2, W]).permute(1, 2, 0).split()


@gluon.jit
def _epilogue_store(c_desc, c_smem, acc, p0, n0, rows, EPI_N: gl.constexpr):
    """acc [R, W] → C[p0 :, n0 : n0 + W] in pieces of EPI_N columns (W / EPI_N in 1, 2), and of R / 2 rows when
    c_smem has only those (the second half only if the block has its rows)."""
    if acc.shape[0] > c_smem.shape[0]:
        top, bottom = _row_halves(acc)
        _epilogue_store_cols(c_desc, c_smem, top, p0, n0, rows, EPI_N)
        if rows > top.shape[0]:
            _epilogue_store_cols(c_desc, c_smem, bottom, p0 + top.shape[0], n0, rows - top.shape[0], EPI_N)
    else:
        _epilogue_store_cols(c_desc, c_smem, acc, p0, n0, rows, EPI_N)


@gluon.jit
def _epilogue_store_cols(c_desc, c_smem, acc, p0, n0, rows, EPI_N: gl.constexpr):
    """acc [R, W] → C[p0 :, n0 : n0 + W] in pieces of EPI_N columns (W / EPI_N in 1, 2)."""
    if acc.shape[1] == EPI_N:
        _epilogue_store_piece(c_desc, c_smem, acc, p0, n0, rows)
    else:
        lo, hi = _col_halves(acc)
        _epilogue_store_piece(c_desc, c_smem, lo, p0, n0, rows)
        _epilogue_store_piece(c_desc, c_smem, hi, p0, n0 + EPI_N, rows)


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
