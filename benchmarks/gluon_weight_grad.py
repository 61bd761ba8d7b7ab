"""Exploratory: a warp-specialized persistent Gluon kernel for the MoE weight-gradient GEMMs (GPU, bf16).

    python benchmarks/gluon_weight_grad.py [--n 4096,16384] [--dwd pp128x128x64x5,...] [--dwgu ...]
                                           [--rounds 2] [--step-rounds 5] [--check-only]

    C[g, e] [DI, DJ] = Σ over expert e's padded rows p of A[g, p, :]ᵀ ⊗ B[p, :]
        dWd:        G = 1, A = dout_PD [1, P, D],   B = hw_PF [P, F]  → C = dWd [1, E, D, F]
        dWg, dWu:   G = 2, A = dgu_2PF [2, P, F],   B = x_PD [P, D]   → C = [dWg; dWu] [2, E, F, D]

the products `_moe_weight_grad_kernel` computes in model/kernels/moe.py (`_weight_grad`), over the same routing
metadata: expert e's rows are pad_start_E[e] .. pad_start_E[e] + count_E[e], padded with zero rows to a multiple
of 64 (block_m / 2), so a reduction step of BK | 64 rows never leaves the expert's run and needs no row mask; an
expert with no rows gets a zero gradient (its tiles run no step and store the zero accumulator).

Design (Triton 3.6's `triton.experimental.gluon`): a persistent grid of one program per SM walks the output
tiles (e, g, i-tile, j-tile), j fastest, expert-major (the tiles in flight share one expert's rows in L2). The
default partition (4 warps) is the TMA producer: per reduction step it loads A [BK, BI] (rows × DI, DI
contiguous) and B [BK, BJ] into a STAGES-deep shared-memory ring guarded by `ready` (TMA byte count) and
`empty` mbarriers. Both operands are MN-major in shared memory: the wgmma A operand is the A tile permuted to
[BI, BK] (a transposed shared-memory view; wgmma reads 16-bit operands either way), B is [BK, BJ] as loaded.
Two 4-warp consumer warpgroups (232 registers each) run async `warpgroup_mma` with one group in flight; the
epilogue goes bf16 → shared memory → TMA store through `_pp_store` of benchmarks/gluon_grouped_gemm.py. Configs
'KINDBIxBJxBKxSTAGES[eEPI_N]' (`parse_config`):
  * pp: ping-pong. Each consumer owns whole BI × BJ = 128 × 128 tiles and the two take alternate tiles (turn
    barriers order their main loops, as in gluon_grouped_gemm.py), so one's epilogue (a 32 KB tile store per
    ~6 reduction steps at ~384 rows per expert: the stores are ~1.1 GB per step at N=4096) overlaps the
    other's main loop. Empty slot count 1.
  * si / sj: split. Both consumers work on one 256 × 128 (si: halves along I) or 128 × 256 (sj: along J) tile,
    each on its 128 × 128 half of the accumulator, reading one shared ring slot (empty count 2): a quarter less
    operand traffic per FLOP than 128 × 128 tiles, but the epilogue is not hidden behind another main loop.
  EPI_N: columns per epilogue piece (BJ or BJ / 2), through one [128, EPI_N] buffer per consumer.
  On an H100 (benchmarks/README.md, "Gluon weight-gradient GEMMs"): pp128x128x64x6e64 is fastest at ~384 rows per
  expert (N=4096: 16-19% faster than the Triton kernel, level with cuBLAS bmm on equal groups), the split tiles at
  ~1536 (N=16384), where ping-pong 128 × 128 falls below Triton.
Output tiles must not cross an expert's block: DI % BI == 0 (asserted; TMA clips columns past DJ).

The benchmark runs, per N, on the step's real operands (benchmarks/moe_gemm_ceiling.py `triton_launches`): each
config on NaN-poisoned outputs against an fp32 torch reference per expert (all experts at N=4096, the first 16
above that, plus the Triton kernel's output over all), an empty-expert check (experts 1 and E−1 given no rows:
their gradient must be exactly zero, the others unchanged), then do_bench medians (L2 flushed) of the committed
Triton kernel, each config and cuBLAS bmm over 64 equal groups, alternating over --rounds; then the whole
`moe_experts` fwd+bwd step with `model.kernels.moe._weight_grad` monkeypatched to the fastest config of each
GEMM, --step-rounds alternating rounds against the unpatched step in the same process.
"""

