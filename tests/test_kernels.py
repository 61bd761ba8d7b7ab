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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("drop,few_rows_tiles", [(None, True), (0.1, True), (None, False)])
def test_moe_experts_benchmark_shape(drop, few_rows_tiles, monkeypatch):
    """bf16 at the benchmark's V2-Lite shape (N=4096, E=64, K=6, D=2048, F=1408): full-size tiles and several
    row blocks per expert, which the small shapes above never reach; with the tile set chosen for few rows per
    expert (the default at this N) and with the one for many rows (forced)."""
    import model.kernels.moe as moe_mod

    if not few_rows_tiles:
        monkeypatch.setattr(moe_mod, "_FEW_ROWS", 0)
    inputs = _moe_inputs(4096, 2048, 1408, 64, 6, torch.bfloat16, drop)
    compare(_moe_kernel, _moe_reference, inputs, f"moe V2-Lite N=4096 drop={drop} few_rows_tiles={few_rows_tiles}")


def test_moe_rejects_unaligned_rows():
    """TMA descriptors need 16-byte row strides: F = 20 (40 bytes in fp16) is refused with a message."""
    inputs = _moe_inputs(3, 32, 20, 4, 2, torch.float16, None)
    with pytest.raises(ValueError, match="multiples of 8"):
        _moe_kernel(**inputs)


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


def _moe_tiles_against_fp64(inputs: dict, tiles, dout_seed: int):
    """moe_experts_fwd / moe_experts_bwd with the given tiles (fp32 inputs) against the float64 reference: the output
    and every gradient within 1e-5 (relative to the largest entry for gradients). Returns (saved, grads, keep)."""
    from model.kernels.moe import moe_experts_bwd, moe_experts_fwd

    args = [inputs[k].detach() for k in ("x_ND", "gate_proj", "up_proj", "down_proj")]
    ids, w, keep = inputs["expert_ids_NK"], inputs["weights_NK"].detach(), inputs["keep_NK"]
    out, saved = moe_experts_fwd(*args, ids, w, keep, save_for_backward=True, tiles=tiles)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed)).to(out.device)
    grads = moe_experts_bwd(dout, *args, ids.shape[1], saved, tiles=tiles)
    leaves = {k: inputs[k].detach().double().requires_grad_() for k in ("x_ND", "gate_proj", "up_proj", "down_proj",
                                                                         "weights_NK")}
    ref64 = _moe_reference(leaves["x_ND"], leaves["gate_proj"], leaves["up_proj"], leaves["down_proj"], ids,
                           leaves["weights_NK"], keep)
    ref_grads = torch.autograd.grad(ref64, list(leaves.values()), dout.double())
    assert (out.double() - ref64).abs().max() < 1e-5
    for name, g, r in zip(("dx", "dWg", "dWu", "dWd", "dw"), grads, ref_grads):
        assert (g.double().reshape(r.shape) - r).abs().max() < 1e-5 * max(1.0, r.abs().max().item()), name
    return saved, grads, keep


def _route_reference(expert_A: list[int], keep_A: list[bool], E: int, block_m: int):
    """route_metadata's outputs by plain Python: per expert (in order) its kept assignments in order, the run padded
    with −1 to a multiple of block_m / 2 and cut into block_m-row blocks (the last one the rest)."""
    half, rows, counts, starts, blocks = block_m // 2, [], [], [], []
    for e in range(E):
        run = [a for a, (x, k) in enumerate(zip(expert_A, keep_A)) if x == e and k]
        starts.append(len(rows))
        counts.append(len(run))
        padded = -(-len(run) // half) * half
        rows += run + [-1] * (padded - len(run))
        blocks += [(e, starts[-1] + j, min(block_m, padded - j)) for j in range(0, padded, block_m)]
    return rows, counts, starts, blocks


@pytest.mark.parametrize("chunk", [256, 64])
def test_moe_route_metadata_sorts_like_python(chunk):
    """route_metadata against `_route_reference`, over several chunks (the histogram / scatter programs) and several
    64-slot slices of the block table, with dropped assignments and an empty expert: rows, counts, first rows,
    used rows and the block table (unused slots −1 / 0 / 0) must be equal."""
    from model.kernels import moe

    N, K, E, block_m = 101, 6, 9, 8
    g = torch.Generator().manual_seed(5)
    ids_NK = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])  # expert E - 1 gets none
    keep_NK = torch.rand(N, K, generator=g) > 0.15
    rows, counts, starts, blocks = _route_reference(ids_NK.flatten().tolist(), keep_NK.flatten().tolist(), E, block_m)
    row_P, block_3Mb, pad_start_E, count_E, keep_A, used_rows_1 = moe.route_metadata(
        ids_NK.to(DEVICE), keep_NK.to(DEVICE), E, block_m, chunk=chunk)
    n_mb = block_3Mb.shape[1]
    assert N * K > 2 * chunk and n_mb > 64, "expected several chunks and block-table slices"
    assert int(used_rows_1) == len(rows) and row_P[:len(rows)].tolist() == rows
    assert count_E.tolist() == counts and pad_start_E.tolist() == starts and counts[-1] == 0
    table = [(e, p0, r) for e, p0, r in zip(*block_3Mb.tolist())]
    assert table == blocks + [(-1, 0, 0)] * (n_mb - len(blocks))
    assert keep_A.tolist() == keep_NK.flatten().int().tolist()


