"""model/kernels/moe_hopper/: the Gluon weight-gradient, hidden-grad, input-grad and down-projection kernels against
fp64 references (the row-block ones also against moe.py's Triton kernels, rows written included), and the MoE step with
the Hopper kernels on and off. The kernels run only on a Hopper GPU (sm_90) with a tested Triton (`usable`); on other
machines only the host-side checks run here, and moe.py runs its Triton kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import triton

from model.kernels import moe_hopper
from model.kernels._util import dot_precision
from model.kernels.moe_hopper import GateUpTile, HgradTile, IgradTile, WgradTile

HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
          and moe_hopper.usable(torch.empty(1, device="cuda", dtype=torch.bfloat16)))
ROOT = Path(__file__).resolve().parents[1]
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


def test_hidden_grad_fit():
    assert moe_hopper.hidden_grad_fits(2048, 1408, 128)
    assert moe_hopper.hidden_grad_fits(2048, 200, 128)  # F need not be whole tiles: TMA clips the last one
    assert not moe_hopper.hidden_grad_fits(2048, 1408, 64)  # row blocks must be the kernel's 128-row tiles
    assert not moe_hopper.hidden_grad_fits(2056, 1408, 128)  # a 64-wide reduction step would read the next expert
    assert not moe_hopper.hidden_grad_fits(2048, 1404, 128)  # z rows not 16-byte aligned


def test_hidden_grad_rejects_mismatched_shapes():
    dout, wd = torch.zeros(256, 128), torch.zeros(3, 128, 64)
    block = torch.zeros(3, 4, dtype=torch.int32)
    start, count = torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        moe_hopper.hidden_grad(dout, wd, block, start, count, torch.zeros(256, 72))
    with pytest.raises(ValueError, match="does not fit D"):
        moe_hopper.hidden_grad(dout[:, :96], wd[:, :96], block, start, count, torch.zeros(256, 64))
    with pytest.raises(ValueError, match="store pieces"):  # epilogue buffers of a quarter tile's rows
        moe_hopper.hidden_grad(dout, wd, block, start, count, torch.zeros(256, 64), moe_hopper.HgradTile(epi_m=32))


def test_input_grad_tile_choice_fit_and_shape_checks():
    assert not moe_hopper.igrad_tile(384).split and moe_hopper.igrad_tile(1536).split
    assert moe_hopper.input_grad_fits(2048, 1408, 128, moe_hopper.igrad_tile(384))
    assert moe_hopper.input_grad_fits(2048, 1408, 128, moe_hopper.igrad_tile(1536))
    assert not moe_hopper.input_grad_fits(2048, 1400, 128, IgradTile())  # a K step would cross into the next expert
    assert not moe_hopper.input_grad_fits(200, 1408, 128, IgradTile())  # no whole 128-column tiles
    assert not moe_hopper.input_grad_fits(2048, 1408, 64, IgradTile())  # other row blocks than the kernel's
    dgu, w = torch.zeros(2, 128, 64), torch.zeros(3, 64, 128)
    table, expert = torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit together"):
        moe_hopper.input_grad(dgu, w, torch.zeros(3, 64, 64), torch.zeros(128, dtype=torch.int32), table, expert,
                              expert, torch.zeros(100, 128), IgradTile())
    with pytest.raises(ValueError, match="does not fit"):
        moe_hopper.input_grad(dgu, w, w, torch.zeros(128, dtype=torch.int32), table, expert, expert,
                              torch.zeros(100, 128), IgradTile(block_n=256))


def test_down_proj_tile_choice_fit_and_shape_checks():
    assert moe_hopper.down_tile(384) == moe_hopper.igrad_tile(384) and moe_hopper.down_tile(1536).split
    assert moe_hopper.down_fits(2048, 1408, 128, moe_hopper.down_tile(384))
    assert moe_hopper.down_fits(2048, 1408, 128, moe_hopper.down_tile(1536))
    assert moe_hopper.down_fits(2048, 200, 128, IgradTile())  # F need not be whole steps: TMA zero-fills h and Wd
    assert not moe_hopper.down_fits(2048, 1404, 128, IgradTile())  # h rows not 16-byte aligned
    assert not moe_hopper.down_fits(200, 1408, 128, IgradTile())  # a weight tile would read the next expert's Wd
    assert not moe_hopper.down_fits(2048, 1408, 64, IgradTile())  # other row blocks than the kernel's
    h, wd = torch.zeros(128, 64), torch.zeros(3, 128, 64)
    table, expert, row = torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.zeros(
        128, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit together"):
        moe_hopper.down_proj(h, wd[:, :, :32], row, table, expert, expert, torch.zeros(100, 128), IgradTile())
    with pytest.raises(ValueError, match="does not fit"):
        moe_hopper.down_proj(h, wd, row, table, expert, expert, torch.zeros(100, 128), IgradTile(block_n=256))


def test_gate_up_tile_choice_fit_and_shape_checks():
    few, many = moe_hopper.gate_up_tile(384), moe_hopper.gate_up_tile(1536)
    assert (few.stages, few.epi_bufs) == (6, 1) and (many.stages, many.epi_bufs) == (4, 3)
    for t in (few, many):  # the ring and the epilogue buffers fit the 227 KB of shared memory
        assert t.stages * 128 * t.block_k * 2 * 2 + 2 * t.epi_bufs * 128 * t.block_f * 2 <= 227 * 1024
        assert moe_hopper.gate_up_fits(2048, 1408, 128, t)
    assert moe_hopper.gate_up_fits(2048, 200, 128, few)  # F need not be whole tiles: the stores clip past F
    assert not moe_hopper.gate_up_fits(2056, 1408, 128, few)  # no whole 64-wide reduction steps over D
    assert not moe_hopper.gate_up_fits(2048, 1404, 128, few)  # h rows not 16-byte aligned
    assert not moe_hopper.gate_up_fits(2048, 1408, 64, few)  # other row blocks than the kernel's
    x, w, h = torch.zeros(128, 128), torch.zeros(3, 64, 128), torch.zeros(128, 64)
    table, expert = torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit together"):
        moe_hopper.gate_up(x, w, w[:, :32], table, expert, expert, h, None, few)
    with pytest.raises(ValueError, match="do not fit together"):  # x must be in padded-row order, like h
        moe_hopper.gate_up(x[:100], w, w, table, expert, expert, h, None, few)
    with pytest.raises(ValueError, match="does not fit D"):
        moe_hopper.gate_up(x[:, :96], w[:, :, :96], w[:, :, :96], table, expert, expert, h, None, few)


def _compile_sm90(kernel, args: list, const: dict):
    """Compile a Gluon kernel for sm_90 without a GPU (Triton's bundled ptxas): its use of the installed Triton's
    Gluon API, its layouts and shared-memory shapes are checked, nothing runs. args: the non-constexpr arguments in
    order (descriptors, or signature strings such as "*i32")."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    free = [n for n in kernel.arg_names if n not in const]
    sig = {n: a if isinstance(a, str) else mangle_type(a) for n, a in zip(free, args, strict=True)}
    sig.update({k: "constexpr" for k in const})
    return triton.compile(GluonASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 128),
                          options={"num_warps": 4, "maxnreg": 168})


