"""cuBLAS grouped GEMM (cublasGemmGroupedBatchedEx) on the six GEMMs of the MoE experts step (GPU, bf16).

    python benchmarks/cublas_grouped_gemm.py [--n 4096,16384]

A probe for benchmarks/moe_gemm_ceiling.py's question (can a library grouped GEMM run the MoE step's GEMMs at
the equal-group cuBLAS rate?): cuBLAS 12.5+ has a grouped batched GEMM whose problems may differ in m, n, k.
Each expert is one problem of exactly its rows (no padding rows computed), reading moe.py's padded, expert-
sorted operands at each expert's first row; the 2F-wide GEMMs are 2 x E problems (one per plane; input grad
as two calls, the second accumulating with beta = 1). Called through ctypes on the cuBLAS library torch
loaded, with torch's handle (its stream and workspace). The per-expert row counts must be on the host: a real
layer would pay one device-to-host copy of count_E per forward (not timed here).

Prints, per GEMM: our Triton kernel (moe_gemm_ceiling's (a)), cuBLAS grouped, cuBLAS bmm over E equal groups
(d), ms and TFLOP/s of useful work; the relative error of cuBLAS grouped against the Triton outputs.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the repo root: benchmarks/model.py shadows model

from kernels import bench, rel_err  # noqa: E402
from moe_gemm_ceiling import DEV, DT, GEMMS, D, E, F, K, dense_launches, flops, problem, triton_launches  # noqa: E402

CUDA_R_16BF, CUBLAS_COMPUTE_32F, OP_N, OP_T = 14, 68, 0, 1


def _cublas() -> ctypes.CDLL:
    torch.ones(8, 8, device=DEV) @ torch.ones(8, 8, device=DEV)  # torch loads and initialises cuBLAS
    for name in ("libcublas.so.13", "libcublas.so.12"):
        try:
            lib = ctypes.CDLL(name)
            lib.cublasGemmGroupedBatchedEx  # noqa: B018 (raises AttributeError when absent)
            return lib
        except (OSError, AttributeError):
            continue
    import nvidia.cublas  # the wheel torch depends on

    lib_dir = os.path.join(nvidia.cublas.__path__[0], "lib")
    return ctypes.CDLL(os.path.join(lib_dir, sorted(f for f in os.listdir(lib_dir) if f.startswith("libcublas."))[0]))


class GroupedGemm:
    """One cublasGemmGroupedBatchedEx call, column-major, every problem its own group (group_size 1).

    problems: (transa, transb, m, n, k, a_ptr, lda, b_ptr, ldb, c_ptr, ldc) per problem; C = A·B + beta·C."""

    def __init__(self, lib, problems, beta: float = 0.0):
        self.lib = lib
        P = len(problems)
        ints = lambda col: (ctypes.c_int * P)(*[p[col] for p in problems])  # noqa: E731
        self.ta, self.tb, self.m, self.n, self.k = (ints(i) for i in range(5))
        self.lda, self.ldb, self.ldc = ints(6), ints(8), ints(10)
        self.alpha = (ctypes.c_float * P)(*[1.0] * P)
        self.beta = (ctypes.c_float * P)(*[beta] * P)
        self.sizes = (ctypes.c_int * P)(*[1] * P)
        self.ptrs = torch.tensor([[p[5], p[7], p[9]] for p in problems], dtype=torch.int64, device=DEV).t().contiguous()
        self.P = P

    def __call__(self):
        a, b, c = (ctypes.c_void_p(self.ptrs[i].data_ptr()) for i in range(3))
        status = self.lib.cublasGemmGroupedBatchedEx(
            ctypes.c_void_p(torch.cuda.current_blas_handle()), self.ta, self.tb, self.m, self.n, self.k,
            self.alpha, a, CUDA_R_16BF, self.lda, b, CUDA_R_16BF, self.ldb, self.beta, c, CUDA_R_16BF, self.ldc,
            ctypes.c_int(self.P), self.sizes, CUBLAS_COMPUTE_32F)
        if status != 0:
            raise RuntimeError(f"cublasGemmGroupedBatchedEx returned status {status}")


def cublas_launches(lib, T):
    """The six GEMMs as cuBLAS grouped calls on moe.py's padded expert-sorted tensors; outputs in new buffers."""
    start = T["pad_start_E"].tolist()
    count = T["count_E"].tolist()
    x_PD, dout_PD, h_PF, hw_PF, dgu_2PF = T["x_PD"], T["dout_PD"], T["h_PF"], T["hw_PF"], T["dgu_2PF"]
    wg, wu, wd = T["wg"], T["wu"], T["wd"]
    P = x_PD.shape[0]
    es = x_PD.element_size()
    row = lambda t, r: t.data_ptr() + r * t.stride(0) * es  # noqa: E731
    out = {"gu": torch.zeros(2, P, F, dtype=DT, device=DEV), "y": torch.zeros(P, D, dtype=DT, device=DEV),
           "z": torch.zeros(P, F, dtype=DT, device=DEV), "dx": torch.zeros(P, D, dtype=DT, device=DEV),
           "dwd": torch.empty(E, D, F, dtype=DT, device=DEV), "dwgu": torch.empty(2, E, F, D, dtype=DT, device=DEV)}
    # row-major C[m, n] = A[m, k] · B[k, n]  <=>  column-major C^T = B^T · A^T: cuBLAS m' = n, n' = m.
    gate_up = [(OP_T, OP_N, F, count[e], D, w[e].data_ptr(), D, row(x_PD, start[e]), D,
                row(out["gu"][p], start[e]), F) for p, w in enumerate((wg, wu)) for e in range(E)]
    down = [(OP_T, OP_N, D, count[e], F, wd[e].data_ptr(), F, row(h_PF, start[e]), F, row(out["y"], start[e]), D)
            for e in range(E)]
    hidden = [(OP_N, OP_N, F, count[e], D, wd[e].data_ptr(), F, row(dout_PD, start[e]), D, row(out["z"], start[e]), F)
              for e in range(E)]
    input_g, input_u = ([(OP_N, OP_N, D, count[e], F, w[e].data_ptr(), D, row(dgu_2PF[p], start[e]), F,
                          row(out["dx"], start[e]), D) for e in range(E)] for p, w in enumerate((wg, wu)))
    dwd = [(OP_N, OP_T, F, D, count[e], row(hw_PF, start[e]), F, row(dout_PD, start[e]), D, out["dwd"][e].data_ptr(), F)
           for e in range(E)]
    dwgu = [(OP_N, OP_T, D, F, count[e], row(x_PD, start[e]), D, row(dgu_2PF[p], start[e]), F,
             out["dwgu"][p, e].data_ptr(), D) for p in range(2) for e in range(E)]
    calls = {"gate_up fwd": GroupedGemm(lib, gate_up), "down fwd": GroupedGemm(lib, down),
             "hidden grad": GroupedGemm(lib, hidden), "dWd": GroupedGemm(lib, dwd), "dWg+dWu": GroupedGemm(lib, dwgu)}
    ig, iu = GroupedGemm(lib, input_g), GroupedGemm(lib, input_u, beta=1.0)

    def input_grad():
        ig()
        iu()

    calls["input grad"] = input_grad
    return calls, out


