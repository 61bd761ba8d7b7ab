"""Exploratory: the MoE hidden-grad grouped GEMM on 2-CTA clusters with TMA multicast of the weight tile (Triton 3.9
Gluon, GPU, bf16).

    TRITON_BACKENDS_IN_TREE=1 PYTHONPATH=<triton 3.9> python benchmarks/gluon_multicast_gemm.py \
        [--n 4096] [--configs mc2,mc2l,mc1] [--check-only | --profile] [--dump FILE | --load FILE]

(the device has Triton 3.6 installed: a 3.9 tree put first on PYTHONPATH still finds 3.6's backend entry points
unless TRITON_BACKENDS_IN_TREE=1; --dump under 3.6 / --load under 3.9 keeps moe.py's kernels out of 3.9.)

    z_p = dout_p @ Wd[e]   for every padded row p of expert e   (z [P, F], dout [P, D], Wd [E, D, F])

the product of model/kernels/moe.py's `_moe_hidden_grad_kernel` and benchmarks/gluon_grouped_gemm.py (Triton 3.6,
whose best config `pp128x64x5x` this kernel follows: persistent, warp-specialized ping-pong consumers, 128 x 128 x 64
tiles per CTA, 5-stage TMA ring, expert-ordered host tile list). What is new: with CL = 2 the grid is made of 2-CTA
clusters (`num_ctas=2`); each cluster takes a PAIR of row blocks of the same expert (moe.py's row-block table
block_3Mb: expert, first padded row, rows = 128 or 64 per slot) and one column tile, CTA r computing row block r of
the pair, and the weight tile Wd[e][k-tile, n-tile] that both need is loaded once per cluster and multicast into
both CTAs' shared memory (`tma.async_load(..., multicast=True)` on a descriptor whose layout replicates the tile over
the cluster: Triton issues it from CTA 0 with CTA mask 0b11). cuBLAS's kernel on 64 equal groups
(`nvjet_sm90_tst_128x192_64x5_1x2_h_bz_coopB`) is also a 1x2 cluster and moves a third fewer L2->SM sectors than
the 1-CTA Gluon kernel (benchmarks/README.md); halving the weight traffic into the SMs is what this tries.
CL = 1 is the same kernel without clusters (the 3.9 baseline beside it).

Gluon 3.9 writes a cluster kernel as one program over cluster-wide shapes; each layout's `cga_layout` says how a
tensor is spread over the CTAs (bases in units of per-CTA blocks; [[1, 0]] = rows split in CL blocks, [[0, 0]] =
replicated). So the A tile is [CL*128, 64] split by rows, the B tile [64, 128] replicated, the accumulator
[CL*128, 128] split by rows, and for an operand with a split layout Triton adds (CTA rank x per-CTA box rows) to the
row coordinate given. A pair's two blocks need not be adjacent and a lone block has no partner, so each CTA reads
its own rank (%cluster_ctarank, inline PTX) and passes its row coordinate minus that offset.
Synchronisation per ring slot s:
  * ready[s] (one per CTA, count 1): the CTA's producer expects its own A bytes plus the whole B tile; CTA 0's
    multicast completes B's bytes on both CTAs' barriers (possibly before the partner's expect: the transaction
    count may run negative within a phase, as in CUTLASS's multicast pipelines).
  * empty[s] (one per CTA, count 2): its own consumer and CTA 0's consumer released the slot (CTA 0's consumer
    arrives on both CTAs' barriers with one `from_cta=0` arrive, so in CTA 0 it counts twice);
  * empty_pair[s] (a two-CTA barrier living in CTA 0, one arrival per CTA): both CTAs' consumers released the
    slot; only CTA 0 waits on it, before it multicasts the next B tile into both CTAs' slot s.
  Together: neither CTA's producer refills slot s before both consumers are done with it, so the CTAs stay within
  one ring of each other and no barrier sees two arrivals of one CTA in one phase (also on the tiles that pair
  two experts' leftover blocks and load B without multicast).
At ~384 rows per expert most experts have 3 row blocks, so one block per expert is left over: `mc2` pairs two
experts' leftovers in one cluster (no multicast on those tiles: each CTA loads its own weight tile), `mc2l` runs a
leftover with the partner CTA recomputing the same rows and storing nothing (15% more CTA tiles). A half block
(64 rows) stores only its first 64-row half, as in the 1-CTA kernel. The epilogue splits each CTA's 128 x 128
accumulator into two 64-row halves (a register split) and stores them through [64, 128] TMA boxes.

Result (H100, N=4096, benchmarks/README.md "TMA multicast on 2-CTA clusters"): correct (rel.err 1.66e-3, as the
Triton kernel), but not faster: mc2 0.282-0.287 ms vs mc1 0.258-0.262 and the 3.6 `pp128x64x5x` 0.258-0.265;
ncu: the tensor pipe 73% busy vs 81%, L2 throughput 90% vs 79%, more L2->SM sectors, not fewer.
"""

