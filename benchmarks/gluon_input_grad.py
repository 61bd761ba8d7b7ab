"""Exploratory: a warp-specialized persistent Gluon kernel for the MoE input-gradient GEMM (GPU, bf16).

    python benchmarks/gluon_input_grad.py [--n 4096,16384] [--configs pp128x64x5xc,...]
                                          [--mode bench|check|profile] [--rounds 3]

    dx_a = dg_p @ Wg[e] + du_p @ Wu[e]   for every padded row p of expert e, a = row_P[p]

the product of model/kernels/moe.py's `_moe_input_grad_kernel`, over the same routing metadata. Shapes: P padded
rows, A = N·K assignments, E experts, D hidden, F expert width; dgu_2PF the planes [dg; du] [2, P, F], Wg, Wu
[E, F, D], dxa_AD [A, D]. One reduction of K = 2F in two segments (dg against Wg, then du against Wu), each output
row scattered to its assignment a = row_P[p] (padding rows, row_P = −1, are not stored). Row-block table
block_3Mb [3, Mb]: expert (−1: unused slot), first padded row, rows (128, or 64 for an expert's last block when
that covers it).

The kernel is model/kernels/moe_hopper/row_gemm.py's `input_grad` (design in its docstring; moe.py runs it on Hopper
GPUs); this script sweeps its launch shapes: configs '[pp|sp]BNxBKxSTAGES' + options (gluon_grouped_gemm.parse_config's
grammar: h half blocks as 64-row tiles, x expert-major tile order, gN GROUP_M, eN scatter piece width) + a final
'c' for the converted scatter epilogue (`config_tile` → `IgradTile`).
Output: per N, the committed Triton launch (moe_gemm_ceiling.triton_launches, on the step's real tensors), each
config and cuBLAS bmm on 64 equal groups, three rounds of do_bench medians, rel.err against an fp32 torch reference
on NaN-poisoned outputs. (Until the kernel moved into the model this script also ran a whole-step A/B by wrapping
moe.py's launches; the step with the Hopper kernels on and off is now benchmarks/moe_hopper_ab.py.)

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

# the repo's model/ (not benchmarks/model.py) for moe_hopper here and moe_gemm_ceiling's imports
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gluon_grouped_gemm import parse_config  # noqa: E402

from model.kernels.moe_hopper import IgradTile, input_grad  # noqa: E402


def config_tile(cfg: str) -> IgradTile:
    """'[pp|sp]BNxBKxSTAGES' + options (gluon_grouped_gemm.parse_config: h, x, gN, eN) + a final 'c' for the
    converted epilogue → the launch shape."""
    kw = parse_config(cfg.removesuffix("c"))
    return IgradTile(block_n=kw["BN"], block_k=kw["BK"], stages=kw["STAGES"], split=kw["split"],
                     convert=cfg.endswith("c"), epi_n=None if kw["EPI_N"] == kw["BN"] else kw["EPI_N"],
                     half_rows=kw["half_rows"], expert_order=kw["expert_order"], group_m=kw["GROUP_M"])


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
        fn = functools.partial(input_grad, T["dgu_2PF"], T["wg"], T["wu"], T["row_P"], T["block_3Mb"],
                               T["pad_start_E"], T["count_E"], out, config_tile(cfg))
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="4096,16384")
    parser.add_argument("--configs", default="pp128x64x5xc,pp128x64x5x,pp128x64x4xc,sp256x64x3xc,sp256x64x3c")
    parser.add_argument("--mode", choices=("bench", "check", "profile"), default="bench")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    ns = [int(v) for v in args.n.split(",") if v]
    configs = [c for c in args.configs.split(",") if c]
    for n in ns:
        isolated(n, configs, args.mode, args.rounds)
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
