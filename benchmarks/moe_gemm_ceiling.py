"""GEMM ceiling of the fused MoE experts step at V2-Lite shapes (GPU, bf16).

    python benchmarks/moe_gemm_ceiling.py [--n 4096,16384]
    python benchmarks/moe_gemm_ceiling.py --step-bound [--n 4096,8192,16384] [--rounds 7] [--graphs]

The six expert GEMMs of one forward+backward step (E=64, top-6, D=2048, F=1408, the routing of
benchmarks/kernels.py: seed 0, uniform random top-6 of a softmax over random scores), each timed with
triton.testing.do_bench (median) three ways, plus one:
  (a) ours     our kernel, launched exactly as model/kernels/moe.py launches it (its own launch helpers and tile
               choice, on the step's real intermediate tensors): the Gluon kernels of model/kernels/moe_hopper on
               a Hopper GPU, else the Triton ones; gate_up includes its row gather (the Gluon path gathers x
               first, as the forward does) and SwiGLU epilogue, down and input grad their scatter to assignment
               order;
  (b) gmm      torch._grouped_mm (CUTLASS grouped GEMM) on the same padded, expert-sorted rows, offsets = each
               expert's end row; the 2F-wide GEMMs (gate_up, input grad, dWg/dWu) as one call on concatenated
               operands (the pure GEMM); "gmm x2" = the drop-in form on moe.py's planes (two calls, + an add
               for input grad);
  (c) dense    one cuBLAS torch.matmul of the same total rows A = N*6 (no grouping: the upper bound);
  (d) bmm      cuBLAS torch.bmm over E equal groups of A/E rows (grouped shapes, no raggedness).
Rates count the useful FLOPs (2*A*K*N per GEMM, padding rows not counted) for every method. The non-GEMM
time of the step (routing, gathers, SwiGLU backward, combines, memsets) comes from a torch.profiler pass over
committed fwd+bwd steps; the projected step = non-GEMM + the best (a)/(b) time of each GEMM.

--step-bound measures the bound inside the step instead, at the power cap (an H100 runs the step at its 700 W
limit, where isolated do_bench GEMMs, each after an idle L2 flush, read faster than they run in a step): alternating
do_bench rounds, after ~1.5 s of steps, of
  committed   the fwd+bwd step as benchmarks/kernels.py times it (random routing);
  balanced    the same with every expert given exactly N*6/64 rows (no half blocks, no padding rows);
  bmm         the committed step with each of its six GEMM launches replaced by cuBLAS torch.bmm over 64 equal
              groups of N*6/64 rows (no raggedness, no padding, no epilogue work: no SwiGLU, no scatter), the
              routing, gathers, SwiGLU backward and combines unchanged. Its outputs are meaningless; its time is
              what the step would take with vendor GEMMs on an ideal routing.
Each arm's host time per step is printed (a step whose host time nears its device time is host-bound: the GPU
waits); --graphs replays each arm from a CUDA graph, which takes the host out.

The A/B of the whole step with backward GEMMs routed through torch._grouped_mm inside moe_experts_bwd
(benchmarks/README.md, "GEMM ceiling at these shapes") ran on a prototype that was not kept.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the repo root: benchmarks/model.py shadows model

from kernels import (  # noqa: E402
    MOE_D,
    MOE_E,
    MOE_F,
    MOE_K,
    PEAK_TFLOPS,
    bench,
    host_time_us,
    moe_problem,
    rel_err,
    sustained_clock,
)

import model.kernels.moe as moe  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
E, D, F, K = MOE_E, MOE_D, MOE_F, MOE_K
GEMMS = ("gate_up fwd", "down fwd", "hidden grad", "input grad", "dWd", "dWg+dWu")


def problem(n_tokens: int):
    """The MoE benchmark's inputs without drops (benchmarks/kernels.py moe_problem)."""
    ref, x, ids_NK, w_NK, _, dout = moe_problem(n_tokens)
    return ref, x, ids_NK, w_NK, dout


def flops(n_tokens: int) -> dict[str, float]:
    A = n_tokens * K
    f = 2.0 * A * D * F
    return {"gate_up fwd": 2 * f, "down fwd": f, "hidden grad": f, "input grad": 2 * f, "dWd": f, "dWg+dWu": 2 * f}


