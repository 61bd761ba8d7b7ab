"""Triton kernels beside the plain-PyTorch references of `model/` (switch: `DeepseekV2Config.kernels`).

One file per kernel, each layered `_name_kernel` (triton.jit) → host function (shape/dtype checks)
→ `torch.autograd.Function` where training needs it. The module files of `model/` import these
lazily, only when `kernels="triton"`, so the torch path never imports Triton.

  rmsnorm.py     RMSNorm forward/backward, optionally fused with the residual add
  rope.py        interleaved (adjacent-pair) RoPE forward/backward
  moe.py         routed experts: permutation, grouped GEMM gate/up + SwiGLU, grouped GEMM down, combine
  moe_hopper/    Hopper (sm_90) warp-specialized Gluon kernels for moe.py's gate_up, down projection and backward
                 GEMMs, used where they fit (a package: one module per kernel family)
  mla_decode.py  MLA decode over the latent cache with absorbed weights (split over the context)
  logprobs.py    hidden → log-prob of given tokens (+ entropy) without [tokens, vocab] logits

On a machine without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set
before this package is imported), which takes CPU tensors; fp32/fp16 only (ENVIRONMENT.md).
"""