from __future__ import annotations

import argparse
import os
import re
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
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from gluon_grouped_gemm import _pp_store  # noqa: E402  (bf16 → shared memory → TMA store, 64-row halves)


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
            tma.async_copy_global_to_shared(a_desc, [g * P + start + r, ti * BI], ready_bars.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [start + r, tj * BJ], ready_bars.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _wgrad_mainloop(a_bufs, b_bufs, ready_bars, empty_bars, it, nk, I_OFF: gl.constexpr, WI: gl.constexpr,
                    J_OFF: gl.constexpr, WJ: gl.constexpr):
    """acc [WI, WJ] = Σ over the next nk ring slots of A_slot[:, I_OFF : I_OFF + WI]ᵀ @ B_slot[:, J_OFF : J_OFF + WJ]
    (A permuted in shared memory: an MN-major wgmma operand), one wgmma group in flight; each slot but the last is
    released once the wgmma reading it has retired. Returns (acc, last slot); nk = 0 gives zeros. (gluon_grouped_gemm's
    `_pp_mainloop` with the per-slot view changed: a permuted, sliced 3-D view of the ring passed to it instead
    asserts in Triton 3.6 for a ring depth that is not a power of two.)"""
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
    so no ready barrier is ever a whole phase behind: see gluon_grouped_gemm.py's `_pp_consumer`). Split: every
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
            _pp_store(c_desc, c_smem, acc, (g * E + e) * (N_I * BI) + ti * BI + I_OFF, tj * BJ + J_OFF, WI, EPI_N)
        it += nk
        j += 1
    tma.store_wait(0)


@gluon.jit
def gluon_weight_grad_kernel(a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, G: gl.constexpr,
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
    ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=1 if SPLIT_I * SPLIT_J == 1 else 2)
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_wgrad_producer, (a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                           empty_bars, turn_bars, G, N_I, N_J, SPLIT_I, SPLIT_J, 0)),
        (_wgrad_consumer, (a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                           empty_bars, turn_bars, G, N_I, N_J, SPLIT_I, SPLIT_J, 0)),
        (_wgrad_consumer, (a_desc, b_desc, c_desc, start_ptr, count_ptr, n_tiles, P, a_bufs, b_bufs, c_bufs, ready_bars,
                           empty_bars, turn_bars, G, N_I, N_J, SPLIT_I, SPLIT_J, 1)),
    ], [4, 4], [232, 232])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready_bars.index(i))
        mbarrier.invalidate(empty_bars.index(i))