def errors(T, out):
    used = int(T["used_rows_1"].item())
    row = T["row_P"][:used].long()
    valid = row >= 0
    return {"gate_up fwd": max(rel_err(out["gu"][p][:used][valid], T["gu_2PF"][p][:used][valid]) for p in range(2)),
            "down fwd": rel_err(out["y"][:used][valid], T["y_AD"][row[valid]]),
            "hidden grad": rel_err(out["z"][:used][valid], T["z_PF"][:used][valid]),
            "input grad": rel_err(out["dx"][:used][valid], T["dxa_AD"][row[valid]]),
            "dWd": rel_err(out["dwd"], T["dwd_1EDF"][0]),
            "dWg+dWu": max(rel_err(out["dwgu"][p], T["dwgu_2EFD"][p]) for p in range(2))}


def run(n_tokens: int, lib):
    ref, x, ids_NK, w_NK, dout = problem(n_tokens)
    fl = flops(n_tokens)
    tri, T = triton_launches(n_tokens, ref, x, ids_NK, w_NK, dout)  # also fills T's intermediates, in step order
    calls, out = cublas_launches(lib, T)
    for c in calls.values():
        c()
    torch.cuda.synchronize()
    errs = errors(T, out)
    _, bmm = dense_launches(n_tokens)
    print(f"\nN={n_tokens}: {n_tokens * K / E:.0f} rows per expert on average, counts "
          f"{int(T['count_E'].min())}..{int(T['count_E'].max())}")
    print(f"{'GEMM':12s} {'(a) triton':>16s} {'cuBLAS grouped':>16s} {'again':>16s} {'(d) bmm equal':>16s}  rel.err")
    sums = [0.0, 0.0, 0.0]
    for name in GEMMS:
        t = [bench(tri[name]), bench(calls[name]), bench(calls[name]), bench(bmm[name])]
        print(f"{name:12s} " + " ".join(f"{v:.3f} {fl[name] / v / 1e9:4.0f}TF".rjust(16) for v in t)
              + f"  {errs[name]:.1e}")
        sums[0] += t[0]
        sums[1] += min(t[1], t[2])
        sums[2] += t[3]
    print(f"{'sum':12s} " + " ".join(f"{s:.3f}".rjust(16) for s in (sums[0], sums[1])) + " " * 17
          + f"{sums[2]:.3f}".rjust(16))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="4096,16384")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/cublas_grouped_gemm.py needs a CUDA GPU")
    lib = _cublas()
    ver = ctypes.c_int()
    lib.cublasGetVersion_v2(ctypes.c_void_p(torch.cuda.current_blas_handle()), ctypes.byref(ver))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuBLAS {ver.value}")
    for n in (int(v) for v in args.n.split(",") if v):
        run(n, lib)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