from __future__ import annotations

import argparse
import os
import sys

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

ROWS_CTA, ROWS_STORE = 128, 64
BM = gl.constexpr(ROWS_CTA)  # rows per CTA tile
HALF = gl.constexpr(ROWS_STORE)  # rows per TMA store box


@gluon.jit
def _cta_rank(x, CL: gl.constexpr):
    """This CTA's rank in its cluster (0 when CL == 1); x: any int32 scalar (inline PTX needs an operand)."""
    if CL == 1:
        return x * 0
    else:
        return gl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r,r", [x], dtype=gl.int32,
                                         is_pure=True, pack=1)


@gluon.jit
def _pair_tile(t, pair_ptr, block_ptr, n_mb, rank):
    """Tile t of the host list (row block a, row block b or -1, column tile) → (this CTA's expert, first padded row
    of its block, its rows (0: no block: it recomputes block a and stores nothing), column tile, whether both CTAs
    share the expert (the weight tile is multicast) — the same in both CTAs)."""
    a = gl.load(pair_ptr + 3 * t)
    b = gl.load(pair_ptr + 3 * t + 1)
    n = gl.load(pair_ptr + 3 * t + 2)
    m = a
    if rank > 0:
        if b >= 0:
            m = b
    e = gl.load(block_ptr + m)
    e_a = gl.load(block_ptr + a)
    e_b = gl.load(block_ptr + gl.maximum(b, 0))
    shared = (b < 0) | (e_b == e_a)
    p0 = gl.load(block_ptr + n_mb + m)
    rows = gl.load(block_ptr + 2 * n_mb + m)
    if rank > 0:
        if b < 0:
            rows = rows * 0
    return e, p0, rows, n, shared