def weight_grad_launch(a_GPI, b_PJ, c_GEIJ, kind="pp", BI=128, BJ=128, BK=64, STAGES=5, EPI_N=None):
    """Descriptors, grid and constexprs of one launch → (kernel, grid, args, constexpr kwargs)."""
    G, P, DI = a_GPI.shape
    E, DJ = c_GEIJ.shape[1], c_GEIJ.shape[3]
    split_i, split_j = {"pp": (1, 1), "si": (2, 1), "sj": (1, 2)}[kind]
    WI, WJ = BI // split_i, BJ // split_j
    EPI_N = EPI_N or WJ
    assert (WI, WJ) == (128, 128) and WJ // EPI_N in (1, 2), (kind, BI, BJ, EPI_N)
    assert DI % BI == 0 and 64 % BK == 0, "an output tile must stay in one expert's block; BK must divide 64"
    assert c_GEIJ.shape == (G, E, DI, DJ) and b_PJ.shape[0] == P
    bf = gl.bfloat16 if a_GPI.dtype == torch.bfloat16 else gl.float16

    def desc(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, bf))

    a = desc(a_GPI.view(G * P, DI), [BK, BI])
    b = desc(b_PJ, [BK, BJ])
    c = desc(c_GEIJ.view(G * E * DI, DJ), [WI // 2, EPI_N])
    n_i, n_j = DI // BI, triton.cdiv(DJ, BJ)
    n_tiles = G * E * n_i * n_j
    n_sm = torch.cuda.get_device_properties(a_GPI.device).multi_processor_count
    const = dict(G=G, N_I=n_i, N_J=n_j, STAGES=STAGES, SPLIT_I=split_i, SPLIT_J=split_j, num_warps=4, maxnreg=168)
    return gluon_weight_grad_kernel, (min(n_sm, n_tiles),), [a, b, c, None, None, n_tiles, P], const


def gluon_weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, **cfg):
    """C [G, E, DI, DJ] ← Σ_rows A[g, rows]ᵀ B[rows] per expert (moe.py `_weight_grad`'s product); cfg: parse_config."""
    kernel, grid, args, const = weight_grad_launch(a_GPI.contiguous(), b_PJ.contiguous(), c_GEIJ, **cfg)
    args[3], args[4] = pad_start_E, count_E
    kernel[grid](*args, **const)
    return c_GEIJ


# ----------------------------------------------------------------------------------------------- benchmark
def parse_config(cfg):
    """'KINDBIxBJxBKxSTAGES[eEPI_N]', KIND in pp (ping-pong), si / sj (split along I / J) → gluon_weight_grad's
    keywords."""
    m = re.fullmatch(r"(pp|si|sj)(\d+)x(\d+)x(\d+)x(\d+)(?:e(\d+))?", cfg)
    if m is None:
        raise ValueError(f"bad config {cfg!r}")
    return dict(kind=m[1], BI=int(m[2]), BJ=int(m[3]), BK=int(m[4]), STAGES=int(m[5]),
                EPI_N=int(m[6]) if m[6] else None)


def weight_grad_reference(a_GPI, b_PJ, pad_start: list[int], count: list[int], experts) -> torch.Tensor:
    """fp32 C[g, e] = A[g, rows]ᵀ B[rows] over expert e's own rows (no padding rows), for the listed experts."""
    G, _, DI = a_GPI.shape
    ref = torch.zeros(G, len(experts), DI, b_PJ.shape[1], device=a_GPI.device)
    for k, e in enumerate(experts):
        r0, r1 = pad_start[e], pad_start[e] + count[e]
        ref[:, k] = a_GPI[:, r0:r1].float().transpose(1, 2) @ b_PJ[r0:r1].float()
    return ref


def check_and_time(name, a_GPI, b_PJ, c_tri, tri_fn, bmm_fn, pad_start_E, count_E, cfgs, experts, fl, rounds,
                   check_only):
    """Correctness of each config (fp32 reference, Triton output, empty experts), then `rounds` alternating
    do_bench rounds of Triton, each config and cuBLAS bmm. Returns the fastest config's keywords."""
    from kernels import bench, rel_err  # benchmarks/kernels.py: do_bench median, L2 flushed

    E = count_E.numel()
    ref = weight_grad_reference(a_GPI, b_PJ, pad_start_E.tolist(), count_E.tolist(), experts)
    rows = [("triton (moe.py)", tri_fn)]
    print(f"{name} triton (moe.py)        rel.err {rel_err(c_tri[:, experts], ref):.2e} (fp32 ref)")
    empty_count_E = count_E.clone()
    empty_count_E[1] = empty_count_E[E - 1] = 0  # experts 1 and E-1 get no rows
    keep = [e for e in range(E) if e not in (1, E - 1)]
    for cfg in cfgs.split(","):
        kw = parse_config(cfg)
        c = torch.full_like(c_tri, float("nan"))
        fn = (lambda c=c, kw=kw: gluon_weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c, **kw))
        fn()
        c_empty = torch.full_like(c_tri, float("nan"))
        gluon_weight_grad(a_GPI, b_PJ, pad_start_E, empty_count_E, c_empty, **kw)
        torch.cuda.synchronize()
        empty_max = c_empty[:, [1, E - 1]].float().abs().max().item()  # nan if unwritten
        print(f"{name} {cfg:22s} rel.err {rel_err(c[:, experts], ref):.2e} (fp32 ref; nan if a tile is unwritten), "
              f"{rel_err(c, c_tri):.2e} (vs triton); empty experts max|C| {empty_max}, other experts identical: "
              f"{torch.equal(c_empty[:, keep], c[:, keep])}")
        rows.append((f"gluon {cfg}", fn))
    if check_only:
        return None
    times = {label: [] for label, _ in rows + [("cuBLAS bmm, 64 equal groups", bmm_fn)]}
    for _ in range(rounds):
        for label, fn in rows + [("cuBLAS bmm, 64 equal groups", bmm_fn)]:
            times[label].append(bench(fn))
    print(f"{name:34s} ms per round (TFLOP/s of the median)")
    for label, ts in times.items():
        print(f"{label:34s} {' / '.join(f'{t:.3f}' for t in ts)}  ({fl / statistics.median(ts) / 1e9:.0f})")
    fastest = min(rows[1:], key=lambda r: statistics.median(times[r[0]]))[0]
    print(f"{name}: fastest gluon config {fastest}")
    return parse_config(fastest.removeprefix("gluon "))