def test_moe_weight_grad_steps_shorter_than_row_block():
    """The weight-gradient GEMMs step over an expert's rows BLOCK_A at a time and may run past its last
    row into its zero padding rows: with BLOCK_A < block_m (and a SwiGLU-backward program smaller than a
    row block) every gradient must match the reference, as with the default tiles."""
    from model.kernels.moe import MoETiles, Tile

    inputs = _moe_inputs(37, 96, 40, 7, 3, torch.float32, drop=0.3)
    t = Tile(32, 64, 64, 4, 1)
    tiles = MoETiles(32, 8, t, t, t, t, Tile(64, 32, 16, 4, 1), Tile(32, 64, 16, 4, 1), Tile(8, 16, 0, 4, 1))
    _moe_tiles_against_fp64(inputs, tiles, dout_seed=0)


def test_moe_hidden_grad_over_column_tiles():
    """The hidden-grad GEMM z = dout_p @ Wd[e] over several column tiles of F (16-column tiles over F = 40: three,
    the last one partial; the tests above fit F in one tile on the CPU), with half-height row blocks followed by
    the next expert's block and padding rows: every gradient, the gate-weight gradient dw included, must match
    the float64 reference. The routing is checked to contain those cases."""
    from model.kernels.moe import MoETiles, Tile

    inputs = _moe_inputs(60, 64, 40, 6, 3, torch.float32, drop=0.2, seed=9)
    t = Tile(32, 64, 64, 4, 1)
    tiles = MoETiles(32, 8, t, t, Tile(32, 16, 32, 4, 1), t, Tile(64, 32, 16, 4, 1), Tile(32, 64, 16, 4, 1),
                     Tile(8, 16, 0, 4, 1))
    saved, grads, keep = _moe_tiles_against_fp64(inputs, tiles, dout_seed=1)
    row_P, block_3Mb, used_rows_1 = saved[0], saved[1], saved[5]
    used = int(used_rows_1.item())
    assert (block_3Mb[2] == 16).any() and (block_3Mb[2] == 32).any(), "no half-height and full row blocks"
    assert (row_P[:used] < 0).any(), "no padding rows"
    assert -(-40 // tiles.hidden_grad.n) == 3
    dw = grads[4].reshape(keep.shape)
    assert (dw[~keep] == 0).all() and (dw[keep] != 0).all(), "dw: dropped assignments zero, kept ones written"


# ------------------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,D,V,temperature,entropy,chunk_rows", [
    ((1,), 16, 37, 1.0, True, None),          # a single token
    ((2, 7), 80, 300, 0.7, False, 5),          # leading dims, several backward chunks
    ((19,), 48, 515, 1.3, True, 8),
])
def test_token_logprobs(dtype, lead, D, V, temperature, entropy, chunk_rows):
    from model.kernels.logprobs import fused_token_logprobs
    from model.logprobs import token_logprobs_reference

    g = torch.Generator().manual_seed(12)
    inputs = dict(hidden=_randn(*lead, D, dtype=dtype, seed=13).requires_grad_(),
                  lm_head=_randn(V, D, dtype=dtype, scale=2 * D ** -0.5, seed=14).requires_grad_(),
                  targets=torch.randint(0, V, lead, generator=g).to(DEVICE))

    def pick(result):
        logp, ent = result
        return (logp, ent) if entropy else logp

    def ker(hidden, lm_head, targets):
        return pick(fused_token_logprobs(hidden, lm_head, targets, temperature, entropy, chunk_rows=chunk_rows))

    def ref(hidden, lm_head, targets):
        return pick(token_logprobs_reference(hidden, lm_head, targets, temperature, chunk_size=4,
                                             with_entropy=entropy))

    compare(ker, ref, inputs, f"logprobs{(lead, D, V)}")


