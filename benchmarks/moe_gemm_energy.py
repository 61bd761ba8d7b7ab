"""Energy per call of each MoE GEMM at the H100's power cap, ping-pong against split tiles (GPU only).

    python benchmarks/moe_gemm_energy.py [--n 4096,8192,16384] [--secs 2.5] [--routing random|balanced]
                                         [--only "down pp|down split"]

Each of the six grouped GEMMs of the routed experts' step (model/kernels/moe_hopper/, V2-Lite shapes, bf16) runs
alone, back to back, for --secs seconds while nvidia-smi samples the board every 50 ms. Time per call comes from CUDA
events over the steady part (after the first second); power is the mean over the samples of that part, both the
1-s average (`power.draw`) and the instantaneous reading (`power.draw.instant`). Energy per call = mean power × time,
GFLOP/J = useful FLOPs (2·A·D·F per GEMM of the assignments, padding rows not counted) / energy. Why: the H100 holds
these kernels at its 700 W limit (SM clock 1.3-1.6 GHz, "SW Power Cap" active), so a kernel's time at the cap is its
energy per call over ~695 W, and a change that saves device time in a short burst can save nothing there.

Session 9's energy table averaged power over samples that began before the load (the 1-s average lags): it read
520-590 W; measured over the steady part every GEMM draws 650-700 W (benchmarks/README.md "Session 10").

--routing balanced gives every expert exactly N·K/E rows (token n routed to experts n·K .. n·K + K − 1 mod E): no
half blocks and no padding rows, the ceiling of what cutting padding work could give.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the repo root: benchmarks/model.py shadows model

from kernels import smi_samples  # noqa: E402

import model.kernels.moe as moe  # noqa: E402
from model.kernels import moe_hopper as mh  # noqa: E402

E, D, F, K = 64, 2048, 1408, 6
"""V2-Lite's routed experts: count, hidden size, expert intermediate size, experts per token."""
FIELDS = "power.draw,power.draw.instant,clocks.sm,clocks_event_reasons.sw_power_cap"
STEADY_AFTER_S = 1.0


def sample(fn, secs: float) -> tuple[float, float, float, float, str]:
    """fn run back to back for secs seconds: (ms per call, mean W 1-s average, mean W instantaneous, mean SM MHz,
    power-cap samples / samples), all over the part after STEADY_AFTER_S."""
    with smi_samples("timestamp," + FIELDS) as rows:
        time.sleep(0.2)
        t0, n, start = time.time(), 0, None
        stop = torch.cuda.Event(enable_timing=True)
        while time.time() - t0 < secs:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            if start is None and time.time() - t0 > STEADY_AFTER_S:
                start, n, t_steady = torch.cuda.Event(enable_timing=True), 0, time.time()
                start.record()
            elif start is not None:
                n += 20
        stop.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / max(n, 1)
    steady = rows[int(len(rows) * (t_steady - t0 + 0.2) / (secs + 0.2)):]
    vals = [(float(r[1]), float(r[2]), float(r[3]), r[4].strip() == "Active") for r in steady
            if len(r) >= 5 and r[1].replace(".", "").isdigit() and r[2].replace(".", "").isdigit()]
    if not vals:
        raise RuntimeError("nvidia-smi gave no power samples for the steady part; run longer (--secs)")
    return (ms, statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals),
            statistics.mean(v[2] for v in vals), f"{sum(v[3] for v in vals)}/{len(vals)}")


