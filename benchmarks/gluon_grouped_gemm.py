"""Exploratory: a warp-specialized Hopper grouped GEMM in Gluon for the MoE hidden-grad product (GPU, bf16).

    python benchmarks/gluon_grouped_gemm.py [--n 4096] [--configs 128x64x5,pp128x64x5] [--check-only]

    z_p = dout_p @ Wd[e]   for every padded row p of expert e   (z [P, F], dout [P, D], Wd [E, D, F])

the product `_moe_hidden_grad_kernel` computes in model/kernels/moe.py, over the same routing metadata (the
row-block table block_3Mb: expert, first padded row, rows = BLOCK_M or BLOCK_M / 2 per slot). Not wired into
the model: ~10% faster than the Triton kernel on this GEMM, ~1% of a step (benchmarks/README.md, "Gluon
warp-specialized grouped GEMM"). Each config runs beside the committed Triton kernel and cuBLAS (bmm over 64
equal groups, dense) in one process, two rounds, do_bench medians; rel.err against an fp32 torch reference per
expert on NaN-poisoned outputs.

Two kernels (Triton 3.6's `triton.experimental.gluon`, names as that version ships them); both run a persistent
grid of one program per SM that walks the (row block, column tile) list in moe.py's GROUP_M order, skipping unused
slots (expert −1), with a 1-warp TMA producer filling a STAGES-deep shared-memory ring of dout [BM, BK] and weight
[BK, BN] tiles, each stage guarded by a `ready` mbarrier (TMA byte count) and an `empty` mbarrier (released once
the wgmma reading it has retired):
  * `gluon_hidden_grad_kernel` (config BNxBKxSTAGES): the default partition is 8 warps = two consumer
    warpgroups of 64 rows on one BM x BN tile; async `warpgroup_mma`, one group in flight; epilogue bf16 →
    shared memory → TMA store in two 64-row halves (the second skipped for a half block, whose next 64 rows
    belong to the next expert). The producer runs ahead into the next tile while the consumers store.
  * `gluon_hidden_grad_pingpong_kernel` (config ppBNxBKxSTAGES): two 4-warp consumer warpgroups, each owning
    whole 128 x BN tiles, alternate tiles (turn barriers keep their main loops in order), so one's epilogue
    overlaps the other's main loop; the producer is the 4-warp default partition.
Weights go through a 2-D descriptor over Wd viewed as [E·D, F]: D % BK == 0, so a K tile never crosses into
the next expert; columns past F are zero-filled on load and clipped on store.
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


@gluon.jit
def _tile_of(t, n_mb, n_n, GROUP_M: gl.constexpr):
    """Tile index → (row block, column tile), GROUP_M row blocks at a time over every column tile (moe.py's
    `_row_block_tile`)."""
    width = GROUP_M * n_n
    first_m = (t // width) * GROUP_M
    size_m = gl.minimum(n_mb - first_m, GROUP_M)
    return first_m + (t % width) % size_m, (t % width) // size_m


@gluon.jit
def _producer(a_desc, b_desc, block_ptr, a_bufs, b_bufs, ready_bars, empty_bars, n_mb, K,
              BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
              N_COLS: gl.constexpr):
    n_n: gl.constexpr = N_COLS
    n_tiles = n_mb * n_n
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_of(t, n_mb, n_n, GROUP_M)
        e = gl.load(block_ptr + pid_m)
        if e >= 0:
            p0 = gl.load(block_ptr + n_mb + pid_m)
            for k0 in range(0, K, BK):
                s = it % STAGES
                phase = (it // STAGES) & 1
                mbarrier.wait(empty_bars.index(s), phase ^ 1)  # fresh barriers pass parity 1 at once
                mbarrier.expect(ready_bars.index(s), nbytes)
                tma.async_copy_global_to_shared(a_desc, [p0, k0], ready_bars.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [e * K + k0, pid_n * BN], ready_bars.index(s),
                                                b_bufs.index(s))
                it += 1


@gluon.jit
def _consumer(c_desc, block_ptr, a_bufs, b_bufs, c_smem, ready_bars, empty_bars, n_mb, K,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
              GROUP_M: gl.constexpr, N_COLS: gl.constexpr, num_warps: gl.constexpr):
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16])
    n_n: gl.constexpr = N_COLS
    HALF: gl.constexpr = BM // 2
    n_tiles = n_mb * n_n
    it = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_of(t, n_mb, n_n, GROUP_M)
        e = gl.load(block_ptr + pid_m)
        if e >= 0:
            p0 = gl.load(block_ptr + n_mb + pid_m)
            rows = gl.load(block_ptr + 2 * n_mb + pid_m)
            acc = gl.zeros([BM, BN], gl.float32, acc_layout)
            prev = 0
            for k0 in range(0, K, BK):
                s = it % STAGES
                phase = (it // STAGES) & 1
                mbarrier.wait(ready_bars.index(s), phase)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
                # keep one wgmma group in flight: the previous one has retired, so its stage can be refilled
                acc = warpgroup_mma_wait(1, deps=[acc])
                mbarrier.arrive(empty_bars.index(prev), pred=k0 > 0)
                prev = s
                it += 1
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty_bars.index(prev))
            tma.store_wait(0)  # the previous tile's store has finished reading c_smem
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [p0, pid_n * BN], c_smem.slice(0, HALF))
            if rows > HALF:
                tma.async_copy_shared_to_global(c_desc, [p0 + HALF, pid_n * BN], c_smem.slice(HALF, HALF))
    tma.store_wait(0)


@gluon.jit
def gluon_hidden_grad_kernel(a_desc, b_desc, c_desc, block_ptr, n_mb, K,
                             BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                             GROUP_M: gl.constexpr, N_COLS: gl.constexpr, num_warps: gl.constexpr):
    """z[p0 : p0 + rows] = A[p0 : p0 + rows, :K] @ B[e·K : (e + 1)·K, n-tile] for every used row-block slot."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BK, BN], b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, [BM, BN], c_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (c_desc, block_ptr, a_bufs, b_bufs, c_smem, ready_bars, empty_bars, n_mb, K, BM, BN, BK,
                     STAGES, GROUP_M, N_COLS, num_warps)),
        (_producer, (a_desc, b_desc, block_ptr, a_bufs, b_bufs, ready_bars, empty_bars, n_mb, K, BN, BK, STAGES,
                     GROUP_M, N_COLS)),
    ], [1], [40])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))