def test_token_logprobs_dispatch_and_nonfinite():
    """token_logprobs(kernels="triton") is the kernel; a nan hidden row gives nan for that token only."""
    from model.logprobs import token_logprobs, token_logprobs_reference

    h = _randn(6, 24, dtype=torch.float32, seed=15)
    h[2, 5] = float("nan")
    w = _randn(70, 24, dtype=torch.float32, seed=16)
    y = torch.arange(6, device=DEVICE) * 11
    out, ent = token_logprobs(h, w, y, with_entropy=True, kernels="triton")
    ref, ref_ent = token_logprobs_reference(h, w, y, with_entropy=True)
    ref64, ref64_ent = token_logprobs_reference(h.double(), w.double(), y, with_entropy=True)
    assert_matches("logprobs nonfinite", out, ref, ref64)
    assert_matches("entropy nonfinite", ent, ref_ent, ref64_ent)
    assert out[2].isnan() and out[[0, 1, 3, 4, 5]].isfinite().all()


# ----------------------------------------------------------------------------------------- MLA decode
def _mla_pair(seed: int):
    """(config, reference attention, kernels="triton" attention with the same weights), weights ~ N(0, 0.05)
    so that the absorbed scores are far from uniform."""
    from model.attention import MultiHeadLatentAttention
    from model.config import DeepseekV2Config

    torch.manual_seed(seed)
    cfg = DeepseekV2Config.preset("tiny", initializer_range=0.1)
    ref_attn = MultiHeadLatentAttention(cfg, 0)
    for p in ref_attn.parameters():
        p.data.normal_(0, 0.05)
    ker_attn = MultiHeadLatentAttention(DeepseekV2Config.preset("tiny", initializer_range=0.1, kernels="triton"), 0)
    ker_attn.load_state_dict(ref_attn.state_dict())
    return cfg, ref_attn, ker_attn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,ranges", [
    (1, 1, [(0, 1)]),                               # a single cached token
    (3, 150, [(0, 150), (37, 150), (5, 99)]),       # full, left-padded, ragged end
    (2, 70, [(0, 0), (69, 70)]),                    # an empty row (nan, as the reference) and a 1-key row
])
def test_mla_decode(dtype, B, S, ranges):
    cfg, ref_attn, ker_attn = _mla_pair(17)
    H, N, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q_nope = _randn(B, H, 1, N, dtype=dtype, seed=18)
    q_pe = _randn(B, H, 1, R, dtype=dtype, seed=19)
    latent = _randn(B, S, C + R, dtype=dtype, seed=20)  # one cache tensor; c_kv / k_pe are strided views
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    for b, (lo, hi) in enumerate(ranges):
        mask[b, ..., lo:hi] = True
    args = (q_nope, q_pe, latent[..., :C], latent[..., C:], mask)
    with torch.no_grad():
        out = ker_attn.to(DEVICE, dtype)._absorb_decode_kernel(*args)
        ref = ref_attn.to(DEVICE, dtype)._absorb(*args)
        ref64 = ref_attn.to(DEVICE, torch.float64)._absorb(*(a.double() if a.is_floating_point() else a for a in args))
    assert_matches(f"mla_decode{(B, S)}", out, ref, ref64)


def test_mla_decode_key_ranges_and_holes():
    """Ranges come from the mask without a host sync; a hole inside a row's range is masked too."""
    from model.kernels.mla_decode import decode_key_ranges

    mask = torch.zeros(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 2:] = True
    mask[1, ..., 0:4] = True
    start, end, _ = decode_key_ranges(mask, 3, 9, "cpu")
    assert start.tolist() == [2, 0, 0] and end.tolist() == [9, 4, 0]
    start, end, key_mask = decode_key_ranges(None, 2, 5, "cpu")
    assert start.tolist() == [0, 0] and end.tolist() == [5, 5] and key_mask is None


def test_mla_decode_mask_with_hole():
    from model.attention import MultiHeadLatentAttention
    from model.config import DeepseekV2Config

    torch.manual_seed(24)
    ref_attn = MultiHeadLatentAttention(DeepseekV2Config.preset("tiny", initializer_range=0.1), 0)
    ker_attn = MultiHeadLatentAttention(DeepseekV2Config.preset("tiny", initializer_range=0.1, kernels="triton"), 0)
    ker_attn.load_state_dict(ref_attn.state_dict())
    ref_attn, ker_attn = ref_attn.to(DEVICE), ker_attn.to(DEVICE)
    B, S = 2, 40
    args = (_randn(B, 4, 1, 32, dtype=torch.float32, seed=25), _randn(B, 4, 1, 64, dtype=torch.float32, seed=26),
            _randn(B, S, 512, dtype=torch.float32, seed=27), _randn(B, S, 64, dtype=torch.float32, seed=28))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    mask[0, ..., 10:20] = False  # a hole
    mask[1, ..., :3] = False
    with torch.no_grad():
        out = ker_attn._absorb_decode_kernel(*args, mask)
        ref = ref_attn._absorb(*args, mask)
        ref64 = ref_attn.double()._absorb(*(a.double() for a in args), mask)
    assert_matches("mla_decode hole", out, ref, ref64)



