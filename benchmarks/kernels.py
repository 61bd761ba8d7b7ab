"""Benchmark of model/kernels at DeepSeek-V2-Lite shapes (GPU, bf16), in one run.

    python benchmarks/kernels.py [--quick] [--only moe,mla,...]

For each kernel: median time (triton.testing.do_bench, CUDA events), achieved TFLOP/s or GB/s, the
percent of the H100 datasheet peak (989 TFLOP/s dense bf16, 3.35 TB/s HBM3) and the speedup over the
plain-PyTorch reference (kernels="torch") and, for the MoE experts, over transformers'
`DeepseekV2Experts` with experts implementation "grouped_mm". Every kernel's output is first checked
against its reference at the benchmark shape (relative L2 error, printed). FLOP and byte counts are
the minimum the operation needs (each input read once, each output written once). The MoE fwd+bwd rows also
give the SM clock and power while the step runs back to back (`sustained_clock`): the H100 holds that step at
its power cap, below the clock the datasheet peak assumes.
Issue 3 targets: MoE fwd+bwd ≥ 50% of bf16 peak at ≥ 4096 tokens; MLA decode ≥ 75% of HBM bandwidth
at batch 64, context 4096; fused log-prob peak memory ≤ 1/8 of materialised logits at vocab 102400 and
no more than 10% slower.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.attention import MultiHeadLatentAttention  # noqa: E402
from model.config import DeepseekV2Config  # noqa: E402
from model.kernels.logprobs import fused_token_logprobs  # noqa: E402
from model.kernels.mla_decode import mla_decode  # noqa: E402
from model.kernels.moe import moe_experts  # noqa: E402
from model.kernels.rmsnorm import rms_norm  # noqa: E402
from model.kernels.rope import apply_rope_interleaved_triton  # noqa: E402
from model.logprobs import token_logprobs_reference  # noqa: E402
from model.moe import RoutedExperts  # noqa: E402
from model.norm import RMSNorm  # noqa: E402
from model.rope import apply_rope_interleaved  # noqa: E402

PEAK_TFLOPS = 989.0
PEAK_GBS = 3350.0
DEV = "cuda"
DT = torch.bfloat16
ROWS: list[dict] = []


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_time_us(fn, n: int = 200) -> float:
    """Host microseconds per call of back-to-back calls (the launch queue absorbs the device work)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


BACK_TO_BACK = 10


def bench_back_to_back(fn, n: int = BACK_TO_BACK) -> float:
    """Median milliseconds per call of n calls issued back to back (one do_bench L2 flush per n calls)."""
    def calls():
        for _ in range(n):
            fn()
    return bench(calls) / n


@contextlib.contextmanager
def smi_samples(fields: str, period_ms: int = 50):
    """nvidia-smi sampling `fields` (its --query-gpu names) on the current GPU every period_ms while the body runs.
    Yields a list that is filled on a normal exit with one row per sample: the CSV fields as strings, unparsed
    (benchmarks/moe_gemm_energy.py uses it too)."""
    rows: list[list[str]] = []
    with tempfile.TemporaryFile("w+") as log:
        probe = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                                  "-lms", str(period_ms), "-i", str(torch.cuda.current_device())],
                                 stdout=log, stderr=subprocess.DEVNULL)
        try:
            yield rows
        finally:
            probe.terminate()
            probe.wait()
        log.seek(0)
        rows.extend(line.split(", ") for line in log.read().splitlines())


