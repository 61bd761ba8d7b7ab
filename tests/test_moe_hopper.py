"""model/kernels/moe_hopper.py: the Gluon weight-gradient kernel against an fp32 reference, and the MoE step with
the Hopper kernels on and off. The kernels run only on a Hopper GPU (sm_90) with a tested Triton (`usable`); on
other machines only the host-side checks run here, and moe.py runs its Triton kernels."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.kernels import moe_hopper
from model.kernels.moe_hopper import WgradTile

HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
          and moe_hopper.usable(torch.empty(1, device="cuda", dtype=torch.bfloat16)))
hopper_only = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90) and a tested Triton")


def test_usable_only_on_hopper_16bit():
    assert not moe_hopper.usable(torch.empty(2, dtype=torch.bfloat16))  # CPU tensor
    if torch.cuda.is_available():
        assert not moe_hopper.usable(torch.empty(2, device="cuda", dtype=torch.float32))


def test_tile_choice_and_fit():
    assert moe_hopper.wgrad_tile(1, 384).kind == "pp" and moe_hopper.wgrad_tile(2, 384).kind == "pp"
    assert moe_hopper.wgrad_tile(1, 1536).kind == "si" and moe_hopper.wgrad_tile(2, 1536).kind == "sj"
    pp, si = moe_hopper.wgrad_tile(1, 384), moe_hopper.wgrad_tile(1, 1536)
    assert moe_hopper.wgrad_fits(1408, 2048, 64, pp) and moe_hopper.wgrad_fits(2048, 1408, 64, si)
    assert not moe_hopper.wgrad_fits(1408, 2048, 64, si)  # 1408 rows are not whole 256-row tiles
    assert not moe_hopper.wgrad_fits(96, 2048, 64, pp)  # nor 128-row ones
    assert not moe_hopper.wgrad_fits(1408, 2048, 32, pp)  # a 64-row reduction step would leave the expert


def test_weight_grad_rejects_mismatched_shapes():
    a, b = torch.zeros(1, 64, 128), torch.zeros(64, 128)
    start, count = torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        moe_hopper.weight_grad(a, b, start, count, torch.zeros(1, 2, 128, 128), moe_hopper.wgrad_tile(1, 10))
    with pytest.raises(ValueError, match="128 × 128 consumer tiles"):
        moe_hopper.weight_grad(a, b, start, count, torch.zeros(1, 3, 128, 128), WgradTile("pp", 256, 128))


def _padded_rows(counts: list[int], G: int, DI: int, DJ: int, dtype, seed: int):
    """A [G, P, DI], B [P, DJ] in moe.py's layout: each expert's rows padded with zero rows to a multiple of 64."""
    g = torch.Generator().manual_seed(seed)
    padded = [-(-c // 64) * 64 for c in counts]
    P = sum(padded)
    a, b = torch.zeros(G, P, DI), torch.zeros(P, DJ)
    start = 0
    for c, p in zip(counts, padded):
        a[:, start:start + c] = torch.randn(G, c, DI, generator=g)
        b[start:start + c] = torch.randn(c, DJ, generator=g)
        start += p
    starts = torch.tensor([0] + padded[:-1]).cumsum(0)
    dev = "cuda"
    return (a.to(dev, dtype), b.to(dev, dtype), starts.to(dev, torch.int32),
            torch.tensor(counts, device=dev, dtype=torch.int32))


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("G,DI,DJ,tile", [
    (1, 256, 200, WgradTile("pp", 128, 128, stages=6, epi_n=64)),   # DJ not a multiple of the tile: TMA clips
    (2, 128, 264, WgradTile("pp", 128, 128)),
    (1, 256, 136, WgradTile("si", 256, 128, stages=4, epi_n=64)),
    (2, 128, 264, WgradTile("sj", 128, 256, stages=3)),
], ids=["pp-G1", "pp-G2", "si-G1", "sj-G2"])
@pytest.mark.parametrize("few_rows", [True, False], ids=["few-rows", "many-rows"])
def test_weight_grad_matches_fp32_reference(dtype, G, DI, DJ, tile, few_rows):
    counts = [37, 0, 130, 64, 1, 0, 200] if few_rows else [1100, 0, 700, 1537]  # empty experts, odd counts
    a, b, start, count = _padded_rows(counts, G, DI, DJ, dtype, seed=3)
    c = torch.full((G, len(counts), DI, DJ), float("nan"), device="cuda", dtype=dtype)
    moe_hopper.weight_grad(a, b, start, count, c, tile)
    for e, n in enumerate(counts):
        r0 = int(start[e])
        ref = a[:, r0:r0 + n].double().transpose(1, 2) @ b[r0:r0 + n].double()  # [G, DI, DJ]
        err = (c[:, e].double() - ref).abs().max().item()
        tol = torch.finfo(dtype).eps * ref.abs().max().item()  # fp32 sums, one rounding: under an ulp of the largest
        assert err <= tol, f"expert {e} ({n} rows): max error {err:.3g} > {tol:.3g}"
        if n == 0:
            assert torch.equal(c[:, e], torch.zeros_like(c[:, e])), "an expert without rows must get zeros"


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("n_tokens", [333, 4096, 16384])
def test_moe_step_same_with_and_without_hopper_kernels(n_tokens, monkeypatch):
    """The whole moe_experts fwd+bwd at V2-Lite expert shapes (ping-pong tiles below 1024 rows per expert, split
    tiles at 16384 tokens): the Hopper weight-gradient kernel gives the Triton kernel's gradients to the bit (fp32
    sums over the same 64-row steps), and the Hopper path was taken."""
    import model.kernels.moe as moe

    torch.manual_seed(0)
    E, D, F, K = 64, 2048, 1408, 6
    wg, wu = (torch.randn(E, F, D, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2))
    wd = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(n_tokens, D, device="cuda", dtype=torch.bfloat16)
    scores = torch.randn(n_tokens, E, device="cuda")
    scores[:, E - 1] = float("-inf")  # an expert without tokens
    w_NK, ids_NK = scores.softmax(-1).topk(K, dim=-1)
    dout = torch.randn(n_tokens, D, device="cuda", dtype=torch.bfloat16)
    base = moe.default_tiles(D, F, torch.bfloat16, n_tokens * K / E)
    launched = []
    real = moe_hopper.weight_grad
    monkeypatch.setattr(moe_hopper, "weight_grad", lambda *args: (launched.append(args[-1].kind), real(*args))[1])
    grads = {}
    for hopper in (False, True):
        tiles = replace(base, hopper=hopper)
        _, saved = moe.moe_experts_fwd(x, wg, wu, wd, ids_NK, w_NK, save_for_backward=True, tiles=tiles)
        grads[hopper] = moe.moe_experts_bwd(dout, x, wg, wu, wd, K, saved, tiles=tiles)
    assert launched == (["pp", "pp"] if n_tokens < 10000 else ["si", "sj"]), launched  # dWd, then dWg/dWu
    for name, a, b in zip(("dx", "dWg", "dWu", "dWd", "dw"), grads[False], grads[True]):
        assert torch.equal(a, b), f"{name} differs between the Triton and Hopper weight-gradient kernels"