def gemms(n_tokens: int, routing: str) -> dict:
    """name → (call, FLOPs / (2·A·D·F)) for the six GEMMs at n_tokens, each with its ping-pong and split tiles."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    wg, wu = ((torch.randn(E, F, D, device="cuda", dtype=dt) * 0.02) for _ in range(2))
    wd = torch.randn(E, D, F, device="cuda", dtype=dt) * 0.02
    x = torch.randn(n_tokens, D, device="cuda", dtype=dt)
    ids = torch.randn(n_tokens, E, device="cuda").softmax(-1).topk(K, dim=-1).indices
    if routing == "balanced":
        ids = (torch.arange(n_tokens, device="cuda")[:, None] * K + torch.arange(K, device="cuda")) % E
    dout = torch.randn(n_tokens, D, device="cuda", dtype=dt)
    row_P, block_3Mb, pad_start_E, count_E, _, used_rows_1 = moe.route_metadata(ids, None, E, mh.HGRAD_BLOCK_M)
    P = row_P.numel()
    x_PD, dout_PD = moe._gather_rows(x, dout, row_P, used_rows_1, K, mh.HGRAD_BLOCK_M)
    h = torch.randn(P, F, device="cuda", dtype=dt) * 0.1
    gu = torch.empty(2, P, F, device="cuda", dtype=dt)
    dgu = torch.randn(2, P, F, device="cuda", dtype=dt) * 0.1
    hw = torch.randn(P, F, device="cuda", dtype=dt) * 0.1
    y = torch.empty(n_tokens * K, D, device="cuda", dtype=dt)
    z = torch.empty(P, F, device="cuda", dtype=dt)
    dwgu = torch.empty(2, E, F, D, device="cuda", dtype=dt)
    dwd = torch.empty(1, E, D, F, device="cuda", dtype=dt)
    dxa = torch.empty(n_tokens * K, D, device="cuda", dtype=dt)
    pp, split = mh.IgradTile(), mh.IgradTile(block_n=256, stages=3, split=True)
    few, many = 1, 1e9  # rows per expert: the tile choosers' ping-pong and split answers
    table = (block_3Mb, pad_start_E, count_E)
    return {
        "gate_up pp6": (lambda: mh.gate_up(x_PD, wg, wu, *table, h, gu, mh.gate_up_tile(few)), 2),
        "gate_up pp4": (lambda: mh.gate_up(x_PD, wg, wu, *table, h, gu, mh.gate_up_tile(many)), 2),
        "down pp": (lambda: mh.down_proj(h, wd, row_P, *table, y, pp), 1),
        "down split": (lambda: mh.down_proj(h, wd, row_P, *table, y, split), 1),
        "igrad pp": (lambda: mh.input_grad(dgu, wg, wu, row_P, *table, dxa, pp), 2),
        "igrad split": (lambda: mh.input_grad(dgu, wg, wu, row_P, *table, dxa, split), 2),
        "hgrad pp": (lambda: mh.hidden_grad(dout_PD, wd, *table, z), 1),
        "dWd pp": (lambda: mh.weight_grad(dout_PD[None], hw, pad_start_E, count_E, dwd, mh.wgrad_tile(1, few)), 1),
        "dWd split": (lambda: mh.weight_grad(dout_PD[None], hw, pad_start_E, count_E, dwd, mh.wgrad_tile(1, many)), 1),
        "dWgu pp": (lambda: mh.weight_grad(dgu, x_PD, pad_start_E, count_E, dwgu, mh.wgrad_tile(2, few)), 2),
        "dWgu split": (lambda: mh.weight_grad(dgu, x_PD, pad_start_E, count_E, dwgu, mh.wgrad_tile(2, many)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="4096,8192,16384", help="token counts, comma-separated")
    parser.add_argument("--secs", type=float, default=2.5, help="seconds each GEMM runs back to back")
    parser.add_argument("--routing", choices=["random", "balanced"], default="random")
    parser.add_argument("--only", default=None, help="GEMM names to run, '|'-separated (e.g. 'down pp|down split')")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not mh.usable(torch.empty(1, device="cuda", dtype=torch.bfloat16)):
        sys.exit("needs a Hopper GPU and a Triton release moe_hopper was tested with")
    if args.secs <= STEADY_AFTER_S + 0.5:
        sys.exit(f"--secs must exceed {STEADY_AFTER_S + 0.5} (the first {STEADY_AFTER_S} s are not counted)")
    for n_tokens in (int(v) for v in args.n.split(",")):
        runs = gemms(n_tokens, args.routing)
        if args.only:
            unknown = set(args.only.split("|")) - runs.keys()
            if unknown:
                sys.exit(f"--only: unknown GEMM names {sorted(unknown)}; known: {sorted(runs)}")
            runs = {k: v for k, v in runs.items() if k in args.only.split("|")}
        for fn, _ in runs.values():
            fn()  # compile outside the timed part
        torch.cuda.synchronize()
        A = n_tokens * K
        print(f"N={n_tokens} ({args.routing} routing): ms/call, W (1-s average / instantaneous), SM MHz, mJ/call "
              "(1-s average), TFLOP/s, GFLOP/J (1-s average / instantaneous), power-cap samples", flush=True)
        for name, (fn, gemm_count) in runs.items():
            time.sleep(0.8)
            ms, w_avg, w_inst, mhz, cap = sample(fn, args.secs)
            flops = gemm_count * 2 * A * D * F
            print(f"  {name:12s} {ms:7.3f} ms {w_avg:5.0f}/{w_inst:5.0f} W {mhz:5.0f} MHz {w_avg * ms:6.1f} mJ "
                  f"{flops / ms / 1e9:4.0f} TFLOP/s {flops / (w_avg * ms) / 1e6:5.0f}/{flops / (w_inst * ms) / 1e6:5.0f} "
                  f"GFLOP/J cap {cap}", flush=True)


if __name__ == "__main__":
    main()