def _compile_all_sm90(rows_per_expert: float) -> None:
    """Every Gluon kernel of moe_hopper in the launch shapes moe.py picks (V2-Lite, bf16) compiled for sm_90."""
    bf, (P, D, F, E), i32 = torch.bfloat16, (26624, 2048, 1408, 64), "*i32"
    desc = lambda rows, cols, block: moe_hopper._desc(torch.empty(rows, cols, dtype=bf), block)  # noqa: E731
    for G, DI, DJ in ((1, D, F), (2, F, D)):  # dWd, then dWg / dWu
        t = moe_hopper.wgrad_tile(G, rows_per_expert)
        split_i, split_j = t.split
        _compile_sm90(moe_hopper._weight_grad_kernel,
                      [desc(G * P, DI, [t.block_k, t.block_i]), desc(P, DJ, [t.block_k, t.block_j]),
                       desc(G * E * DI, DJ, [t.block_i // split_i // 2, t.epi_n or t.block_j // split_j]),
                       i32, i32, "i32", "i32"],
                      dict(G=G, N_I=DI // t.block_i, N_J=triton.cdiv(DJ, t.block_j), STAGES=t.stages, SPLIT_I=split_i,
                           SPLIT_J=split_j))
    h = moe_hopper.HGRAD_TILE
    _compile_sm90(moe_hopper._hidden_grad_kernel,
                  [desc(P, D, [128, h.block_k]), desc(P, D, [64, h.block_k]), desc(E * D, F, [h.block_k, h.block_n]),
                   desc(P, F, [64, h.epi_n or h.block_n]), i32, i32, i32, "i32", "i32", "i32"],
                  dict(STAGES=h.stages, GROUP_M=h.group_m, N_COLS=triton.cdiv(F, h.block_n), HALF_ROWS=h.half_rows,
                       EXPERT_ORDER=h.expert_order, EPI_M=h.epi_m))
    ti, td = moe_hopper.igrad_tile(rows_per_expert), moe_hopper.down_tile(rows_per_expert)
    for kernel, t, a_rows, weights in ((moe_hopper._input_grad_kernel, ti, 2 * P,
                                        2 * [desc(E * F, D, [ti.block_k, ti.block_n])]),  # Wg, Wu as [E·F, D]
                                       (moe_hopper._down_proj_kernel, td, P,
                                        [desc(E * D, F, [td.block_n, td.block_k])])):  # Wd as [E·D, F], transposed
        _compile_sm90(kernel, [desc(a_rows, F, [128, t.block_k]), desc(a_rows, F, [64, t.block_k]), *weights,
                               i32, i32, i32, i32, "*bf16", "i32", "i32", "i32", "i32", "i32"],
                      dict(BN=t.block_n, BK=t.block_k, STAGES=t.stages, GROUP_M=t.group_m, N_COLS=D // t.block_n,
                           HALF_ROWS=t.half_rows or t.split, EXPERT_ORDER=t.expert_order, CONVERT=t.convert,
                           EPI_N=t.epi_n or t.block_n, SPLIT=t.split))

    g = moe_hopper.gate_up_tile(rows_per_expert)
    for store_gu in (True, False):  # training forward, forward without backward
        _compile_sm90(moe_hopper._gate_up_kernel,
                      [desc(P, D, [128, g.block_k]), *(2 * [desc(E * F, D, [g.block_f, g.block_k])]),  # Wg, Wu
                       desc(P, F, [64, g.block_f]), desc(2 * P, F, [64, g.block_f]), i32, i32, i32,
                       "i32", "i32", "i32", "i32", "i32"],
                      dict(STAGES=g.stages, GROUP_M=g.group_m, N_COLS=triton.cdiv(F, g.block_f),
                           EXPERT_ORDER=g.expert_order, STORE_GU=store_gu, EPI_BUFS=g.epi_bufs))


@pytest.mark.parametrize("rows_per_expert", [384, 1536], ids=["few-rows", "many-rows"])
def test_kernels_compile_for_hopper_with_the_installed_triton(rows_per_expert, tmp_path):
    """Every Gluon kernel in the launch shapes moe.py picks (V2-Lite, bf16) compiles for sm_90 with the installed
    Triton, on any machine: CI (Triton 3.9 here) catches a change that breaks the Gluon code, or a Triton release
    that moves its API, without a GPU. `usable` still admits only the releases the kernels ran on (TESTED_TRITON).
    In a fresh process: without TRITON_INTERPRET (once the interpreter has run a kernel it leaves Triton's language
    patched for itself, and compiling fails) and with an empty Triton cache (its key does not cover module-level
    aliases such as `_tma_load`, so a cached binary could hide a broken one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    code = f"import test_moe_hopper as t; t._compile_all_sm90({rows_per_expert})"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if "Error" in line][-4:]
    assert done.returncode == 0, f"a Gluon kernel does not compile for sm_90 with Triton {triton.__version__}: {errors}"


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
    """The whole moe_experts fwd+bwd at V2-Lite expert shapes (the gate_up; below 1024 rows per expert the Hopper
    hidden grad, ping-pong down-projection, weight-gradient and input-grad tiles; at 16384 tokens the split ones, the
    Triton hidden grad): the output and the Hopper hidden and weight gradients equal the Triton kernels' to the bit
    (fp32 sums over the same 64-wide steps in the same order, k16 wgmmas either way), dx within the rounding of its
    other summation order, and the Hopper paths were taken."""
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
    real_wgrad, real_hgrad = moe_hopper.weight_grad, moe_hopper.hidden_grad
    monkeypatch.setattr(moe_hopper, "weight_grad",
                        lambda *args: (launched.append(args[-1].kind), real_wgrad(*args))[1])
    monkeypatch.setattr(moe_hopper, "hidden_grad", lambda *args: (launched.append("hidden"), real_hgrad(*args))[1])
    real_igrad, real_down, real_gate_up = moe_hopper.input_grad, moe_hopper.down_proj, moe_hopper.gate_up
    monkeypatch.setattr(moe_hopper, "gate_up", lambda *args: (launched.append("gate_up"), real_gate_up(*args))[1])
    monkeypatch.setattr(moe_hopper, "input_grad",
                        lambda *args: (launched.append("split" if args[-1].split else "input"), real_igrad(*args))[1])
    monkeypatch.setattr(moe_hopper, "down_proj",
                        lambda *args: (launched.append("down-split" if args[-1].split else "down"),
                                       real_down(*args))[1])
    outs = {}
    for hopper in (False, True):
        tiles = replace(base, hopper=hopper, hopper_gate_up=hopper)
        out, saved = moe.moe_experts_fwd(x, wg, wu, wd, ids_NK, w_NK, save_for_backward=True, tiles=tiles)
        outs[hopper] = (out, *moe.moe_experts_bwd(dout, x, wg, wu, wd, K, saved, tiles=tiles))
    # with hopper=True only: gate_up, the down projection; the hidden grad below HGRAD_FEW_ROWS rows per expert, dWd,
    # dWg/dWu, the input grad
    few = n_tokens < 10000
    assert launched == (["gate_up", "down", "hidden", "pp", "pp", "input"] if few
                        else ["gate_up", "down-split", "si", "sj", "split"]), launched
    for name, a, b in zip(("out", "dx", "dWg", "dWu", "dWd", "dw"), outs[False], outs[True]):
        diff = (a.double() - b.double()).abs().max().item()
        if name == "dx":  # the input grad's two K segments are summed in another order: last bits of dxa rows
            scale = a.double().abs().max().item()
            rel = ((a.double() - b.double()).norm() / a.double().norm()).item()
            eps = torch.finfo(a.dtype).eps
            assert diff <= 2 * eps * scale and rel <= eps / 8, f"{name}: max diff {diff:.3g}, rel.err {rel:.3g}"
        else:
            assert torch.equal(a, b), f"{name} differs between the Triton and Hopper kernels (max diff {diff:.3g})"


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("dtype,F,tile", [
    (torch.bfloat16, 200, HgradTile()),  # moe.py's tile; F not whole 128-column tiles: the last one TMA-clipped
    (torch.float16, 200, HgradTile()),
    (torch.bfloat16, 384, HgradTile()),
    (torch.float16, 384, HgradTile()),
    (torch.bfloat16, 200, HgradTile(expert_order=False)),  # moe.py's GROUP_M order
    (torch.bfloat16, 200, HgradTile(half_rows=True)),  # half blocks as 64-row wgmmas
    (torch.bfloat16, 200, HgradTile(stages=6, epi_n=64)),  # a 6-deep ring, 64-column store pieces
    (torch.bfloat16, 200, HgradTile(stages=6, epi_n=64, epi_m=64)),  # 64 × 64 store pieces, one buffer's rows each
    (torch.float16, 384, HgradTile(stages=6, epi_m=64, half_rows=True)),
], ids=["bf16-F200", "fp16-F200", "bf16-F384", "fp16-F384", "bf16-groupm", "bf16-halfrows", "bf16-s6e64",
        "bf16-s6e64m64", "fp16-s6m64-halfrows"])
def test_hidden_grad_matches_fp64_reference_and_triton(dtype, F, tile):
    """z = dout_p @ Wd[e] over moe.py's routing metadata: odd row counts, half blocks (37, 64, 1, 129 rows), empty
    experts (first, middle, last), ~160 used row blocks (several tiles per program, so both ping-pong consumers
    and ring wrap-around run). Checked: each expert's rows against fp64 within an ulp of its largest output (fp32
    sums, one rounding), padding rows exactly 0 (the SwiGLU backward reads them), and the whole z, NaN-poisoned
    beforehand, identical to the bit to what moe.py's Triton kernel writes: same values, and rows outside every
    row block (past used_rows, with NaN dout rows there) left untouched by both."""
    import model.kernels.moe as moe

    counts = [0, 37, 4100, 64, 1, 0, 6400, 9603, 129, 0]
    E, D, K = len(counts), 256, 1
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    ids_NK = ids[torch.randperm(ids.numel(), generator=g)].view(-1, K).cuda()
    N = ids_NK.shape[0]
    tiles = moe.default_tiles(D, F, dtype, N * K / E)
    BM = tiles.block_m
    assert moe_hopper.hidden_grad_fits(D, F, BM, tile)
    row_P, block_3Mb, pad_start_E, count_E, _, used_rows_1 = moe.route_metadata(ids_NK, None, E, BM)
    used, P = int(used_rows_1), row_P.numel()
    x = torch.zeros(N, D, device="cuda", dtype=dtype)
    dout = torch.randn(N, D, generator=g).to("cuda", dtype)
    _, dout_PD = moe._gather_rows(x, dout, row_P, used_rows_1, K, BM)
    dout_PD[used:] = float("nan")  # unwritten by the gather: no used row block may read them into a stored row
    wd = (torch.randn(E, D, F, generator=g) * 0.05).to("cuda", dtype)
    z = torch.full((P, F), float("nan"), device="cuda", dtype=dtype)
    moe_hopper.hidden_grad(dout_PD, wd, block_3Mb, pad_start_E, count_E, z, tile)
    z_tri = torch.full_like(z, float("nan"))
    t = tiles.hidden_grad
    moe._launch(moe._moe_hidden_grad_kernel, t, block_3Mb.shape[1] * triton.cdiv(F, t.n),
                moe._tma(dout_PD, [BM, t.k]), moe._tma(wd, [1, t.k, t.n]), block_3Mb, z_tri, block_3Mb.shape[1], D,
                F, PRECISION=dot_precision(dtype), BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
    starts, padded_end = pad_start_E.tolist(), pad_start_E.tolist()[1:] + [used]
    for e, n in enumerate(counts):
        r0 = starts[e]
        ref = dout_PD[r0:r0 + n].double() @ wd[e].double()
        err = (z[r0:r0 + n].double() - ref).abs().max().item() if n else 0.0
        tol = torch.finfo(dtype).eps * ref.abs().max().item() if n else 0.0
        assert err <= tol, f"expert {e} ({n} rows): max error {err:.3g} > {tol:.3g}"
        pad = z[r0 + n:padded_end[e]]
        assert torch.equal(pad, torch.zeros_like(pad)), f"expert {e}: padding rows must be 0"
    assert torch.isnan(z[used:]).all(), "rows outside the row blocks must be left untouched"
    same_nan = torch.equal(torch.isnan(z), torch.isnan(z_tri))
    diff = (z.double() - z_tri.double()).nan_to_num(0.0).abs().max().item()
    assert same_nan and diff == 0, f"differs from the Triton kernel: NaN pattern equal {same_nan}, max diff {diff:.3g}"


_SCATTER_COUNTS = [0, 37, 4100, 64, 1, 0, 6400, 9603, 129, 0]
"""Rows per expert of the row-block scatter tests: odd counts, half blocks, empty experts (first, middle, last),
~160 used row blocks (several tiles per program, so both consumers and ring wrap-around run)."""


def _routed_rows(D: int, F: int, dtype, seed: int):
    """moe.py's routing metadata for _SCATTER_COUNTS (top-1), its tiles, and a generator for the operands."""
    import model.kernels.moe as moe

    E, K = len(_SCATTER_COUNTS), 1
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(_SCATTER_COUNTS)])
    ids_NK = ids[torch.randperm(ids.numel(), generator=g)].view(-1, K).cuda()
    tiles = moe.default_tiles(D, F, dtype, ids.numel() / E)
    row_P, block_3Mb, pad_start_E, count_E, _, _ = moe.route_metadata(ids_NK, None, E, tiles.block_m)
    return g, tiles, row_P, block_3Mb, pad_start_E, count_E