@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_mla_decode_split_counts(monkeypatch, dtype, num_splits):
    """One split (written directly, no merge) and five 32-key splits, the last ones empty for the short
    rows, merged in-kernel by the split that arrives last. Two calls: on the GPU the second reuses the
    arrival counters, which the first must have left at 0."""
    import functools

    import model.kernels.mla_decode as mla_mod

    monkeypatch.setattr(mla_mod, "mla_decode", functools.partial(mla_mod.mla_decode, num_splits=num_splits,
                                                                 block_s=32))
    cfg, ref_attn, ker_attn = _mla_pair(29)
    B, S, H = 3, 150, cfg.num_attention_heads
    C, R, N = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    latent = _randn(B, S, C + R, dtype=dtype, seed=30)
    args = (_randn(B, H, 1, N, dtype=dtype, seed=31), _randn(B, H, 1, R, dtype=dtype, seed=32),
            latent[..., :C], latent[..., C:])
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=DEVICE)
    for b, (lo, hi) in enumerate([(0, 150), (37, 150), (5, 99)]):
        mask[b, ..., lo:hi] = True
    with torch.no_grad():
        ker_attn, ref_attn = ker_attn.to(DEVICE, dtype), ref_attn.to(DEVICE, dtype)
        outs = [ker_attn._absorb_decode_kernel(*args, mask) for _ in range(2)]
        ref = ref_attn._absorb(*args, mask)
        ref64 = ref_attn.to(DEVICE, torch.float64)._absorb(*(a.double() for a in args), mask)
    for i, out in enumerate(outs):
        assert_matches(f"mla_decode splits={num_splits} call {i}", out, ref, ref64)


# ---------------------------------------------------------------------------------------- whole model
def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Wrap the kernels' entry points so a test can assert the triton model really used them."""
    import model.kernels.mla_decode as mla_mod
    import model.kernels.moe as moe_mod
    import model.kernels.rmsnorm as norm_mod
    import model.kernels.rope as rope_mod

    calls = {}
    for module, name in ((norm_mod, "rms_norm"), (rope_mod, "apply_rope_interleaved_triton"),
                         (moe_mod, "moe_experts"), (mla_mod, "mla_decode")):
        fn = getattr(module, name)
        calls[name] = 0

        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _tiny_models():
    from model.config import DeepseekV2Config
    from model.modeling import DeepseekV2ForCausalLM
    from model.moe import RoutedExperts

    models = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(21)
        model = DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny", initializer_range=0.1, kernels=kernels))
        # the config switch alone must reach the experts
        assert all(m.kernels == kernels for m in model.modules() if isinstance(m, RoutedExperts))
        models[kernels] = model.to(DEVICE)
    return models


def test_tiny_model_triton_matches_torch_loss_and_gradients(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    models = _tiny_models()
    ids = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(22)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    results = {}
    for kernels, model in models.items():
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results[kernels] = out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert calls["rms_norm"] and calls["apply_rope_interleaved_triton"] and calls["moe_experts"], calls
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    assert torch.allclose(loss_k, loss_t, rtol=1e-5, atol=0), (loss_k.item(), loss_t.item())
    assert grads_t.keys() == grads_k.keys()
    for name, g_t in grads_t.items():
        assert g_t is not None and grads_k[name] is not None, name
        scale = g_t.abs().max().clamp(min=1e-12)
        assert ((grads_k[name] - g_t).abs().max() / scale).item() < 1e-4, name


def test_tiny_model_decode_triton_matches_torch(monkeypatch):
    """Left-padded prompts, then greedy decode steps from the cache: the decode steps take the MLA
    kernel (one token per sequence, per-row key ranges) and give the reference's logits."""
    calls = _count_kernel_calls(monkeypatch)
    models = _tiny_models()
    ids = torch.randint(3, 512, (3, 6), generator=torch.Generator().manual_seed(23)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    logits = {}
    for kernels, model in models.items():
        model.eval()
        steps, cur, cur_mask, past = [], ids, mask, None
        with torch.no_grad():
            for _ in range(3):
                out = model(input_ids=cur, attention_mask=cur_mask, past_key_values=past, use_cache=True)
                past = out.past_key_values
                steps.append(out.logits[:, -1])
                cur = out.logits[:, -1].argmax(-1, keepdim=True)
                cur_mask = torch.cat([cur_mask, torch.ones_like(cur)], dim=1)
        logits[kernels] = torch.stack(steps)
    assert calls["mla_decode"] == 2 * models["triton"].config.num_hidden_layers, calls  # two decode steps
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