def sustained_clock(fn, secs: float = 1.5) -> str:
    """SM clock and board power while fn runs back to back for `secs` (nvidia-smi sampled every 50 ms; the samples
    above 200 W), and whether the driver's software power cap held the clock down: an H100 at its 700 W limit runs
    its SM clock below the ~1830 MHz that the 989 TFLOP/s peak assumes. '' without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return ""
    with smi_samples("power.draw,clocks.sm,clocks_event_reasons.sw_power_cap") as rows:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < secs:
            for _ in range(10):  # back to back, as do_bench runs it
                fn()
            torch.cuda.synchronize()
    busy = [(float(r[0]), float(r[1]), r[2].strip()) for r in rows
            if len(r) == 3 and r[0].replace(".", "", 1).isdigit() and float(r[0]) > 200]
    if not busy:
        return ""
    capped = sum(r[2] == "Active" for r in busy)
    return (f"sustained: SM {statistics.mean(r[1] for r in busy):.0f} MHz, {statistics.mean(r[0] for r in busy):.0f} W, "
            f"power cap in {capped}/{len(busy)} samples")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def record(kernel: str, shape: str, ms: float, *, flops: float | None = None, nbytes: float | None = None,
           ref_ms: float | None = None, hf_ms: float | None = None, note: str = ""):
    row = dict(kernel=kernel, shape=shape, ms=ms, note=note)
    if flops is not None:
        row["rate"] = f"{flops / ms / 1e9:.0f} TFLOP/s"
        row["peak"] = f"{100 * flops / ms / 1e9 / PEAK_TFLOPS:.0f}%"
    if nbytes is not None:
        row["rate"] = f"{nbytes / ms / 1e6:.0f} GB/s"
        row["peak"] = f"{100 * nbytes / ms / 1e6 / PEAK_GBS:.0f}%"
    row["vs_ref"] = f"{ref_ms / ms:.2f}x" if ref_ms else "-"
    row["vs_hf"] = f"{hf_ms / ms:.2f}x" if hf_ms else "-"
    ROWS.append(row)
    print(f"  {kernel:28s} {shape:34s} {ms:8.3f} ms  {row.get('rate', ''):>14s} {row.get('peak', ''):>5s} "
          f"ref {row['vs_ref']:>6s}  hf {row['vs_hf']:>6s}  {note}", flush=True)


# ----------------------------------------------------------------------------------------------- MoE
def hf_grouped_mm_experts(E, D, F_, K):
    """transformers' DeepseekV2Experts with the grouped_mm experts implementation, or None."""
    try:
        from transformers import DeepseekV2Config as HFConfig
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

        cfg = HFConfig(hidden_size=D, moe_intermediate_size=F_, n_routed_experts=E, num_experts_per_tok=K)
        cfg._experts_implementation = "grouped_mm"
        return DeepseekV2Experts(cfg).to(DEV, DT)
    except Exception as exc:  # noqa: BLE001 - report and go on without the comparison
        print(f"  (transformers grouped_mm experts unavailable: {type(exc).__name__}: {exc})")
        return None


MOE_E, MOE_D, MOE_F, MOE_K = 64, 2048, 1408, 6
"""V2-Lite's routed experts: count, hidden size, expert intermediate size, experts per token."""


def moe_problem(n_tokens: int, drop: bool = False):
    """The MoE benchmark's inputs, seeded: reference experts, x, uniform random top-K routing, the keep mask
    (10% of assignments dropped) or None, and the output gradient. benchmarks/moe_gemm_ceiling.py uses the same."""
    E, D, F_, K = MOE_E, MOE_D, MOE_F, MOE_K
    torch.manual_seed(0)
    ref = RoutedExperts(E, D, F_).to(DEV, DT)
    for p in ref.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(n_tokens, D, device=DEV, dtype=DT, requires_grad=True)
    scores = torch.randn(n_tokens, E, device=DEV).softmax(-1)
    w_NK, ids_NK = scores.topk(K, dim=-1)
    w_NK = w_NK.detach().requires_grad_()
    keep = (torch.rand(n_tokens, K, device=DEV) > 0.1) if drop else None
    dout = torch.randn(n_tokens, D, device=DEV, dtype=DT)
    return ref, x, ids_NK, w_NK, keep, dout