def _check_scattered(out, out_tri, row_P, pad_start_E, expert_ref, dtype):
    """out and out_tri [A + 1, D], NaN before the kernels ran: every assignment's row against the fp64 reference
    expert_ref(e, its padded rows) within an ulp of its expert's largest output (fp32 sums, one rounding), and the
    Triton kernel's rows within that of it; the last row, owned by no assignment, untouched."""
    assert torch.isnan(out[-1]).all(), "a row no assignment owns must be left untouched"
    starts, eps = pad_start_E.tolist(), torch.finfo(dtype).eps
    for e, n in enumerate(_SCATTER_COUNTS):
        rows = torch.arange(starts[e], starts[e] + n, device="cuda")
        if not n:
            continue
        a = row_P[rows].long()
        ref = expert_ref(e, rows)
        tol = eps * ref.abs().max().item()
        err = (out[a].double() - ref).abs().max().item()
        assert err <= tol, f"expert {e} ({n} rows): max error {err:.3g} > {tol:.3g}"
        diff = (out[a].double() - out_tri[a].double()).abs().max().item()
        assert diff <= tol, f"expert {e}: differs from the Triton kernel by {diff:.3g} > {tol:.3g}"


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("dtype,tile", [
    (torch.bfloat16, IgradTile()),  # moe.py's tile below 1024 rows per expert
    (torch.float16, IgradTile()),
    (torch.bfloat16, IgradTile(block_n=256, stages=3, split=True)),  # moe.py's tile above
    (torch.float16, IgradTile(block_n=256, stages=3, split=True)),
    (torch.bfloat16, IgradTile(convert=False)),  # stores from the accumulator registers
    (torch.bfloat16, IgradTile(expert_order=False)),  # moe.py's GROUP_M order
    (torch.bfloat16, IgradTile(half_rows=True)),  # half blocks as 64-row wgmmas
    (torch.bfloat16, IgradTile(epi_n=64)),  # two scatter pieces per tile
    (torch.bfloat16, IgradTile(stages=6)),  # a 6-deep ring
], ids=["bf16", "fp16", "bf16-split", "fp16-split", "bf16-noconvert", "bf16-groupm", "bf16-halfrows", "bf16-e64",
        "bf16-s6"])
