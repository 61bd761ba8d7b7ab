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

The kernel is model/kernels/moe_hopper/wgrad.py's `weight_grad` (design in its docstring; moe.py runs it on Hopper
GPUs); this script sweeps its launch shapes, configs 'KINDBIxBJxBKxSTAGES[eEPI_N]' (`parse_config` → `WgradTile`):
KIND pp (ping-pong 128 × 128 tiles) or si / sj (split 256 × 128 / 128 × 256), EPI_N the columns per epilogue store
piece.

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's model/, not benchmarks/model.py
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from model.kernels.moe_hopper import WgradTile, weight_grad  # noqa: E402


# ----------------------------------------------------------------------------------------------- benchmark
def parse_config(cfg) -> WgradTile:
    """'KINDBIxBJxBKxSTAGES[eEPI_N]', KIND in pp (ping-pong), si / sj (split along I / J)."""
    m = re.fullmatch(r"(pp|si|sj)(\d+)x(\d+)x(\d+)x(\d+)(?:e(\d+))?", cfg)
    if m is None:
        raise ValueError(f"bad config {cfg!r}")
    return WgradTile(m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]) if m[6] else None)


def gluon_weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, tile: WgradTile):
    weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, tile)
    return c_GEIJ


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
        fn = (lambda c=c, kw=kw: gluon_weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c, kw))
        fn()
        c_empty = torch.full_like(c_tri, float("nan"))
        gluon_weight_grad(a_GPI, b_PJ, pad_start_E, empty_count_E, c_empty, kw)
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
    """Whole moe_experts fwd+bwd step, the Triton weight-gradient kernel vs these configs (monkeypatched into
    `_weight_grad`), alternating."""
    from kernels import bench, rel_err
    from moe_gemm_ceiling import step_fn

    committed = moe._weight_grad

    def triton_kernel(tile, a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, prec, hopper_tile=None):
        return committed(tile, a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, prec)  # never the Hopper kernel

    def patched(tile, a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, prec, hopper_tile=None):
        if a_GPI.dtype != torch.bfloat16:
            return triton_kernel(tile, a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, prec)
        gluon_weight_grad(a_GPI, b_PJ, pad_start_E, count_E, c_GEIJ, best["dWd" if a_GPI.shape[0] == 1 else "dWg+dWu"])

    step = step_fn(*prob)
    variants = (("triton", triton_kernel), ("gluon", patched))
    grads, times = {}, {label: [] for label, _ in variants}
    try:
        for label, wg in variants:
            moe._weight_grad = wg
            grads[label] = step()
        errs = ", ".join(f"{rel_err(a, b):.1e}" for a, b in zip(grads["gluon"], grads["triton"]))
        print(f"step gradients gluon vs triton (dx, dWg, dWu, dWd, dw): {errs}")
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