def our_launches(n_tokens, ref, x, ids_NK, w_NK, dout, hopper: bool = True):
    """Our kernels as moe_experts_fwd / moe_experts_bwd launch them (the same tile choice: Gluon on Hopper, else
    Triton; hopper=False: Triton only), on the step's real tensors. Returns (name -> launch closure, the
    intermediate tensors)."""
    wg, wu, wd = ref.gate_proj.detach(), ref.up_proj.detach(), ref.down_proj.detach()
    x = x.detach()
    tiles = moe.default_tiles(D, F, DT, n_tokens * K / E)
    BM, GM = tiles.block_m, tiles.group_m
    prec = moe.dot_precision(DT)
    with torch.no_grad():
        _, saved = moe.moe_experts_fwd(x, wg, wu, wd, ids_NK, w_NK.detach(), save_for_backward=True, tiles=tiles)
    row_P, block_3Mb, pad_start_E, count_E, keep_A, used_rows_1, weights_A, gu_2PF = saved
    P, n_mb = row_P.numel(), block_3Mb.shape[1]
    x_PD, dout_PD = moe._gather_rows(x, dout, row_P, used_rows_1, K, BM)
    T = dict(row_P=row_P, block_3Mb=block_3Mb, pad_start_E=pad_start_E, count_E=count_E, used_rows_1=used_rows_1,
             x_PD=x_PD,
             dout_PD=dout_PD, wg=wg, wu=wu, wd=wd,
             h_PF=torch.empty(P, F, dtype=DT, device=DEV), gu_2PF=torch.empty_like(gu_2PF),
             y_AD=torch.empty(n_tokens * K, D, dtype=DT, device=DEV), z_PF=torch.empty(P, F, dtype=DT, device=DEV),
             dgu_2PF=torch.empty_like(gu_2PF), hw_PF=torch.empty(P, F, dtype=DT, device=DEV),
             dweights_A=torch.zeros(n_tokens * K, dtype=torch.float32, device=DEV),
             dwgu_2EFD=torch.empty(2, E, F, D, dtype=DT, device=DEV), dwd_1EDF=torch.empty(1, E, D, F, dtype=DT, device=DEV),
             dxa_AD=torch.empty(n_tokens * K, D, dtype=DT, device=DEV))

    rows_per_expert = n_tokens * K / E
    mh = moe._moe_hopper(tiles, x) if hopper else None  # None: every GEMM on its Triton kernel
    gate_up_tile = moe._hopper_gate_up_tile(tiles, x, D, F, rows_per_expert) if mh else None
    down_tile = moe._hopper_down_tile(tiles, T["h_PF"], D, F, rows_per_expert) if mh else None
    hopper_hidden = bool(mh) and moe._hopper_hidden_grad(tiles, dout_PD, D, F, rows_per_expert)
    igrad_tile = moe._hopper_igrad_tile(tiles, T["dgu_2PF"], D, F, rows_per_expert) if mh else None
    dwd_tile = moe._hopper_wgrad_tile(tiles, dout_PD[None], F, rows_per_expert) if mh else None
    dwgu_tile = moe._hopper_wgrad_tile(tiles, T["dgu_2PF"], D, rows_per_expert) if mh else None

    def gate_up():
        if gate_up_tile is not None:
            x_rows, _ = moe._gather_rows(x, None, row_P, used_rows_1, K, BM)
            mh.gate_up(x_rows, wg, wu, block_3Mb, pad_start_E, count_E, T["h_PF"], T["gu_2PF"], gate_up_tile)
            return
        t = tiles.gate_up
        moe._launch(moe._moe_gate_up_kernel, t, n_mb * triton.cdiv(F, t.n), x, wg, wu, row_P, block_3Mb, T["h_PF"],
                    T["gu_2PF"], n_mb, P, D, F, K, STORE_GU=True, PRECISION=prec, EVEN_K=D % t.k == 0,
                    BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)

    def down():
        if down_tile is not None:
            mh.down_proj(T["h_PF"], wd, row_P, block_3Mb, pad_start_E, count_E, T["y_AD"], down_tile)
            return
        t = tiles.down
        moe._launch(moe._moe_down_kernel, t, n_mb * triton.cdiv(D, t.n), T["h_PF"], wd, row_P, block_3Mb, T["y_AD"],
                    n_mb, D, F, PRECISION=prec, EVEN_K=F % t.k == 0, BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)

    def hidden():
        if hopper_hidden:
            mh.hidden_grad(dout_PD, wd, block_3Mb, pad_start_E, count_E, T["z_PF"])
            return
        t = tiles.hidden_grad
        moe._launch(moe._moe_hidden_grad_kernel, t, n_mb * triton.cdiv(F, t.n), moe._tma(dout_PD, [BM, t.k]),
                    moe._tma(wd, [1, t.k, t.n]), block_3Mb, T["z_PF"], n_mb, D, F, PRECISION=prec, BLOCK_M=BM,
                    BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)

    def swiglu_bwd():
        t = tiles.swiglu_bwd
        moe._launch(moe._moe_swiglu_bwd_kernel, t, P // t.m, T["z_PF"], T["gu_2PF"], weights_A, row_P, used_rows_1,
                    T["dgu_2PF"], T["hw_PF"], T["dweights_A"], P, F, BLOCK_R=t.m, BLOCK_F=t.n)

    def dwd():
        moe._weight_grad(tiles.down_wgrad, dout_PD[None], T["hw_PF"], pad_start_E, count_E, T["dwd_1EDF"], prec,
                         dwd_tile)

    def dwgu():
        moe._weight_grad(tiles.gate_up_wgrad, T["dgu_2PF"], x_PD, pad_start_E, count_E, T["dwgu_2EFD"], prec,
                         dwgu_tile)

    def input_grad():
        if igrad_tile is not None:
            mh.input_grad(T["dgu_2PF"], wg, wu, row_P, block_3Mb, pad_start_E, count_E, T["dxa_AD"], igrad_tile)
            return
        t = tiles.input_grad
        moe._launch(moe._moe_input_grad_kernel, t, n_mb * triton.cdiv(D, t.n),
                    moe._tma(T["dgu_2PF"].view(2 * P, F), [BM, t.k]), moe._tma(wg, [1, t.k, t.n]),
                    moe._tma(wu, [1, t.k, t.n]), row_P, block_3Mb, T["dxa_AD"], n_mb, P, D, F, PRECISION=prec,
                    BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=GM)

    for fn in (gate_up, down, hidden, swiglu_bwd, dwd, dwgu, input_grad):  # fill every intermediate once, in order
        fn()
    torch.cuda.synchronize()
    return {"gate_up fwd": gate_up, "down fwd": down, "hidden grad": hidden, "input grad": input_grad,
            "dWd": dwd, "dWg+dWu": dwgu}, T