@gluon.jit
def _mc_producer(a_desc, b_desc, c_desc, pair_ptr, block_ptr, n_list, n_mb, K, a_bufs, b_bufs, c_bufs, ready,
                 empty, empty_pair, turn, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                 CL: gl.constexpr, ROLE: gl.constexpr):
    """TMA producer (default partition): this CTA's A rows, and (CTA 0, multicast) the shared weight tile."""
    rank = _cta_rank(gl.program_id(0), CL)
    nbytes: gl.constexpr = a_desc.nbytes_per_cta + b_desc.nbytes_per_cta
    MULTICAST: gl.constexpr = CL == 2
    it = 0
    for t in range(gl.program_id(0), n_list, gl.num_programs(0)):
        e, p0, rows, n, shared = _pair_tile(t, pair_ptr, block_ptr, n_mb, rank)
        a_row = p0 - BM * rank  # Triton adds BM x rank: CTA r's box of the row-split A descriptor
        for k0 in range(0, K, BK):
            s = it % STAGES
            phase = ((it // STAGES) & 1) ^ 1  # fresh barriers pass parity 1 at once
            mbarrier.wait(empty.index(s), phase)
            if CL == 2:
                mbarrier.wait(empty_pair.index(s), phase)  # CTA 0 only: the partner's consumer is done too
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_load(a_desc, [a_row, k0], ready.index(s), a_bufs.index(s))
            if shared:  # one weight tile for both CTAs: CTA 0 loads it into both
                tma.async_load(b_desc, [e * K + k0, n * BN], ready.index(s), b_bufs.index(s), multicast=MULTICAST)
            else:  # two experts' blocks (leftovers paired across experts): each CTA loads its own weight tile
                tma.async_load(b_desc, [e * K + k0, n * BN], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _release(empty, empty_pair, s, CL: gl.constexpr, pred=True):
    """Ring slot s is free in this consumer's CTA. With CL == 2 both CTAs' producers must also hear from the other
    CTA's consumer: CTA 0's consumer arrives on both CTAs' empty[s] (from_cta=0; CTA 1 skips that arrive), and every
    consumer arrives on CTA 0's empty_pair[s]. Without the first, CTA 1 ran up to a ring ahead on tiles without
    multicast, arrived twice in one phase of empty_pair, and the kernel hung under ncu's replay."""
    mbarrier.arrive(empty.index(s), pred=pred)
    if CL == 2:
        mbarrier.arrive(empty.index(s), pred=pred, from_cta=0)
        mbarrier.arrive(empty_pair.index(s), pred=pred)


@gluon.jit
def _mc_mainloop(a_bufs, b_bufs, ready, empty, empty_pair, it, k_steps, BN: gl.constexpr, STAGES: gl.constexpr,
                 CL: gl.constexpr):
    """acc [CL*BM, BN] (rows split over the cluster) over the next k_steps ring slots, one wgmma group in flight;
    every slot but the last is released as soon as the wgmma reading it has retired."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16],
                                                         cga_layout=[[1, 0]] if CL == 2 else [])
    acc = gl.zeros([CL * BM, BN], gl.float32, acc_layout)
    prev = 0
    for kk in range(k_steps):
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        _release(empty, empty_pair, prev, CL, pred=kk > 0)
        prev = s
        it += 1
    return acc, prev


@gluon.jit
def _row_halves(x, CL: gl.constexpr):
    """[CL*128, W] (CL row blocks, one per CTA) → its two 64-row halves per CTA, each [CL*64, W] (a register
    split: row bit 64 is a register bit of the 4-warp wgmma accumulator layout)."""
    W: gl.constexpr = x.shape[1]
    y = x.reshape([CL, 2, HALF, W]).permute(0, 2, 3, 1).reshape([CL * HALF, W, 2])
    return y.split()


@gluon.jit
def _mc_store(c_desc, c_lo, c_hi, acc, p0, rows, rank, n0):
    """This CTA's 128 x BN result → z[p0 :, n0 :] as two 64-row TMA stores (the second only if the block has those
    rows, none if the CTA has no block)."""
    lo, hi = _row_halves(acc, c_desc.block_type.shape[0] // HALF)
    tma.store_wait(0)  # the previous tile's stores have finished reading c_lo / c_hi
    c_lo.store(lo.to(c_desc.dtype))
    c_hi.store(hi.to(c_desc.dtype))
    fence_async_shared()
    row = p0 - HALF * rank  # Triton adds HALF x rank: CTA r's box of the row-split C descriptor
    if rows > 0:
        tma.async_store(c_desc, [row, n0], c_lo)
    if rows > HALF:
        tma.async_store(c_desc, [row + HALF, n0], c_hi)


@gluon.jit
def _mc_consumer(a_desc, b_desc, c_desc, pair_ptr, block_ptr, n_list, n_mb, K, a_bufs, b_bufs, c_bufs, ready,
                 empty, empty_pair, turn, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                 CL: gl.constexpr, ROLE: gl.constexpr):
    """Ping-pong consumer (as gluon_grouped_gemm's `_pp_consumer`): alternate tiles, turn barriers keep the two
    main loops in ring order, one's epilogue overlaps the other's main loop."""
    rank = _cta_rank(gl.program_id(0), CL)
    c_lo = c_bufs.index(2 * ROLE)
    c_hi = c_bufs.index(2 * ROLE + 1)
    k_steps = K // BK
    j = 0
    for t in range(gl.program_id(0), n_list, gl.num_programs(0)):
        if j % 2 == ROLE:
            mbarrier.wait(turn.index(ROLE), ((j // 2) & 1) ^ (1 - ROLE))  # consumer 0 passes at once
            e, p0, rows, n, shared = _pair_tile(t, pair_ptr, block_ptr, n_mb, rank)
            acc, prev = _mc_mainloop(a_bufs, b_bufs, ready, empty, empty_pair, j * k_steps, k_steps, BN, STAGES,
                                     CL)
            mbarrier.arrive(turn.index(1 - ROLE))  # all this tile's slots waited on: the other's turn
            acc = warpgroup_mma_wait(0, deps=[acc])
            _release(empty, empty_pair, prev, CL)
            _mc_store(c_desc, c_lo, c_hi, acc, p0, rows, rank, n * BN)
        j += 1
    tma.store_wait(0)


@gluon.jit
def gluon_hidden_grad_multicast_kernel(a_desc, b_desc, c_desc, pair_ptr, block_ptr, n_list, n_mb, K,
                                       BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                                       CL: gl.constexpr):
    """z[rows of block m] = A[rows, :K] @ B[e·K : (e + 1)·K, n-tile] for every (pair, column tile) of the host list;
    launched with num_ctas = CL, grid = clusters (program_id = cluster index)."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, CL * BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BK, BN], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [4, CL * HALF, BN], c_desc.layout)
    ready = mbarrier.allocate_mbarrier(batch=STAGES)
    empty = mbarrier.allocate_mbarrier(batch=STAGES)
    turn = mbarrier.allocate_mbarrier(batch=2)
    if CL == 2:
        empty_pair = mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=True)
    else:
        empty_pair = empty  # unused
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CL)  # CL == 2: its own consumer and CTA 0's
        if CL == 2:
            mbarrier.init(empty_pair.index(i), count=1)  # one arrival from each CTA
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    gl.barrier(cluster=True)  # the partner's barriers exist before any remote arrive or multicast
    gl.warp_specialize([
        (_mc_producer, (a_desc, b_desc, c_desc, pair_ptr, block_ptr, n_list, n_mb, K, a_bufs, b_bufs, c_bufs, ready,
                        empty, empty_pair, turn, BN, BK, STAGES, CL, 0)),
        (_mc_consumer, (a_desc, b_desc, c_desc, pair_ptr, block_ptr, n_list, n_mb, K, a_bufs, b_bufs, c_bufs, ready,
                        empty, empty_pair, turn, BN, BK, STAGES, CL, 0)),
        (_mc_consumer, (a_desc, b_desc, c_desc, pair_ptr, block_ptr, n_list, n_mb, K, a_bufs, b_bufs, c_bufs, ready,
                        empty, empty_pair, turn, BN, BK, STAGES, CL, 1)),
    ], [4, 4], [232, 232])  # (tuples written out: a tuple bound to a name turns its constexprs into tensors)
    gl.barrier(cluster=True)  # no CTA leaves while its partner may still arrive on its barriers


# ----------------------------------------------------------------------------------------------- host side
def layouts(CL, BN, BK, dtype=gl.bfloat16):
    """Shared layouts of the A [CL*128, BK] (rows split over the cluster), B [BK, BN] (replicated) and C
    [CL*64, BN] (rows split) boxes."""
    split = [[1, 0]] if CL == 2 else None
    repl = [[0, 0]] if CL == 2 else None
    return (gl.NVMMASharedLayout.get_default_for([CL * ROWS_CTA, BK], dtype, cga_layout=split),
            gl.NVMMASharedLayout.get_default_for([BK, BN], dtype, cga_layout=repl),
            gl.NVMMASharedLayout.get_default_for([CL * ROWS_STORE, BN], dtype, cga_layout=split))


def descriptors(dout_PD, wd_EDF, z_PF, CL, BN, BK):
    E, D, F = wd_EDF.shape
    al, bl, cl = layouts(CL, BN, BK)
    return (TensorDescriptor.from_tensor(dout_PD, [CL * ROWS_CTA, BK], al),
            TensorDescriptor.from_tensor(wd_EDF.view(E * D, F), [BK, BN], bl),
            TensorDescriptor.from_tensor(z_PF, [CL * ROWS_STORE, BN], cl))


def pair_tile_list(block_3Mb, n_cols, CL, cross=True):
    """Host tile list [n, 3] int32 (row block a, row block b or -1, column tile): experts one after another, each
    expert's used row blocks paired in order ((0, 1), (2, 3), ...), its column tiles outer and its pairs inner
    (gluon_grouped_gemm's `expert_tile_order` with pairs). An expert with an odd number of blocks leaves its last
    one over; with `cross` two experts' leftovers make one pair (no multicast: each CTA loads its own weight
    tile), emitted after the second expert's pairs, else each leftover runs with an idle partner. CL == 1: single
    blocks, the 1-CTA expert order."""
    expert = block_3Mb[0].tolist()
    runs = []  # [first slot, end slot) per expert
    for m, e in enumerate(expert):
        if e < 0:
            continue
        if runs and expert[runs[-1][0]] == e and runs[-1][1] == m:
            runs[-1][1] = m + 1
        else:
            runs.append([m, m + 1])
    tiles, pending = [], None
    for m0, m1 in runs:
        if CL == 1:
            tiles += [(m, -1, n) for n in range(n_cols) for m in range(m0, m1)]
            continue
        m_even = m0 + (m1 - m0) // 2 * 2
        tiles += [(m, m + 1, n) for n in range(n_cols) for m in range(m0, m_even, 2)]
        if m_even < m1:  # a leftover block
            if not cross:
                tiles += [(m_even, -1, n) for n in range(n_cols)]
            elif pending is None:
                pending = m_even
            else:
                tiles += [(pending, m_even, n) for n in range(n_cols)]
                pending = None
    if pending is not None:
        tiles += [(pending, -1, n) for n in range(n_cols)]
    return torch.tensor(tiles, dtype=torch.int32, device=block_3Mb.device).view(-1, 3)


def gluon_hidden_grad_multicast(dout_PD, wd_EDF, block_3Mb, z_PF, tiles, CL=2, BN=128, BK=64, STAGES=5,
                                n_programs=None):
    """Launch on a persistent grid of n_programs clusters (default: SMs / CL); returns the compiled kernel."""
    E, D, F = wd_EDF.shape
    assert D % BK == 0 and CL in (1, 2)
    a, b, c = descriptors(dout_PD, wd_EDF, z_PF, CL, BN, BK)
    n_programs = n_programs or torch.cuda.get_device_properties(dout_PD.device).multi_processor_count // CL
    n_list = tiles.shape[0]
    return gluon_hidden_grad_multicast_kernel[(min(n_programs, n_list),)](
        a, b, c, tiles, block_3Mb, n_list, block_3Mb.shape[1], D, BN=BN, BK=BK, STAGES=STAGES, CL=CL,
        num_warps=4, num_ctas=CL, maxnreg=168)


def parse_config(cfg):
    """'mc2' (2-CTA clusters, multicast, leftovers paired across experts), 'mc2l' (leftovers with an idle
    partner), 'mc1' (no clusters); optional 'sN' ring stages (default 5)."""
    import re
    m = re.fullmatch(r"mc([12])(l?)(?:s(\d+))?", cfg)
    if m is None:
        raise ValueError(f"bad config {cfg!r}")
    return dict(CL=int(m[1]), STAGES=int(m[3] or 5), cross=not m[2])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--configs", default="mc2,mc1")  # see parse_config
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dump", help="save the GEMM's inputs (from moe.py's routing) to this file and stop")
    parser.add_argument("--load", help="take the inputs from a --dump file (no moe.py Triton kernels launched)")
    parser.add_argument("--profile", action="store_true", help="one launch of each config between "
                        "cudaProfilerStart/Stop, no timing (for ncu --profile-from-start off)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from kernels import bench  # benchmarks/kernels.py: do_bench median, L2 flushed
    from moe_gemm_ceiling import F, dense_launches, flops, hidden_grad_reference, problem, triton_launches

    print("triton", triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
    n = args.n
    rows = []
    if args.load:
        d = torch.load(args.load)
        dout_PD, wd, block, used, pad_start = d["dout_PD"], d["wd"], d["block"], d["used"], d["pad_start"]
        z_shape = d["z_shape"]
    else:
        tri, T = triton_launches(n, *problem(n))
        block = T["block_3Mb"]  # moe.py's row-block table of this routing
        used = int(T["used_rows_1"].item())
        dout_PD, wd = T["dout_PD"], T["wd"]
        pad_start = T["pad_start_E"].tolist()
        z_shape = T["z_PF"].shape
        if args.dump:
            torch.save(dict(dout_PD=dout_PD, wd=wd, block=block, used=used, pad_start=pad_start, z_shape=z_shape),
                       args.dump)
            print("saved", args.dump)
            return
    z_ref = hidden_grad_reference(dout_PD, wd, pad_start, used)
    if not args.load:
        T["z_PF"].fill_(float("nan"))
        tri["hidden grad"]()
        torch.cuda.synchronize()
        rows.append(("triton (moe.py)", tri["hidden grad"],
                     ((T["z_PF"][:used].float() - z_ref).norm() / z_ref.norm()).item()))
    fl = flops(n)["hidden grad"]
    dense, bmm = dense_launches(n)
    for cfg in args.configs.split(","):
        kw = parse_config(cfg)
        tl_ = pair_tile_list(block, triton.cdiv(F, 128), kw["CL"], kw.pop("cross"))
        errs = []
        for i in range(3):  # fresh NaN poison each time; a race shows as a moving error
            z = torch.full(z_shape, float("nan"), device="cuda", dtype=dout_PD.dtype)
            k = gluon_hidden_grad_multicast(dout_PD, wd, block, z, tl_, **kw)
            if i == 0:
                try:  # clusters that fit on the chip at once (a 2-CTA cluster needs both SMs in one GPC)
                    fit = triton.runtime.driver.active.utils.cuOccupancyMaxActiveClusters(
                        k.function, k.metadata.shared, kw["CL"])
                except Exception as exc:  # noqa: BLE001 (diagnostic only)
                    fit = repr(exc)
                print(f"{cfg}: {k.n_regs} registers, {k.n_spills} spills, {k.metadata.shared} B shared, "
                      f"max active clusters {fit}")
            torch.cuda.synchronize()
            errs.append(((z[:used].float() - z_ref).norm() / z_ref.norm()).item())  # nan if a used row is unwritten
        print(f"{cfg}: {tl_.shape[0]} tiles, rel.err of 3 launches {errs}")
        fn = (lambda z=z, kw=kw, tl_=tl_: gluon_hidden_grad_multicast(dout_PD, wd, block, z, tl_, **kw))
        rows.append((f"gluon {cfg}", fn, max(errs)))
    print(f"N={n}: {used} padded rows, {block.shape[1]} row-block slots")
    if args.profile:  # one launch of each under the profiler (ncu: --profile-from-start off)
        torch.cuda.cudart().cudaProfilerStart()
        for _, fn, _ in rows:
            fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    if args.check_only:
        for name, _, err in rows:
            print(f"{name:34s} rel.err {err:.2e}")
        return
    results = []
    for rnd in range(args.rounds):
        for name, fn, err in rows:
            if err == err and err < 1e-2:  # never time a wrong kernel
                results.append((rnd, name, bench(fn), err))
        results.append((rnd, "cuBLAS bmm, 64 equal groups", bench(bmm["hidden grad"]), float("nan")))
        results.append((rnd, "cuBLAS dense", bench(dense["hidden grad"]), float("nan")))
    print(f"{'hidden grad, N=' + str(n):34s} {'ms':>7s} {'TFLOP/s':>8s} {'rel.err':>9s}")
    for rnd, name, ms, err in results:
        print(f"{name:34s} {ms:7.3f} {fl / ms / 1e9:8.0f} {err:9.2e}  (round {rnd})")


if __name__ == "__main__":
    main()
