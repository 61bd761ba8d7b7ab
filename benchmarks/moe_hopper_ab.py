"""Same-process A/B of the MoE experts fwd+bwd step with the Hopper Gluon kernels off and on (GPU).

    python benchmarks/moe_hopper_ab.py [--n 4096,8192,16384] [--rounds 5] [--profile-steps 10] [--drop]
                                       [--arms triton,no_gate_up,hopper] [--down-tiles pp5,sp3,...]

Arms (ARMS: `MoETiles` switches): `triton` (hopper False: moe.py's Triton kernels everywhere), `no_gate_up` (the
model/kernels/moe_hopper/ kernels where `usable` and they fit, but gate_up on moe.py's Triton kernel), `hopper`
(the default: every moe_hopper kernel where it applies, the Gluon gate_up included). V2-Lite expert shapes in
bf16, the routing of benchmarks/kernels.py (uniform random top-6 of 64; --drop: 10% of the assignments dropped, as
its "drop10%" rows), `moe_experts_fwd` + `moe_experts_bwd` timed
by do_bench (median, L2 flushed) in alternating rounds; prints each arm's median, min-max and % of the H100 bf16
peak, and per output and gradient whether it is identical to the bit to the first arm's (else its rel.err).
--down-tiles: the down projection alone at the step's routing, moe.py's Triton kernel against moe_hopper's
`down_proj` with the launch shapes named in `down_tiles`, median of 3 alternating rounds.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from dataclasses import replace

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's model/

import model.kernels.moe as moe  # noqa: E402

E, D, F, K = 64, 2048, 1408, 6
PEAK_TFLOPS = 989.0
ARMS = {"triton": {"hopper": False, "hopper_gate_up": False}, "no_gate_up": {"hopper": True, "hopper_gate_up": False},
        "hopper": {"hopper": True, "hopper_gate_up": True}}


def down_tiles() -> dict:
    """Named launch shapes for --down-tiles."""
    from model.kernels.moe_hopper import IgradTile

    split = IgradTile(block_n=256, stages=3, split=True)
    return {"pp5": IgradTile(), "pp4": IgradTile(stages=4), "pp6": IgradTile(stages=6),
            "pp5h": IgradTile(half_rows=True), "sp3": split, "sp4": IgradTile(block_n=256, stages=4, split=True)}


def profile(step, arms, n_tokens: int, steps: int) -> None:
    """Device time per step of each arm's GEMM kernels and of all its kernels (torch profiler over `steps` steps)."""
    for arm in arms:
        step(arm)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(arm)
            torch.cuda.synchronize()
        per_kernel = {e.key: e.device_time_total / steps / 1e3 for e in prof.key_averages()
                      if e.device_time_total > 0}
        gemms = ", ".join(f"{name} {ms:.3f}" for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])
                          if any(k in name for k in ("grad", "gate_up", "down", "swiglu")))
        print(f"N={n_tokens} {arm:12s} device ms per step: all device work {sum(per_kernel.values()):.3f}; {gemms}",
              flush=True)