def triton_launches(n_tokens, ref, x, ids_NK, w_NK, dout):
    """moe.py's Triton kernels alone, launched as `our_launches` launches them off Hopper (the baseline that the
    Gluon prototype scripts compare against)."""
    return our_launches(n_tokens, ref, x, ids_NK, w_NK, dout, hopper=False)


def hidden_grad_reference(dout_PD, wd_EDF, pad_start: list[int], used: int) -> torch.Tensor:
    """z = dout_p @ Wd[e] in fp32, expert by expert, over the used padded rows (padding rows of dout_PD are
    zeros): the reference of the exploratory hidden-grad kernels (gluon_grouped_gemm.py, gluon_multicast_gemm.py)."""
    z_ref = torch.zeros(used, wd_EDF.shape[2], device=dout_PD.device, dtype=torch.float32)
    for e, a0 in enumerate(pad_start):
        a1 = pad_start[e + 1] if e + 1 < len(pad_start) else used
        z_ref[a0:a1] = dout_PD[a0:a1].float() @ wd_EDF[e].float()
    return z_ref


def grouped_mm_launches(T):
    """torch._grouped_mm on the same padded rows. Rows past used_rows are NaN-poisoned copies (no GEMM may read
    them). Returns (pure-GEMM closures, drop-in closures, correctness errors against the Triton outputs)."""
    gmm = torch._grouped_mm
    used = int(T["used_rows_1"].item())
    offs = torch.cat([T["pad_start_E"][1:], T["used_rows_1"]]).to(torch.int32)

    def poisoned(t):
        t = t.clone()
        t[used:] = float("nan")
        return t

    x_PD, dout_PD, h_PF, hw_PF = (poisoned(T[k]) for k in ("x_PD", "dout_PD", "h_PF", "hw_PF"))
    dg_PF, du_PF = poisoned(T["dgu_2PF"][0]), poisoned(T["dgu_2PF"][1])
    wg, wu, wd = T["wg"], T["wu"], T["wd"]
    wgu_E2FD = torch.cat([wg, wu], dim=1)  # [E, 2F, D]
    dgu_P2F = torch.cat([dg_PF, du_PF], dim=1)  # [P, 2F]
    dgu_planes = torch.stack([dg_PF, du_PF])  # moe.py's layout [2, P, F]
    pure = {
        "gate_up fwd": lambda: gmm(x_PD, wgu_E2FD.transpose(1, 2), offs=offs),
        "down fwd": lambda: gmm(h_PF, wd.transpose(1, 2), offs=offs),
        "hidden grad": lambda: gmm(dout_PD, wd, offs=offs),
        "input grad": lambda: gmm(dgu_P2F, wgu_E2FD, offs=offs),
        "dWd": lambda: gmm(dout_PD.t(), hw_PF, offs=offs),
        "dWg+dWu": lambda: gmm(dgu_P2F.t(), x_PD, offs=offs),
    }

    def input_grad_x2():
        out = gmm(dgu_planes[0], wg, offs=offs)
        out += gmm(dgu_planes[1], wu, offs=offs)
        return out

    dropin = {
        "input grad": input_grad_x2,
        "dWg+dWu": lambda: (gmm(dgu_planes[0].t(), x_PD, offs=offs), gmm(dgu_planes[1].t(), x_PD, offs=offs)),
    }
    # correctness against our kernels' outputs (rows in padded order; valid rows only where it matters)
    row = T["row_P"][:used].long()
    valid = row >= 0
    errs = {}
    gu = pure["gate_up fwd"]()[:used]
    errs["gate_up fwd"] = max(rel_err(gu[:, :F], T["gu_2PF"][0][:used]), rel_err(gu[:, F:], T["gu_2PF"][1][:used]))
    errs["down fwd"] = rel_err(pure["down fwd"]()[:used][valid], T["y_AD"][row[valid]])
    errs["hidden grad"] = rel_err(pure["hidden grad"]()[:used], T["z_PF"][:used])
    dx = pure["input grad"]()[:used][valid]
    errs["input grad"] = max(rel_err(dx, T["dxa_AD"][row[valid]]),
                             rel_err(input_grad_x2()[:used][valid], T["dxa_AD"][row[valid]]))
    errs["dWd"] = rel_err(pure["dWd"](), T["dwd_1EDF"][0])
    dwgu = pure["dWg+dWu"]()
    g2, u2 = dropin["dWg+dWu"]()
    errs["dWg+dWu"] = max(rel_err(dwgu[:, :F], T["dwgu_2EFD"][0]), rel_err(dwgu[:, F:], T["dwgu_2EFD"][1]),
                          rel_err(g2, T["dwgu_2EFD"][0]), rel_err(u2, T["dwgu_2EFD"][1]))
    # an empty expert (K-grouped weight gradient over zero rows) must come out zero
    offs_empty = offs.clone()
    offs_empty[1] = offs_empty[0]  # expert 1 gets no rows
    w_empty = gmm(dout_PD.t(), hw_PF, offs=offs_empty)
    errs["empty-expert dWd max|.|"] = w_empty[1].abs().max().item()
    return pure, dropin, errs