@gluon.jit
def _pp_producer(a_desc, b_desc, c_desc, block_ptr, a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars,
                 n_mb, K,
                 BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                 GROUP_M: gl.constexpr, N_COLS: gl.constexpr, ROLE: gl.constexpr):
    _producer(a_desc, b_desc, block_ptr, a_bufs, b_bufs, ready_bars, empty_bars, n_mb, K, BN, BK, STAGES, GROUP_M,
              N_COLS)


@gluon.jit
def _pp_consumer(a_desc, b_desc, c_desc, block_ptr, a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars,
                 n_mb, K,
                 BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                 GROUP_M: gl.constexpr, N_COLS: gl.constexpr, ROLE: gl.constexpr):
    """Ping-pong consumer: one warpgroup owns a whole BM x BN tile; the two consumers take alternate used tiles,
    so one's epilogue overlaps the other's main loop. Ring slots of the other consumer's tiles are skipped by
    counting (every used tile takes K / BK slots). The consumers take turns through turn_bars: a consumer starts
    its main loop only after the other has waited on all the slots of its tile, so a ready barrier is never more
    than one phase behind the parity a consumer waits for (without the turns, consumer 1 waited on slots several
    phases ahead, took a stale phase of the same parity as ready, and the kernel faulted)."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    HALF: gl.constexpr = BM // 2
    c_smem = c_bufs.index(ROLE)
    n_tiles = n_mb * N_COLS
    k_steps = K // BK
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile_of(t, n_mb, N_COLS, GROUP_M)
        e = gl.load(block_ptr + pid_m)
        if e >= 0:
            if j % 2 == ROLE:
                mbarrier.wait(turn_bars.index(ROLE), ((j // 2) & 1) ^ (1 - ROLE))  # consumer 0 passes at once
                p0 = gl.load(block_ptr + n_mb + pid_m)
                rows = gl.load(block_ptr + 2 * n_mb + pid_m)
                acc = gl.zeros([BM, BN], gl.float32, acc_layout)
                it = j * k_steps
                prev = 0
                for kk in range(k_steps):
                    s = it % STAGES
                    mbarrier.wait(ready_bars.index(s), (it // STAGES) & 1)
                    acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
                    acc = warpgroup_mma_wait(1, deps=[acc])
                    mbarrier.arrive(empty_bars.index(prev), pred=kk > 0)
                    prev = s
                    it += 1
                mbarrier.arrive(turn_bars.index(1 - ROLE))  # all this tile's slots waited on: the other's turn
                acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(empty_bars.index(prev))
                tma.store_wait(0)
                c_smem.store(acc.to(c_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [p0, pid_n * BN], c_smem.slice(0, HALF))
                if rows > HALF:
                    tma.async_copy_shared_to_global(c_desc, [p0 + HALF, pid_n * BN], c_smem.slice(HALF, HALF))
            j += 1
    tma.store_wait(0)


@gluon.jit
def gluon_hidden_grad_pingpong_kernel(a_desc, b_desc, c_desc, block_ptr, n_mb, K,
                                      BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                                      GROUP_M: gl.constexpr, N_COLS: gl.constexpr):
    """As `gluon_hidden_grad_kernel`, with two ping-pong consumer warpgroups (4-warp workers, 232 registers) and
    the TMA producer as the default partition (num_warps=4)."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BK, BN], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BM, BN], c_desc.layout)
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    fence_async_shared()
    # default partition (num_warps=4) = the TMA producer; both consumers are 4-warp workers.
    gl.warp_specialize([
        (_pp_producer, (a_desc, b_desc, c_desc, block_ptr, a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars,
                        n_mb, K, BM, BN, BK, STAGES, GROUP_M, N_COLS, 0)),
        (_pp_consumer, (a_desc, b_desc, c_desc, block_ptr, a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars,
                        n_mb, K, BM, BN, BK, STAGES, GROUP_M, N_COLS, 0)),
        (_pp_consumer, (a_desc, b_desc, c_desc, block_ptr, a_bufs, b_bufs, c_bufs, ready_bars, empty_bars, turn_bars,
                        n_mb, K, BM, BN, BK, STAGES, GROUP_M, N_COLS, 1)),
    ], [4, 4], [232, 232])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))


