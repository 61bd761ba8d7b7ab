"""Every Triton kernel of model/kernels against its plain-PyTorch reference: outputs and all gradients.

Comparison rule (the FlashAttention tests' convention, plus FlashMLA's non-finite check): with the
same inputs we run the reference in the test dtype and in float64. The kernel's largest error against
the float64 result must be within 2× the reference's own error in the test dtype, plus a floor of
a few ulps of the dtype at the output's scale; inf/nan must sit at the same positions as in the
reference. Shapes are deliberately odd (no multiple of any block size), include empty experts and
single tokens. On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), fp32 and
fp16 only; bf16 runs on a GPU (marked `gpu`).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BF16 = pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")],
                    id="bf16")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), BF16]


def assert_matches(name: str, out: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, ulps: float = 8.0) -> None:
    """out (kernel) vs ref (reference, same dtype) and ref64 (reference in float64)."""
    assert out.shape == ref.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} vs {ref.dtype}"
    out64, ref_lo = out.detach().double().cpu(), ref.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    for what in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(what(out64), what(ref_lo)), f"{name}: {what.__name__} positions differ"
    finite = torch.isfinite(ref_lo) & torch.isfinite(ref64)
    if not finite.any():
        return
    err = (out64 - ref64)[finite].abs().max().item()
    ref_err = (ref_lo - ref64)[finite].abs().max().item()
    scale = ref64[finite].abs().max().item()
    tol = 2 * ref_err + ulps * torch.finfo(out.dtype).eps * scale
    assert err <= tol, f"{name}: max error {err:.3g} > tol {tol:.3g} (reference's own error {ref_err:.3g})"


def _randn(*shape, dtype, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def run_fwd_bwd(fn, inputs: dict, grad_out_seed: int = 0):
    """Call fn(**inputs), backprop a fixed random upstream gradient; return (outputs, grads by name)."""
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    out = fn(**inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = 0
    for i, o in enumerate(outs):
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(grad_out_seed + i)).to(o.device)
        loss = loss + (o.double() * g.double()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True) if leaves else ()
    return outs, dict(zip(leaves, grads))


def compare(fn_kernel, fn_ref, inputs: dict, name: str, ulps: float = 8.0):
    """Run kernel, reference and float64 reference on copies of `inputs`; compare outputs and grads."""
    def clone(to64: bool):
        res = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                t = v.detach().double() if to64 else v.detach().clone()
                res[k] = t.requires_grad_(v.requires_grad)
            else:
                res[k] = v
        return res

    outs, grads = run_fwd_bwd(fn_kernel, clone(False))
    refs, ref_grads = run_fwd_bwd(fn_ref, clone(False))
    refs64, ref64_grads = run_fwd_bwd(fn_ref, clone(True))
    for i, (o, r, r64) in enumerate(zip(outs, refs, refs64)):
        assert_matches(f"{name} out{i}", o, r, r64, ulps)
    for k in ref_grads:
        assert grads[k] is not None, f"{name}: kernel gave no gradient for {k}"
        assert_matches(f"{name} d{k}", grads[k], ref_grads[k], ref64_grads[k], ulps)
    return outs, grads


# ------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,residual", [((1, 1, 7), False), ((3, 5, 97), True), ((37, 513), False),
                                            ((2, 3, 96), True)])
def test_rmsnorm(dtype, shape, residual):
    from model.kernels.rmsnorm import rms_norm
    from model.norm import RMSNorm

    D = shape[-1]
    w = _randn(D, dtype=dtype, seed=1).requires_grad_()
    inputs = dict(x=_randn(*shape, dtype=dtype, seed=2).requires_grad_(), w=w)
    if residual:
        inputs["r"] = _randn(*shape, dtype=dtype, seed=3).requires_grad_()

    def ref(x, w, r=None):
        h = x if r is None else x + r
        y = functional_call(RMSNorm(D, eps=1e-6), {"weight": w}, (h,))
        return y if r is None else (y, h)

    def ker(x, w, r=None):
        return rms_norm(x, w, 1e-6, r)

    compare(ker, ref, inputs, f"rmsnorm{shape}")


def test_rmsnorm_nonfinite_and_module_switch():
    """A row holding inf/nan gives nan in the same places; RMSNorm(kernels="triton") is the kernel."""
    from model.norm import RMSNorm

    x = _randn(4, 33, dtype=torch.float32, seed=4)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    torch_norm = RMSNorm(33).to(DEVICE)
    torch_norm.weight.data = _randn(33, dtype=torch.float32, seed=5)
    triton_norm = RMSNorm(33, kernels="triton").to(DEVICE)
    triton_norm.load_state_dict(torch_norm.state_dict())
    ref, out = torch_norm(x), triton_norm(x)
    assert_matches("rmsnorm nonfinite", out, ref, torch_norm.double()(x.double()))
    assert out[1].isnan().all() and out[0].isfinite().all()


# ---------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,R,strided", [(1, 1, 1, 8, False), (2, 3, 5, 64, True), (3, 1, 19, 64, False)])
def test_rope(dtype, B, H, T, R, strided):
    from model.kernels.rope import apply_rope_interleaved_triton
    from model.rope import apply_rope_interleaved, rope_cos_sin

    if strided:  # q_pe is a slice of the query projection, viewed [B, H, T, R]: not contiguous
        q_BTHK = _randn(B, T, H, 11 + R, dtype=dtype, seed=6)
        x = q_BTHK[..., 11:].transpose(1, 2)
        assert not x.is_contiguous()
    else:
        x = _randn(B, H, T, R, dtype=dtype, seed=6)
    positions_BT = torch.randint(0, 4000, (B, T), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    cos, sin = rope_cos_sin(inv_freq, 0.9, positions_BT, dtype)
    inputs = dict(x_BHTR=x.requires_grad_(), cos_BTR2=cos, sin_BTR2=sin)
    compare(apply_rope_interleaved_triton, apply_rope_interleaved, inputs, f"rope{(B, H, T, R)}")


def test_rope_nonfinite():
    from model.kernels.rope import apply_rope_interleaved_triton
    from model.rope import apply_rope_interleaved

    x = _randn(2, 2, 3, 8, dtype=torch.float32, seed=8)
    x[0, 1, 2, 5] = float("nan")
    x[1, 0, 0, 2] = float("inf")
    cos, sin = _randn(2, 3, 4, dtype=torch.float32, seed=9), _randn(2, 3, 4, dtype=torch.float32, seed=10)
    ref = apply_rope_interleaved(x, cos, sin)
    assert_matches("rope nonfinite", apply_rope_interleaved_triton(x, cos, sin), ref,
                   apply_rope_interleaved(x.double(), cos.double(), sin.double()))


# ----------------------------------------------------------------------------------------------- MoE
def _moe_inputs(N, D, F, E, K, dtype, drop: float | None, seed=11):
    """Routing that never picks the last expert (an empty expert) and optionally drops assignments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)]).to(DEVICE)
    inputs = dict(
        x_ND=_randn(N, D, dtype=dtype, seed=seed + 1).requires_grad_(),
        gate_proj=_randn(E, F, D, dtype=dtype, scale=D ** -0.5, seed=seed + 2).requires_grad_(),
        up_proj=_randn(E, F, D, dtype=dtype, scale=D ** -0.5, seed=seed + 3).requires_grad_(),
        down_proj=_randn(E, D, F, dtype=dtype, scale=F ** -0.5, seed=seed + 4).requires_grad_(),
        expert_ids_NK=ids,
        weights_NK=torch.rand(N, K, generator=g).to(DEVICE).requires_grad_(),
        keep_NK=(torch.rand(N, K, generator=g) >= drop).to(DEVICE) if drop is not None else None,
    )
    return inputs