def dense_launches(n_tokens):
    """cuBLAS: (c) one dense matmul of all A rows, (d) bmm over E equal groups of A/E rows."""
    A, R = n_tokens * K, n_tokens * K // E
    g = torch.Generator(device=DEV).manual_seed(1)

    def rnd(*shape):
        return (torch.randn(*shape, device=DEV, generator=g) * 0.1).to(DT)

    a_D, a_F, a_2F = rnd(A, D), rnd(A, F), rnd(A, 2 * F)
    w_2FD, w_DF = rnd(2 * F, D), rnd(D, F)
    dense = {
        "gate_up fwd": lambda: a_D @ w_2FD.t(),
        "down fwd": lambda: a_F @ w_DF.t(),
        "hidden grad": lambda: a_D @ w_DF,
        "input grad": lambda: a_2F @ w_2FD,
        "dWd": lambda: a_D.t() @ a_F,
        "dWg+dWu": lambda: a_2F.t() @ a_D,
    }
    b_D, b_F, b_2F = a_D.view(E, R, D), a_F.view(E, R, F), a_2F.view(E, R, 2 * F)
    we_2FD, we_DF = rnd(E, 2 * F, D), rnd(E, D, F)
    bmm = {
        "gate_up fwd": lambda: torch.bmm(b_D, we_2FD.transpose(1, 2)),
        "down fwd": lambda: torch.bmm(b_F, we_DF.transpose(1, 2)),
        "hidden grad": lambda: torch.bmm(b_D, we_DF),
        "input grad": lambda: torch.bmm(b_2F, we_2FD),
        "dWd": lambda: torch.bmm(b_D.transpose(1, 2), b_F),
        "dWg+dWu": lambda: torch.bmm(b_2F.transpose(1, 2), b_D),
    }
    return dense, bmm


