"""Same-process A/B of the MoE experts fwd+bwd step with the Hopper Gluon weight-gradient kernel off and on (GPU).

    python benchmarks/moe_hopper_ab.py [--n 4096,8192,16384] [--rounds 5]

`MoETiles.hopper` False (moe.py's Triton weight-gradient kernel) vs True (model/kernels/moe_hopper.py where
`usable`), V2-Lite expert shapes in bf16, the routing of benchmarks/kernels.py (uniform random top-6 of 64),
`moe_experts_fwd` + `moe_experts_bwd` timed by do_bench (median, L2 flushed) in alternating rounds; prints each
side's median, min-max and % of the H100 bf16 peak, and whether the gradients are identical to the bit.
"""

from __future__ import annotations

import argparse
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


def ab(n_tokens: int, rounds: int) -> None:
    torch.manual_seed(0)
    wg, wu = ((torch.randn(E, F, D, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(2))
    wd = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(n_tokens, D, device="cuda", dtype=torch.bfloat16)
    w_NK, ids_NK = torch.randn(n_tokens, E, device="cuda").softmax(-1).topk(K, dim=-1)
    dout = torch.randn(n_tokens, D, device="cuda", dtype=torch.bfloat16)
    base = moe.default_tiles(D, F, torch.bfloat16, n_tokens * K / E)

    def step(hopper: bool):
        tiles = replace(base, hopper=hopper)
        _, saved = moe.moe_experts_fwd(x, wg, wu, wd, ids_NK, w_NK, save_for_backward=True, tiles=tiles)
        return moe.moe_experts_bwd(dout, x, wg, wu, wd, K, saved, tiles=tiles)

    same = all(torch.equal(a, b) for a, b in zip(step(False), step(True)))
    times = {False: [], True: []}
    for _ in range(rounds):
        for hopper in times:
            times[hopper].append(triton.testing.do_bench(lambda h=hopper: step(h), warmup=25, rep=150,
                                                         return_mode="median"))
    flops = 18 * n_tokens * K * D * F
    for hopper, ts in times.items():
        med = statistics.median(ts)
        print(f"N={n_tokens} hopper={hopper!s:5} median {med:.3f} ms ({100 * flops / med / 1e9 / PEAK_TFLOPS:.1f}% "
              f"of peak), min-max {min(ts):.3f}-{max(ts):.3f}; gradients identical: {same}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="4096,8192,16384")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe_hopper_ab.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for n in (int(v) for v in args.n.split(",") if v):
        ab(n, args.rounds)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