def descriptors(dout_PD, wd_EDF, z_PF, BM, BN, BK):
    E, D, F = wd_EDF.shape
    bf = gl.bfloat16 if dout_PD.dtype == torch.bfloat16 else gl.float16
    a_layout = gl.NVMMASharedLayout.get_default_for([BM, BK], bf)
    b_layout = gl.NVMMASharedLayout.get_default_for([BK, BN], bf)
    c_layout = gl.NVMMASharedLayout.get_default_for([BM // 2, BN], bf)
    a = TensorDescriptor.from_tensor(dout_PD, [BM, BK], a_layout)
    b = TensorDescriptor.from_tensor(wd_EDF.view(E * D, F), [BK, BN], b_layout)
    c = TensorDescriptor.from_tensor(z_PF, [BM // 2, BN], c_layout)
    return a, b, c


def gluon_hidden_grad(dout_PD, wd_EDF, block_3Mb, z_PF, BN=256, BK=64, STAGES=3, GROUP_M=8, n_sm=None,
                      pingpong=False):
    E, D, F = wd_EDF.shape
    BM = 128
    assert D % BK == 0
    n_mb = block_3Mb.shape[1]
    a, b, c = descriptors(dout_PD, wd_EDF, z_PF, BM, BN, BK)
    n_sm = n_sm or torch.cuda.get_device_properties(dout_PD.device).multi_processor_count
    n_tiles = n_mb * triton.cdiv(F, BN)
    grid = (min(n_sm, n_tiles),)
    if pingpong:
        gluon_hidden_grad_pingpong_kernel[grid](a, b, c, block_3Mb, n_mb, D, BM=BM, BN=BN, BK=BK, STAGES=STAGES,
                                                GROUP_M=GROUP_M, N_COLS=triton.cdiv(F, BN), num_warps=4,
                                                maxnreg=168)
    else:
        gluon_hidden_grad_kernel[grid](a, b, c, block_3Mb, n_mb, D, BM=BM, BN=BN, BK=BK, STAGES=STAGES,
                                       GROUP_M=GROUP_M, N_COLS=triton.cdiv(F, BN), num_warps=8, maxnreg=168)
    return z_PF


# ----------------------------------------------------------------------------------------------- benchmark
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--configs", default="128x64x5,pp128x64x5")  # [pp]BNxBKxSTAGES; pp = ping-pong
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from kernels import bench  # benchmarks/kernels.py: do_bench median, L2 flushed
    from moe_gemm_ceiling import D, E, F, K, dense_launches, flops, problem, triton_launches

    import model.kernels.moe as moe

    n = args.n
    ref, x, ids_NK, w_NK, dout = problem(n)
    tri, T = triton_launches(n, ref, x, ids_NK, w_NK, dout)
    tiles = moe.default_tiles(D, F, torch.bfloat16, n * K / E)
    with torch.no_grad():
        _, saved = moe.moe_experts_fwd(x.detach(), T["wg"], T["wu"], T["wd"], ids_NK, w_NK.detach(),
                                       save_for_backward=True, tiles=tiles)
    block = saved[1]
    used = int(T["used_rows_1"].item())
    dout_PD, wd = T["dout_PD"], T["wd"]
    # torch reference in fp32 per expert, over the used rows (padding rows of dout_PD are zeros)
    pad_start = T["pad_start_E"].tolist()
    z_ref = torch.zeros(used, F, device="cuda", dtype=torch.float32)
    for e in range(E):
        a0 = pad_start[e]
        a1 = pad_start[e + 1] if e + 1 < E else used
        z_ref[a0:a1] = dout_PD[a0:a1].float() @ wd[e].float()
    tri["hidden grad"]()
    torch.cuda.synchronize()
    err_tri = ((T["z_PF"][:used].float() - z_ref).norm() / z_ref.norm()).item()
    fl = flops(n)["hidden grad"]
    dense, bmm = dense_launches(n)
    rows = [("triton (moe.py)", tri["hidden grad"], err_tri)]
    for cfg in args.configs.split(","):
        pp = cfg.startswith("pp")
        BN, BK, S = (int(v) for v in cfg.removeprefix("pp").split("x"))
        z = torch.full_like(T["z_PF"], float("nan"))
        fn = (lambda BN=BN, BK=BK, S=S, z=z, pp=pp: gluon_hidden_grad(dout_PD, wd, block, z, BN=BN, BK=BK,
                                                                      STAGES=S, pingpong=pp))
        fn()
        torch.cuda.synchronize()
        err = ((z[:used].float() - z_ref).norm() / z_ref.norm()).item()  # nan if any used row is unwritten
        rows.append((f"gluon{' ping-pong' if pp else ''} BN={BN} BK={BK} st={S}", fn, err))
    print(f"N={n}: {used} padded rows, {block.shape[1]} row-block slots")
    if args.check_only:
        for name, _, err in rows:
            print(f"{name:34s} rel.err {err:.2e}")
        return
    results = []
    for rnd in range(2):
        for name, fn, err in rows:
            results.append((rnd, name, bench(fn), err))
        results.append((rnd, "cuBLAS bmm, 64 equal groups", bench(bmm["hidden grad"]), float("nan")))
        results.append((rnd, "cuBLAS dense", bench(dense["hidden grad"]), float("nan")))
    print(f"{'hidden grad, N=' + str(n):34s} {'ms':>7s} {'TFLOP/s':>8s} {'rel.err':>9s}")
    for rnd, name, ms, err in results:
        print(f"{name:34s} {ms:7.3f} {fl / ms / 1e9:8.0f} {err:9.2e}  (round {rnd})")


if __name__ == "__main__":
    main()