def step_ab(moe, prob, best, n_tokens, rounds):
    """Whole moe_experts fwd+bwd step, committed vs `_weight_grad` monkeypatched to the best configs, alternating."""
    from kernels import bench, rel_err
    from moe_gemm_ceiling import step_fn

    committed = moe._weight_grad

    def patched(tile, a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, prec):
        if a_GPI.dtype != torch.bfloat16:
            return committed(tile, a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, prec)
        gluon_weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, **best["dWd" if a_GPI.shape[0] == 1 else "dWg+dWu"])

    step = step_fn(*prob)
    variants = (("committed", committed), ("gluon", patched))
    grads, times = {}, {label: [] for label, _ in variants}
    try:
        for label, wg in variants:
            moe._weight_grad = wg
            grads[label] = step()
        errs = ", ".join(f"{rel_err(a, b):.1e}" for a, b in zip(grads["gluon"], grads["committed"]))
        print(f"step gradients gluon vs committed (dx, dWg, dWu, dWd, dw): {errs}")
        for _ in range(rounds):
            for label, wg in variants:
                moe._weight_grad = wg
                times[label].append(bench(step))
    finally:
        moe._weight_grad = committed
    total = 18 * n_tokens * 6 * 2048 * 1408  # FLOPs of the step (moe_gemm_ceiling: 6 GEMMs, 2·A·D·F each x 3)
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"step N={n_tokens} {label:10s} median {med:.3f} ms ({100 * total / med / 1e9 / 989:.1f}% of peak), "
              f"min-max {min(ts):.3f}-{max(ts):.3f}; rounds {' '.join(f'{t:.3f}' for t in ts)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="4096,16384")
    parser.add_argument("--dwd", default="pp128x128x64x5,pp128x128x64x6e64,si256x128x64x4e64,si256x128x64x3")
    parser.add_argument("--dwgu", default="pp128x128x64x5,pp128x128x64x6e64,sj128x256x64x4e64,sj128x256x64x3")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--step-rounds", type=int, default=5, help="0: no whole-step A/B")
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moe_gemm_ceiling import dense_launches, flops, problem, triton_launches

    import model.kernels.moe as moe

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for n in (int(v) for v in args.n.split(",") if v):
        prob = problem(n)
        tri, T = triton_launches(n, *prob)
        count = T["count_E"].tolist()
        experts = list(range(len(count))) if n <= 4096 else list(range(16))
        print(f"\nN={n}: {int(T['used_rows_1'].item())} padded rows, rows per expert {min(count)}..{max(count)}; "
              f"fp32 reference over {len(experts)} experts")
        _, bmm = dense_launches(n)
        best = {}
        for name, a, b, c_tri, cfgs in (("dWd", T["dout_PD"][None], T["hw_PF"], T["dwd_1EDF"], args.dwd),
                                        ("dWg+dWu", T["dgu_2PF"], T["x_PD"], T["dwgu_2EFD"], args.dwgu)):
            best[name] = check_and_time(name, a, b, c_tri, tri[name], bmm[name], T["pad_start_E"], T["count_E"], cfgs,
                                        experts, flops(n)[name], args.rounds, args.check_only)
        del tri, T, bmm
        torch.cuda.empty_cache()
        if not args.check_only and args.step_rounds > 0:
            step_ab(moe, prob, best, n, args.step_rounds)
        del prob
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