def step_fn(ref, x, ids_NK, w_NK, dout):
    params = [x, ref.gate_proj, ref.up_proj, ref.down_proj, w_NK]

    def step():
        return torch.autograd.grad(moe.moe_experts(x, ref.gate_proj, ref.up_proj, ref.down_proj, ids_NK, w_NK),
                                   params, dout)
    return step


def profile_step(step, n_steps: int = 10) -> dict[str, float]:
    """Device ms per step by kernel name (torch.profiler), committed path."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            step()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = evt.self_cuda_time_total
        if t > 0:
            out[evt.key] = out.get(evt.key, 0.0) + t / 1e3 / n_steps
    return out


GEMM_KERNELS = ("_gate_up_kernel", "_down_kernel", "_down_proj_kernel", "_hidden_grad_kernel", "_input_grad_kernel",
                "_weight_grad_kernel")
"""Name pieces of the GEMM launches, moe.py's Triton kernels (`_moe_*`) and moe_hopper's Gluon ones."""


def ceiling(n_tokens: int) -> dict:
    ref, x, ids_NK, w_NK, dout = problem(n_tokens)
    fl = flops(n_tokens)
    tri, T = our_launches(n_tokens, ref, x, ids_NK, w_NK, dout)
    pure, dropin, errs = grouped_mm_launches(T)
    dense, bmm = dense_launches(n_tokens)
    step = step_fn(ref, x, ids_NK, w_NK, dout)
    prof = profile_step(step)
    gemm_prof = {k: v for k, v in prof.items() if any(g in k for g in GEMM_KERNELS)}
    non_gemm = sum(v for k, v in prof.items() if k not in gemm_prof)
    t_step = bench(step)
    rows = {}
    for name in GEMMS:
        r = {"a": bench(tri[name]), "b": bench(pure[name]), "c": bench(dense[name]), "d": bench(bmm[name])}
        if name in dropin:
            r["b2"] = bench(dropin[name])
        rows[name] = r
    # second timing of (a) and (b): the run-to-run spread of one process
    for name in GEMMS:
        rows[name]["a'"] = bench(tri[name])
        rows[name]["b'"] = bench(pure[name])
    print(f"\nN={n_tokens} (A={n_tokens * K} rows, {n_tokens * K / E:.0f} per expert, padded rows "
          f"{int(T['used_rows_1'].item())}); step {t_step:.3f} ms = {18 * n_tokens * K * D * F / t_step / 1e9:.0f} "
          f"TFLOP/s ({100 * 18 * n_tokens * K * D * F / t_step / 1e9 / PEAK_TFLOPS:.1f}%)")
    print("profiler, ms per step: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(prof.items(), key=lambda kv: -kv[1])))
    print(f"profiler: GEMM kernels {sum(gemm_prof.values()):.3f} ms, non-GEMM {non_gemm:.3f} ms per step")
    print("gmm vs our outputs (rel.err): " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    hdr = f"{'GEMM':12s} " + " ".join(f"{m:>17s}" for m in ("(a) ours", "(a) again", "(b) gmm", "(b) again",
                                                             "gmm x2 drop-in", "(c) dense cuBLAS", "(d) bmm equal"))
    print(hdr)
    best_sum = dense_sum = bmm_sum = tri_sum = 0.0
    for name in GEMMS:
        r = rows[name]
        cells = []
        for m in ("a", "a'", "b", "b'", "b2", "c", "d"):
            if m in r:
                cells.append(f"{r[m]:.3f} {fl[name] / r[m] / 1e9:4.0f}TF".rjust(17))
            else:
                cells.append("-".rjust(17))
        print(f"{name:12s} " + " ".join(cells))
        tri_sum += min(r["a"], r["a'"])
        best_sum += min(r["a"], r["a'"], r["b"], r["b'"])
        dense_sum += r["c"]
        bmm_sum += r["d"]
    total = 18 * n_tokens * K * D * F
    for label, s in (("our GEMMs (a)", tri_sum), ("best of (a)/(b) per GEMM", best_sum),
                     ("bmm equal groups (d)", bmm_sum), ("dense cuBLAS (c)", dense_sum)):
        proj = s + non_gemm
        print(f"projected step, {label:26s}: GEMMs {s:.3f} + non-GEMM {non_gemm:.3f} = {proj:.3f} ms, "
              f"{100 * total / proj / 1e9 / PEAK_TFLOPS:.1f}% of peak")
    return rows


@contextlib.contextmanager
def gemms_on_bmm(bmm: dict):
    """moe_experts_fwd / moe_experts_bwd with each of the six GEMM launches replaced by the `bmm` closure of the same
    GEMM (dense_launches: cuBLAS over E equal groups); everything else in the step unchanged."""
    from model.kernels import moe_hopper as mh

    patched = {
        (mh, "gate_up"): lambda *a, **k: bmm["gate_up fwd"](),
        (mh, "down_proj"): lambda *a, **k: bmm["down fwd"](),
        (mh, "hidden_grad"): lambda *a, **k: bmm["hidden grad"](),
        (mh, "input_grad"): lambda *a, **k: bmm["input grad"](),
        (moe, "_weight_grad"): lambda tile, a_GPI, *rest: bmm["dWd" if a_GPI.shape[0] == 1 else "dWg+dWu"](),
        # the launch choosers answer "the Hopper kernel", so every GEMM goes through the replaced functions
        (moe, "_hopper_gate_up_tile"): lambda *a: True,
        (moe, "_hopper_down_tile"): lambda *a: True,
        (moe, "_hopper_hidden_grad"): lambda *a: True,
        (moe, "_hopper_igrad_tile"): lambda *a: True,
    }
    saved = {key: getattr(*key) for key in patched}
    try:
        for (module, name), fn in patched.items():
            setattr(module, name, fn)
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def captured(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def step_bound(n_tokens: int, rounds: int, graphs: bool) -> dict[str, float]:
    """Median ms of the committed step, the step on balanced routing, and the step with cuBLAS bmm GEMMs (module
    docstring, --step-bound), in alternating do_bench rounds at the power cap; with `graphs` each replayed from a
    CUDA graph."""
    ref, x, ids_NK, w_NK, dout = problem(n_tokens)
    balanced_NK = (torch.arange(n_tokens, device=DEV)[:, None] * K + torch.arange(K, device=DEV)) % E
    committed, balanced = step_fn(ref, x, ids_NK, w_NK, dout), step_fn(ref, x, balanced_NK, w_NK, dout)
    _, bmm = dense_launches(n_tokens)

    def on_bmm():
        with gemms_on_bmm(bmm):
            return committed()

    arms = {"committed": committed, "balanced": balanced, "bmm": on_bmm}
    for fn in arms.values():
        fn()
    host = {name: host_time_us(fn, n=20) / 1e3 for name, fn in arms.items()}
    if graphs:  # each arm replayed from a CUDA graph: device time alone, no host launch cost
        arms = {name: captured(fn) for name, fn in arms.items()}
    sustained = sustained_clock(committed)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name].append(bench(fn))
    total = 18 * n_tokens * K * D * F
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nN={n_tokens} ({n_tokens * K / E:.0f} rows per expert), medians of {rounds} alternating rounds; {sustained}")
    for name, ms in med.items():
        print(f"  {name:9s} {ms:.3f} ms ({min(times[name]):.3f}-{max(times[name]):.3f}), "
              f"{100 * total / ms / 1e9 / PEAK_TFLOPS:.1f}% of peak, {med['committed'] / ms:.3f}x committed; "
              f"host {host[name]:.2f} ms/step (eager)")
    return med


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="4096,16384")
    parser.add_argument("--step-bound", action="store_true", help="the bound inside the step, at the power cap")
    parser.add_argument("--rounds", type=int, default=7, help="--step-bound: alternating rounds")
    parser.add_argument("--graphs", action="store_true", help="--step-bound: replay each arm from a CUDA graph")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe_gemm_ceiling.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for n in (int(v) for v in args.n.split(",") if v):
        if args.step_bound:
            step_bound(n, args.rounds, args.graphs)
        else:
            ceiling(n)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