def _moe_reference(x_ND, gate_proj, up_proj, down_proj, expert_ids_NK, weights_NK, keep_NK):
    from model.moe import RoutedExperts

    E, F, D = gate_proj.shape
    experts = RoutedExperts(E, D, F)
    params = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
    return functional_call(experts, params, (x_ND, expert_ids_NK, weights_NK, keep_NK))


def _moe_kernel(x_ND, gate_proj, up_proj, down_proj, expert_ids_NK, weights_NK, keep_NK):
    from model.kernels.moe import moe_experts

    return moe_experts(x_ND, gate_proj, up_proj, down_proj, expert_ids_NK, weights_NK, keep_NK)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,F,E,K,drop", [(1, 32, 16, 4, 2, None), (37, 96, 40, 7, 3, None),
                                           (29, 72, 48, 9, 2, 0.3)])
def test_moe_experts(dtype, N, D, F, E, K, drop):
    inputs = _moe_inputs(N, D, F, E, K, dtype, drop)
    compare(_moe_kernel, _moe_reference, inputs, f"moe{(N, D, F, E, K, drop)}")


def test_moe_everything_dropped_and_nonfinite():
    """All assignments dropped: zero output, zero gradients. A nan token stays confined to its row."""
    inputs = _moe_inputs(5, 32, 16, 4, 2, torch.float32, drop=1.0)
    outs, grads = run_fwd_bwd(_moe_kernel, inputs)
    assert torch.equal(outs[0], torch.zeros_like(outs[0]))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())

    inputs = _moe_inputs(6, 32, 16, 4, 2, torch.float32, drop=None)
    with torch.no_grad():
        inputs["x_ND"][3, 7] = float("nan")
        ref = _moe_reference(**inputs)
        ref64 = _moe_reference(**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                  for k, v in inputs.items()})
        out = _moe_kernel(**inputs)
    assert_matches("moe nonfinite", out, ref, ref64)
    assert out[3].isnan().all() and out[[0, 1, 2, 4, 5]].isfinite().all()