def test_input_grad_matches_fp64_reference_and_triton(dtype, tile):
    """dx_a = dg_p @ Wg[e] + du_p @ Wu[e] scattered to a = row_P[p] over moe.py's routing metadata: odd row counts,
    half blocks, empty experts (first, middle, last), ~160 used row blocks (several tiles per program: both
    consumers and ring wrap-around run). Every assignment's row against fp64 within an ulp of its expert's largest
    output (fp32 sums, one rounding) and within that of moe.py's Triton kernel; an out row no assignment owns stays
    untouched; padding rows (NaN here) are never stored."""
    import model.kernels.moe as moe

    D, F = 256, 192
    g, tiles, row_P, block_3Mb, pad_start_E, count_E = _routed_rows(D, F, dtype, seed=6)
    E, A, BM, P = len(_SCATTER_COUNTS), sum(_SCATTER_COUNTS), tiles.block_m, row_P.numel()
    assert moe_hopper.input_grad_fits(D, F, BM, tile)
    dgu = torch.randn(2, P, F, generator=g).to("cuda", dtype)
    dgu[:, row_P < 0] = float("nan")  # padding rows and rows past the used ones: never stored
    wg, wu = ((torch.randn(E, F, D, generator=g) * 0.05).to("cuda", dtype) for _ in range(2))
    out = torch.full((A + 1, D), float("nan"), device="cuda", dtype=dtype)  # the last row: owned by no one
    moe_hopper.input_grad(dgu, wg, wu, row_P, block_3Mb, pad_start_E, count_E, out, tile)
    out_tri = torch.full_like(out, float("nan"))
    t = tiles.input_grad
    moe._launch(moe._moe_input_grad_kernel, t, block_3Mb.shape[1] * triton.cdiv(D, t.n),
                moe._tma(dgu.view(2 * P, F), [BM, t.k]), moe._tma(wg, [1, t.k, t.n]), moe._tma(wu, [1, t.k, t.n]),
                row_P, block_3Mb, out_tri, block_3Mb.shape[1], P, D, F, PRECISION=dot_precision(dtype), BLOCK_M=BM,
                BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
    _check_scattered(out, out_tri, row_P, pad_start_E,
                     lambda e, rows: dgu[0, rows].double() @ wg[e].double() + dgu[1, rows].double() @ wu[e].double(),
                     dtype)


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("dtype,F,tile", [
    (torch.bfloat16, 192, IgradTile()),  # moe.py's tile below 1024 rows per expert
    (torch.float16, 192, IgradTile()),
    (torch.bfloat16, 192, IgradTile(block_n=256, stages=3, split=True)),  # moe.py's tile above
    (torch.float16, 192, IgradTile(block_n=256, stages=3, split=True)),
    (torch.bfloat16, 200, IgradTile()),  # F not whole 64-wide steps: the last one zero-filled by TMA
    (torch.bfloat16, 200, IgradTile(block_n=256, stages=3, split=True)),
    (torch.bfloat16, 192, IgradTile(half_rows=True)),  # half blocks as 64-row wgmmas
], ids=["bf16", "fp16", "bf16-split", "fp16-split", "bf16-F200", "bf16-split-F200", "bf16-halfrows"])
def test_down_proj_matches_fp64_reference_and_triton(dtype, F, tile):
    """y_a = h_p @ Wd[e]ᵀ scattered to a = row_P[p]: the input-grad kernel with one K segment and the weight tile
    transposed, checked as the input grad is (`_check_scattered`) against fp64 and moe.py's `_moe_down_kernel`."""
    import model.kernels.moe as moe

    D = 256
    g, tiles, row_P, block_3Mb, pad_start_E, count_E = _routed_rows(D, F, dtype, seed=7)
    E, A, BM, P = len(_SCATTER_COUNTS), sum(_SCATTER_COUNTS), tiles.block_m, row_P.numel()
    assert moe_hopper.down_fits(D, F, BM, tile)
    h = torch.randn(P, F, generator=g).to("cuda", dtype)
    h[row_P < 0] = float("nan")  # padding rows and rows past the used ones: never stored
    wd = (torch.randn(E, D, F, generator=g) * 0.05).to("cuda", dtype)
    out = torch.full((A + 1, D), float("nan"), device="cuda", dtype=dtype)  # the last row: owned by no one
    moe_hopper.down_proj(h, wd, row_P, block_3Mb, pad_start_E, count_E, out, tile)
    out_tri = torch.full_like(out, float("nan"))
    t = tiles.down
    moe._launch(moe._moe_down_kernel, t, block_3Mb.shape[1] * triton.cdiv(D, t.n), h, wd, row_P, block_3Mb, out_tri,
                block_3Mb.shape[1], D, F, PRECISION=dot_precision(dtype), EVEN_K=F % t.k == 0, BLOCK_M=BM,
                BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
    _check_scattered(out, out_tri, row_P, pad_start_E, lambda e, rows: h[rows].double() @ wd[e].double().T, dtype)


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("dtype,F,tile,store_gu", [
    (torch.bfloat16, 192, GateUpTile(), True),  # moe.py's tile below 1024 rows per expert
    (torch.float16, 192, GateUpTile(), True),
    (torch.bfloat16, 200, GateUpTile(), True),  # F not whole 64-column tiles: the last columns clipped by TMA
    (torch.bfloat16, 200, GateUpTile(), False),  # the forward without backward: h alone
    (torch.bfloat16, 200, GateUpTile(stages=5, epi_bufs=2), True),  # u reuses h's epilogue buffer
    (torch.bfloat16, 200, GateUpTile(stages=4, epi_bufs=3), True),  # a buffer per output: moe.py's tile above
    (torch.bfloat16, 192, GateUpTile(expert_order=False), True),  # moe.py's GROUP_M order
], ids=["bf16", "fp16", "bf16-F200", "bf16-F200-nogu", "bf16-s5e2", "bf16-s4e3", "bf16-groupm"])
def test_gate_up_matches_fp64_reference_and_triton(dtype, F, tile, store_gu):
    """g, u = x_p Wg[e]ᵀ, x_p Wu[e]ᵀ, h = silu(g) u over moe.py's routing metadata and x_PD (top-2: x rows gathered
    by row // K, zeros on padding rows; NaN past the used rows): odd row counts, half blocks (their second half reads
    the next expert's or NaN rows, never stored), empty experts (first, middle, last), ~160 used row blocks (several
    tiles per program: both consumers and ring wrap-around run). Checked: each expert's g, u against fp64 within an
    ulp of their largest (fp32 sums, one rounding), h within two of the largest |g·u| (h is computed from the rounded
    g, u), padding rows exactly 0 (the backward relies on them), rows past every row block untouched (NaN), and h,
    gu, NaN-poisoned beforehand, identical to the bit to what moe.py's Triton kernel writes."""
    import model.kernels.moe as moe

    D, K = 256, 2
    E = len(_SCATTER_COUNTS)
    g = torch.Generator().manual_seed(8)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(_SCATTER_COUNTS)])
    ids_NK = ids[torch.randperm(ids.numel(), generator=g)].view(-1, K).cuda()
    N = ids_NK.shape[0]
    tiles = moe.default_tiles(D, F, dtype, N * K / E)
    BM, t = tiles.block_m, tiles.gate_up
    assert moe_hopper.gate_up_fits(D, F, BM, tile)
    row_P, block_3Mb, pad_start_E, count_E, _, used_rows_1 = moe.route_metadata(ids_NK, None, E, BM)
    used, P, n_mb = int(used_rows_1), row_P.numel(), block_3Mb.shape[1]
    x = torch.randn(N, D, generator=g).to("cuda", dtype)
    wg, wu = ((torch.randn(E, F, D, generator=g) * 0.05).to("cuda", dtype) for _ in range(2))
    x_PD, _ = moe._gather_rows(x, None, row_P, used_rows_1, K, BM)
    x_PD[used:] = float("nan")  # unwritten by the gather: no stored row may read them
    outs = {}
    for kernel in ("gluon", "triton"):
        h = torch.full((P, F), float("nan"), device="cuda", dtype=dtype)
        gu = torch.full((2, P, F), float("nan"), device="cuda", dtype=dtype) if store_gu else None
        if kernel == "gluon":
            moe_hopper.gate_up(x_PD, wg, wu, block_3Mb, pad_start_E, count_E, h, gu, tile)
        else:
            moe._launch(moe._moe_gate_up_kernel, t, n_mb * triton.cdiv(F, t.n), x, wg, wu, row_P, block_3Mb, h,
                        h if gu is None else gu, n_mb, P, D, F, K, STORE_GU=store_gu, PRECISION=dot_precision(dtype),
                        EVEN_K=D % t.k == 0, BLOCK_M=BM, BLOCK_N=t.n, BLOCK_K=t.k, GROUP_M=tiles.group_m)
        outs[kernel] = [h] + ([gu[0], gu[1]] if store_gu else [])
    eps = torch.finfo(dtype).eps
    starts, padded_end = pad_start_E.tolist(), pad_start_E.tolist()[1:] + [used]
    for e, n in enumerate(_SCATTER_COUNTS):
        r0 = starts[e]
        if n:
            x_e = x[row_P[r0:r0 + n].long() // K].double()
            g_ref, u_ref = x_e @ wg[e].double().T, x_e @ wu[e].double().T
            refs = [(g_ref * torch.sigmoid(g_ref) * u_ref, 2 * eps * (g_ref * u_ref).abs().max().item()),
                    (g_ref, eps * g_ref.abs().max().item()), (u_ref, eps * u_ref.abs().max().item())]
            for name, out, (ref, tol) in zip("hgu", outs["gluon"], refs):
                err = (out[r0:r0 + n].double() - ref).abs().max().item()
                assert err <= tol, f"{name}, expert {e} ({n} rows): max error {err:.3g} > {tol:.3g}"
        for name, out in zip("hgu", outs["gluon"]):
            pad = out[r0 + n:padded_end[e]]
            assert torch.equal(pad, torch.zeros_like(pad)), f"{name}, expert {e}: padding rows must be 0"
    for name, out, out_tri in zip("hgu", outs["gluon"], outs["triton"]):
        assert torch.isnan(out[used:]).all(), f"{name}: rows outside the row blocks must be left untouched"
        same_nan = torch.equal(torch.isnan(out), torch.isnan(out_tri))
        diff = (out.double() - out_tri.double()).nan_to_num(0.0).abs().max().item()
        assert same_nan and diff == 0, (f"{name} differs from the Triton kernel: NaN pattern equal {same_nan}, "
                                        f"max diff {diff:.3g}")