def bench_moe(n_tokens: int, drop: bool = False):
    E, D, F_, K = MOE_E, MOE_D, MOE_F, MOE_K
    ref, x, ids_NK, w_NK, keep, dout = moe_problem(n_tokens, drop)
    params = [x, ref.gate_proj, ref.up_proj, ref.down_proj, w_NK]

    def ours():
        return moe_experts(x, ref.gate_proj, ref.up_proj, ref.down_proj, ids_NK, w_NK, keep)

    def reference():
        return ref(x, ids_NK, w_NK, keep)

    out, out_ref = ours(), reference()
    g = torch.autograd.grad(out, params, dout)
    g_ref = torch.autograd.grad(out_ref, params, dout)
    errs = [rel_err(out, out_ref)] + [rel_err(a, b) for a, b in zip(g, g_ref)]
    A = n_tokens * K * (0.9 if drop else 1.0)
    fwd_flops, step_flops = 6 * A * D * F_, 18 * A * D * F_

    def step(fn):
        return lambda: torch.autograd.grad(fn(), params, dout)

    # ~1.5 s of steps first: the clock settles at the power cap before anything is timed (the first timed row of a
    # process read up to 25% slow without it)
    clock = sustained_clock(step(ours))
    with torch.no_grad():
        t_fwd, t_fwd_ref = bench(ours), bench(reference)
    t_step, t_step_ref = bench(step(ours)), bench(step(reference))
    # host time per step, 20 steps queued at once (~300 launches: within the launch queue, so the host never waits):
    # when it nears the step's GPU time the row is host-bound (the GPU idles; the sustained clock reads high)
    host_ms = host_time_us(step(ours), n=20) / 1e3
    t_hf_fwd = t_hf_step = None
    hf = None if drop else hf_grouped_mm_experts(E, D, F_, K)
    if hf is not None:
        with torch.no_grad():
            hf.gate_up_proj.copy_(torch.cat([ref.gate_proj, ref.up_proj], dim=1))
            hf.down_proj.copy_(ref.down_proj)
        hf_params = [x, hf.gate_up_proj, hf.down_proj, w_NK]
        out_hf = hf(x, ids_NK, w_NK.to(DT))
        errs.append(rel_err(out_hf, out_ref))
        with torch.no_grad():
            t_hf_fwd = bench(lambda: hf(x, ids_NK, w_NK.to(DT)))
        t_hf_step = bench(lambda: torch.autograd.grad(hf(x, ids_NK, w_NK.to(DT)), hf_params, dout))
    shape = f"N={n_tokens} E={E} K={K} D={D} F={F_}" + (" drop10%" if drop else "")
    note = "rel.err out,dx,dWg,dWu,dWd,dw" + ("," + "hf" if hf is not None else "") + " = " + ",".join(
        f"{e:.1e}" for e in errs) + (f"; {clock}" if clock else "") + f"; host {host_ms:.2f} ms/step"
    record("moe experts fwd", shape, t_fwd, flops=fwd_flops, ref_ms=t_fwd_ref, hf_ms=t_hf_fwd)
    record("moe experts fwd+bwd", shape, t_step, flops=step_flops, ref_ms=t_step_ref, hf_ms=t_hf_step, note=note)


# ------------------------------------------------------------------------------------------- RMSNorm
def bench_rmsnorm(n_rows: int = 16384, D: int = 2048):
    x = torch.randn(n_rows, D, device=DEV, dtype=DT, requires_grad=True)
    norm = RMSNorm(D).to(DEV, DT)
    norm.weight.data.normal_(1, 0.1)
    dy = torch.randn_like(x)
    err = rel_err(rms_norm(x, norm.weight, 1e-6), norm(x))
    with torch.no_grad():
        t, t_ref = bench(lambda: rms_norm(x, norm.weight, 1e-6)), bench(lambda: norm(x))
    record("rmsnorm fwd", f"{n_rows}x{D}", t, nbytes=2 * x.numel() * 2, ref_ms=t_ref, note=f"rel.err {err:.1e}")
    t = bench(lambda: torch.autograd.grad(rms_norm(x, norm.weight, 1e-6), [x, norm.weight], dy))
    t_ref = bench(lambda: torch.autograd.grad(norm(x), [x, norm.weight], dy))
    record("rmsnorm fwd+bwd", f"{n_rows}x{D}", t, nbytes=5 * x.numel() * 2, ref_ms=t_ref)
    r = torch.randn_like(x)
    with torch.no_grad():
        t = bench(lambda: rms_norm(x, norm.weight, 1e-6, r))
        t_ref = bench(lambda: norm(x + r))
    record("rmsnorm+residual fwd", f"{n_rows}x{D}", t, nbytes=4 * x.numel() * 2, ref_ms=t_ref)