def ab(n_tokens: int, rounds: int, profile_steps: int, drop: bool, arms: list[str], down_names: list[str]) -> None:
    torch.manual_seed(0)
    wg, wu = ((torch.randn(E, F, D, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(2))
    wd = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(n_tokens, D, device="cuda", dtype=torch.bfloat16)
    w_NK, ids_NK = torch.randn(n_tokens, E, device="cuda").softmax(-1).topk(K, dim=-1)
    dout = torch.randn(n_tokens, D, device="cuda", dtype=torch.bfloat16)
    keep_NK = (torch.rand(n_tokens, K, device="cuda") > 0.1) if drop else None
    base = moe.default_tiles(D, F, torch.bfloat16, n_tokens * K / E)

    def step(arm: str):
        tiles = replace(base, **ARMS[arm])
        out, saved = moe.moe_experts_fwd(x, wg, wu, wd, ids_NK, w_NK, keep_NK, save_for_backward=True, tiles=tiles)
        return (out, *moe.moe_experts_bwd(dout, x, wg, wu, wd, K, saved, tiles=tiles))

    ref = step(arms[0])
    diff = {}
    for arm in arms:  # per output: "=" identical to the bit to the first arm's, else its rel.err
        outs = step(arm)
        diff[arm] = " ".join("=" if torch.equal(a, b) else f"{((a.double() - b.double()).norm() / b.double().norm()):.1e}"
                             for a, b in zip(outs, ref))
    times = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm in times:
            times[arm].append(triton.testing.do_bench(lambda a=arm: step(a), warmup=25, rep=150, return_mode="median"))
    kept = n_tokens * K if keep_NK is None else int(keep_NK.sum())  # useful FLOPs: kept assignments only
    flops = 18 * kept * D * F
    for arm, ts in times.items():
        med = statistics.median(ts)
        label = f"N={n_tokens}{' drop10%' if drop else ''} {arm:12s}"
        print(f"{label} median {med:.3f} ms ({100 * flops / med / 1e9 / PEAK_TFLOPS:.1f}% of peak), "
              f"min-max {min(ts):.3f}-{max(ts):.3f}; out dx dWg dWu dWd dw vs the {arms[0]} arm's: {diff[arm]}",
              flush=True)
    if profile_steps:
        profile(step, arms, n_tokens, profile_steps)
    if down_names:
        down_sweep(n_tokens, wd, ids_NK, keep_NK, base, down_names)


def down_sweep(n_tokens: int, wd: torch.Tensor, ids_NK, keep_NK, base, names: list[str]) -> None:
    """The down projection alone: moe.py's Triton kernel and moe_hopper's `down_proj` per named launch shape."""
    from model.kernels import moe_hopper
    from model.kernels._util import dot_precision

    row_P, block_3Mb, pad_start_E, count_E, _, _ = moe.route_metadata(ids_NK, keep_NK, E, base.block_m)
    P, n_mb = row_P.numel(), block_3Mb.shape[1]
    h = torch.randn(P, F, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(n_tokens * K, D, device="cuda", dtype=torch.bfloat16)
    t = base.down
    fns = {"triton": functools.partial(
        moe._launch, moe._moe_down_kernel, t, n_mb * triton.cdiv(D, t.n), h, wd, row_P, block_3Mb, y, n_mb, D, F,
        PRECISION=dot_precision(torch.bfloat16), EVEN_K=F % t.k == 0, BLOCK_M=base.block_m, BLOCK_N=t.n,
        BLOCK_K=t.k, GROUP_M=base.group_m)}
    tiles = down_tiles()
    for name in names:
        fns[name] = functools.partial(moe_hopper.down_proj, h, wd, row_P, block_3Mb, pad_start_E, count_E, y,
                                      tiles[name])
    times = {name: [] for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    flops = 2 * int(count_E.sum()) * D * F
    print(f"N={n_tokens} down projection alone (ms, TFLOP/s): " + ", ".join(
        f"{name} {statistics.median(ts):.3f} {flops / statistics.median(ts) / 1e9:.0f}" for name, ts in times.items()),
        flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="4096,8192,16384")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drop", action="store_true", help="drop 10%% of the assignments (capacity)")
    parser.add_argument("--profile-steps", type=int, default=0, help="then each arm's kernel device times over "
                        "this many steps (torch profiler)")
    parser.add_argument("--arms", default="triton,no_gate_up,hopper", help=f"which of {', '.join(ARMS)}; the first is the "
                        "reference of the bit-identity column")
    parser.add_argument("--down-tiles", default="", help="then the down projection alone with these launch shapes "
                        f"({', '.join(down_tiles())})")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe_hopper_ab.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for n in (int(v) for v in args.n.split(",") if v):
        ab(n, args.rounds, args.profile_steps, args.drop, args.arms.split(","),
           [v for v in args.down_tiles.split(",") if v])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