# ---------------------------------------------------------------------------------------------- RoPE
def bench_rope(B: int = 8, T: int = 2048, H: int = 16, R: int = 64):
    q = torch.randn(B, T, H, 128 + R, device=DEV, dtype=DT)
    x = q[..., 128:].transpose(1, 2).requires_grad_()  # the strided q_pe view the model passes
    ang = torch.rand(B, T, R // 2, device=DEV) * 100
    cos, sin = ang.cos().to(DT), ang.sin().to(DT)
    err = rel_err(apply_rope_interleaved_triton(x, cos, sin), apply_rope_interleaved(x, cos, sin))
    nbytes = 2 * x.numel() * 2 + 2 * cos.numel() * 2
    with torch.no_grad():
        t = bench(lambda: apply_rope_interleaved_triton(x, cos, sin))
        t_ref = bench(lambda: apply_rope_interleaved(x, cos, sin))
    record("rope q_pe fwd", f"B={B} H={H} T={T} R={R}", t, nbytes=nbytes, ref_ms=t_ref, note=f"rel.err {err:.1e}")
    g = torch.randn(B, H, T, R, device=DEV, dtype=DT)
    t = bench(lambda: torch.autograd.grad(apply_rope_interleaved_triton(x, cos, sin), [x], g))
    t_ref = bench(lambda: torch.autograd.grad(apply_rope_interleaved(x, cos, sin), [x], g))
    record("rope q_pe fwd+bwd", f"B={B} H={H} T={T} R={R}", t, nbytes=2 * nbytes, ref_ms=t_ref)


# ---------------------------------------------------------------------------------------- MLA decode
def bench_mla_decode(B: int = 64, S: int = 4096):
    cfg = DeepseekV2Config.preset("v2-lite")
    H, N, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    attn = MultiHeadLatentAttention(cfg, 0).to(DEV, DT)
    for p in attn.parameters():
        p.data.normal_(0, 0.02)
    cfg_k = DeepseekV2Config.preset("v2-lite", kernels="triton")
    attn_k = MultiHeadLatentAttention(cfg_k, 0).to(DEV, DT)
    attn_k.load_state_dict(attn.state_dict())
    q_nope = torch.randn(B, H, 1, N, device=DEV, dtype=DT)
    q_pe = torch.randn(B, H, 1, R, device=DEV, dtype=DT)
    latent = torch.randn(B, S, C + R, device=DEV, dtype=DT)
    c_kv, k_pe = latent[..., :C], latent[..., C:]
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=DEV)
    for b in range(B):  # left padding of up to 1/8 of the context in half of the rows
        if b % 2:
            mask[b, ..., : (b * 37) % (S // 8)] = False
    keys = mask.sum().item()
    w_uk, _ = attn.absorbed_weights()
    q_lat = torch.einsum("bhn,hnc->bhc", q_nope[:, :, 0], w_uk)
    start = (~mask[:, 0, 0]).sum(1).to(torch.int32)
    end = torch.full((B,), S, dtype=torch.int32, device=DEV)
    with torch.no_grad():
        out_k = attn_k._absorb(q_nope, q_pe, c_kv, k_pe, mask)
        out_r = attn._absorb(q_nope, q_pe, c_kv, k_pe, mask)
        err = rel_err(out_k, out_r)

        def kernel():
            return mla_decode(q_lat, q_pe[:, :, 0], c_kv, k_pe, start, end, attn.softmax_scale)

        # Main row: back-to-back calls (as in a decode loop), so launch overhead that the queue hides
        # stays hidden and what the host cannot hide shows. Extra rows, not instead of it: one call
        # right after do_bench's L2 flush (the flush leaves ~50 MB of dirty lines that the kernel's
        # reads must first write back), the same calls replayed from a CUDA graph, host time per call.
        t_kernel = bench_back_to_back(kernel)
        t_single = bench(kernel)
        t_layer = bench(lambda: attn_k._absorb(q_nope, q_pe, c_kv, k_pe, mask))
        t_ref = bench(lambda: attn._absorb(q_nope, q_pe, c_kv, k_pe, mask))
        host_us = host_time_us(kernel)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(BACK_TO_BACK):
                kernel()
        t_graph = bench(graph.replay) / BACK_TO_BACK
    nbytes = keys * (C + R) * 2 + B * H * (C + R) * 2 + B * H * C * 2
    shape = f"B={B} S={S} H={H} C+R={C + R}"
    record("mla decode (kernel)", shape, t_kernel, nbytes=nbytes, ref_ms=t_ref,
           note=f"{BACK_TO_BACK} back-to-back calls; rel.err {err:.1e}; ref = _absorb incl. W_UK/W_UV; "
                f"host {host_us:.0f} us/call")
    record("mla decode (kernel, 1 call)", shape, t_single, nbytes=nbytes, ref_ms=t_ref,
           note="one call right after do_bench's L2 flush (extra row)")
    record("mla decode (kernel, CUDA graph)", shape, t_graph, nbytes=nbytes, ref_ms=t_ref,
           note=f"{BACK_TO_BACK} calls replayed from one graph (extra row)")
    record("mla decode (_absorb, triton)", f"B={B} S={S} H={H} C+R={C + R}", t_layer, nbytes=nbytes, ref_ms=t_ref,
           note="+ W_UK/W_UV einsums + mask→ranges (eager launches)")


# ----------------------------------------------------------------------------------------- log-probs
def bench_logprobs(n_tokens: int = 8192, D: int = 2048, V: int = 102400):
    torch.manual_seed(0)
    h = (torch.randn(n_tokens, D, device=DEV) * 0.5).to(DT).requires_grad_()
    w = (torch.randn(V, D, device=DEV) * D ** -0.5).to(DT).requires_grad_()
    y = torch.randint(0, V, (n_tokens,), device=DEV)
    g = torch.randn(n_tokens, device=DEV)

    def fused():
        lp, ent = fused_token_logprobs(h, w, y, with_entropy=True)
        return lp, ent

    def chunked():
        return token_logprobs_reference(h, w, y, chunk_size=1024, with_entropy=True)

    def materialised():
        z = (h @ w.T).float()
        logp_all = z.log_softmax(-1)
        return logp_all.gather(1, y[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)

    def step(fn):
        def run():
            lp, ent = fn()
            return torch.autograd.grad((lp * g).sum() + 0.01 * ent.sum(), [h, w])
        return run

    lp_f, ent_f = fused()
    lp_m, ent_m = materialised()
    err = (rel_err(lp_f, lp_m), rel_err(ent_f, ent_m))
    gf, gm = step(fused)(), step(materialised)()
    gerr = (rel_err(gf[0], gm[0]), rel_err(gf[1], gm[1]))
    del lp_f, ent_f, lp_m, ent_m, gf, gm

    def peak_extra(fn) -> float:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del res
        return peak

    logits_bytes = n_tokens * V * 2  # the [N, V] logits in bf16 (the reference then upcasts to fp32)
    mem = {name: peak_extra(step(fn)) for name, fn in
           (("fused", fused), ("chunked", chunked), ("materialised", materialised))}
    flops = 2 * n_tokens * V * D
    with torch.no_grad():
        t_f, t_c, t_m = bench(lambda: fused()), bench(lambda: chunked()), bench(lambda: materialised())
    shape = f"N={n_tokens} D={D} V={V} +entropy"
    record("logprobs fwd", shape, t_f, flops=flops, ref_ms=t_c,
           note=f"materialised {t_m:.2f} ms ({t_m / t_f:.2f}x); rel.err logp,ent {err[0]:.1e},{err[1]:.1e}")
    t_f, t_c, t_m = bench(step(fused)), bench(step(chunked)), bench(step(materialised))
    record("logprobs fwd+bwd", shape, t_f, flops=4 * flops, ref_ms=t_c,
           note=(f"materialised {t_m:.2f} ms ({t_m / t_f:.2f}x); grad rel.err {gerr[0]:.1e},{gerr[1]:.1e}; "
                 f"peak extra mem GB fused {mem['fused'] / 1e9:.2f} / chunked ref {mem['chunked'] / 1e9:.2f} / "
                 f"materialised {mem['materialised'] / 1e9:.2f}; fused = {mem['fused'] / logits_bytes:.3f} "
                 f"of bf16 logits ({logits_bytes / 1e9:.2f} GB)"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller shapes (smoke run)")
    parser.add_argument("--only", default="moe,rmsnorm,rope,mla,logprobs",
                        help="comma-separated subset of moe,rmsnorm,rope,mla,logprobs")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if "moe" in only:
        for n in ((1024,) if args.quick else (4096, 8192, 16384)):
            bench_moe(n)
        bench_moe(1024 if args.quick else 4096, drop=True)
    if "rmsnorm" in only:
        bench_rmsnorm()
    if "rope" in only:
        bench_rope()
    if "mla" in only:
        bench_mla_decode(B=16 if args.quick else 64, S=1024 if args.quick else 4096)
        if not args.quick:
            bench_mla_decode(B=8, S=4096)
    if "logprobs" in only:
        bench_logprobs(n_tokens=1024 if args.quick else 8192)
    print("\n| kernel | shape | time (ms) | rate | % H100 peak | vs PyTorch ref | vs HF grouped_mm | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['kernel']} | {r['shape']} | {r['ms']:.3f} | {r.get('rate', '')} | {r.get('peak', '')} | "
              f"{r['vs_ref']} | {r['vs_hf']} | {r['note']} |")


if __name__ == "__main__":
    main()
