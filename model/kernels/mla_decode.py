"""MLA decode attention over the latent cache with absorbed weights, split over the context (Triton).

Shape legend: B sequences, H heads, C kv_lora_rank, R qk_rope_head_dim, S cache length,
P context splits.

One new token per sequence; W_UK is already folded into the query (q_lat = q_nope·W_UK, [B, H, C]) and
W_UV is applied by the caller to the latent output, so this is MQA with one shared (C+R)-wide key:
    score_{b,h,s} = (q_lat_{b,h}·c_kv_{b,s} + q_pe_{b,h}·k_pe_{b,s}) · softmax_scale,  s ∈ [start_b, end_b)
    out_lat_{b,h} = Σ_s softmax_s(score) · c_kv_{b,s}                               [B, H, C]
[start_b, end_b) is each sequence's key range: a left-padded batch starts later, a shorter one
ends earlier (ragged). Keys outside it are never read; an optional [B, S] key mask drops keys inside
it (any boolean decode mask works, no host sync). A sequence with no key gives nan, as the
reference's softmax over all −inf does.

Fused (`_mla_decode_kernel`): per (sequence, split) program, all H heads share every latent tile
read (the cache is read once per split, not once per head), QKᵀ for the latent and rope parts,
online softmax in fp32, and P·c_kv — scores never leave registers. Split-K over the context
(flash-decoding): each program covers 1/P of its sequence's own range [start_b, end_b), and P is the
fewest splits that fill the GPU's multiprocessors (≥ 90% of the last wave), since every split adds
partial-output traffic; whole tiles load without predicates, only the last one is masked.
The P partial (max, sum, unnormalised output) per head are merged in the same launch: each split
stores its partial and bumps its sequence's arrival counter, and the split that arrives last merges
all P (flash-decoding's combine without a second kernel launch, whose host-side launch cost exceeded
the combine's own device time). Inference only (no autograd). Reference: `MultiHeadLatentAttention._absorb` in model/attention.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._util import check_inputs, dot_precision, interpreting, next_pow2

_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _mla_decode_tile(s0, hi, key_mask_row, c_base, pe_base, sc_s, sk_s, q_lat_HC, q_pe_HR, scale, m_H, l_H, acc_HC,
                     C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_S: tl.constexpr, TAIL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One BLOCK_S-key step of the online softmax. Full tiles (not TAIL, no mask) load without predicates."""
    s_S = s0 + tl.arange(0, BLOCK_S)
    c_C = tl.arange(0, BLOCK_C)
    r_R = tl.arange(0, BLOCK_R)
    c_ptrs_SC = c_base + s_S[:, None].to(tl.int64) * sc_s + c_C[None, :]
    pe_ptrs_SR = pe_base + s_S[:, None].to(tl.int64) * sk_s + r_R[None, :]
    if TAIL or HAS_MASK:
        s_ok_S = s_S < hi
        if HAS_MASK:  # holes inside the range (rare: e.g. a padded token in mid-sequence)
            s_ok_S = s_ok_S & (tl.load(key_mask_row + s_S, mask=s_ok_S, other=0) != 0)
        c_SC = tl.load(c_ptrs_SC, mask=s_ok_S[:, None] & (c_C[None, :] < C), other=0.0)
        pe_SR = tl.load(pe_ptrs_SR, mask=s_ok_S[:, None] & (r_R[None, :] < R), other=0.0)
    else:
        if BLOCK_C == C:
            c_SC = tl.load(c_ptrs_SC)
        else:
            c_SC = tl.load(c_ptrs_SC, mask=c_C[None, :] < C, other=0.0)
        if BLOCK_R == R:
            pe_SR = tl.load(pe_ptrs_SR)
        else:
            pe_SR = tl.load(pe_ptrs_SR, mask=r_R[None, :] < R, other=0.0)
    scores_HS = tl.dot(q_lat_HC, tl.trans(c_SC), input_precision=PRECISION)
    scores_HS = tl.dot(q_pe_HR, tl.trans(pe_SR), scores_HS, input_precision=PRECISION) * scale
    if TAIL or HAS_MASK:
        scores_HS = tl.where(s_ok_S[None, :], scores_HS, float("-inf"))
    m_new_H = tl.maximum(m_H, tl.max(scores_HS, axis=1))
    alpha_H = tl.exp(m_H - m_new_H)
    p_HS = tl.exp(scores_HS - m_new_H[:, None])
    l_H = l_H * alpha_H + tl.sum(p_HS, axis=1)
    acc_HC = acc_HC * alpha_H[:, None] + tl.dot(p_HS.to(c_SC.dtype), c_SC, input_precision=PRECISION)
    return m_new_H, l_H, acc_HC


@triton.jit
def _mla_decode_kernel(q_lat_ptr, q_pe_ptr, c_kv_ptr, k_pe_ptr, start_ptr, end_ptr, key_mask_ptr, part_ptr,
                       arrivals_ptr, out_ptr, H, scale, sq_b, sq_h, sp_b, sp_h, sc_b, sc_s, sk_b, sk_s, sm_b,
                       so_b, so_h, C: tl.constexpr, R: tl.constexpr, SPLIT: tl.constexpr,
                       HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    h_H = tl.arange(0, BLOCK_H)
    c_C = tl.arange(0, BLOCK_C)
    r_R = tl.arange(0, BLOCK_R)
    q_lat_HC = tl.load(q_lat_ptr + b * sq_b + h_H[:, None] * sq_h + c_C[None, :],
                       mask=(h_H[:, None] < H) & (c_C[None, :] < C), other=0.0)
    q_pe_HR = tl.load(q_pe_ptr + b * sp_b + h_H[:, None] * sp_h + r_R[None, :],
                      mask=(h_H[:, None] < H) & (r_R[None, :] < R), other=0.0)
    # This sequence's own range cut into n_splits equal BLOCK_S-aligned parts (left padding and ragged
    # ends shorten every split of that row alike, instead of emptying the first or last ones).
    start = tl.load(start_ptr + b)
    end = tl.load(end_ptr + b)
    per_split = tl.cdiv(tl.cdiv(tl.maximum(end - start, 0), n_splits), BLOCK_S) * BLOCK_S
    lo = start + split * per_split
    hi = tl.minimum(end, lo + per_split)
    c_base = c_kv_ptr + b * sc_b
    pe_base = k_pe_ptr + b * sk_b
    key_mask_row = key_mask_ptr + b * sm_b
    m_H = tl.full([BLOCK_H], _NEG_BIG, dtype=tl.float32)
    l_H = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_HC = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    n_full = tl.maximum(hi - lo, 0) // BLOCK_S
    for i in range(n_full):
        m_H, l_H, acc_HC = _mla_decode_tile(lo + i * BLOCK_S, hi, key_mask_row, c_base, pe_base, sc_s, sk_s,
                                            q_lat_HC, q_pe_HR, scale, m_H, l_H, acc_HC, C, R, BLOCK_C, BLOCK_R,
                                            BLOCK_S, False, HAS_MASK, PRECISION)
    if lo + n_full * BLOCK_S < hi:
        m_H, l_H, acc_HC = _mla_decode_tile(lo + n_full * BLOCK_S, hi, key_mask_row, c_base, pe_base, sc_s, sk_s,
                                            q_lat_HC, q_pe_HR, scale, m_H, l_H, acc_HC, C, R, BLOCK_C, BLOCK_R,
                                            BLOCK_S, True, HAS_MASK, PRECISION)
    out_ptrs_HC = out_ptr + b * so_b + h_H[:, None] * so_h + c_C[None, :]
    out_ok_HC = (h_H[:, None] < H) & (c_C[None, :] < C)
    if SPLIT:
        # Partials: [B, P, BLOCK_H, BLOCK_C] unnormalised outputs, then [B, P, BLOCK_H, 2] (max, sum).
        ml_ptr = part_ptr + tl.num_programs(0).to(tl.int64) * n_splits * BLOCK_H * BLOCK_C
        part = (b * n_splits + split) * BLOCK_H
        tl.store(part_ptr + (part + h_H[:, None]) * BLOCK_C + c_C[None, :], acc_HC)
        tl.store(ml_ptr + (part + h_H) * 2, m_H)
        tl.store(ml_ptr + (part + h_H) * 2 + 1, l_H)
        # Every thread's stores happen before the arrival (barrier); the release/acquire atomic makes
        # them visible to the sequence's last-arriving split, which merges all P partials (re-read from
        # L2 with .cg, its own included) and resets the counter to 0 for the next call.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + b, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            tl.debug_barrier()  # every thread's partial loads below come after the acquire
            m_H = tl.full([BLOCK_H], _NEG_BIG, dtype=tl.float32)
            for s in range(n_splits):
                part = (b * n_splits + s) * BLOCK_H
                m_H = tl.maximum(m_H, tl.load(ml_ptr + (part + h_H) * 2, cache_modifier=".cg"))
            l_H = tl.zeros([BLOCK_H], dtype=tl.float32)
            acc_HC = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
            for s in range(n_splits):
                part = (b * n_splits + s) * BLOCK_H
                w_H = tl.exp(tl.load(ml_ptr + (part + h_H) * 2, cache_modifier=".cg") - m_H)
                l_H += w_H * tl.load(ml_ptr + (part + h_H) * 2 + 1, cache_modifier=".cg")
                acc_HC += w_H[:, None] * tl.load(part_ptr + (part + h_H[:, None]) * BLOCK_C + c_C[None, :],
                                                 cache_modifier=".cg")
            out_HC = acc_HC / l_H[:, None]  # 0/0 = nan for an empty key range, as in the reference
            tl.store(out_ptrs_HC, out_HC.to(out_ptr.dtype.element_ty), mask=out_ok_HC)
            tl.store(arrivals_ptr + b, 0)
    else:
        out_HC = acc_HC / l_H[:, None]
        tl.store(out_ptrs_HC, out_HC.to(out_ptr.dtype.element_ty), mask=out_ok_HC)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(B: int, S: int, block_s: int, device: torch.device) -> int:
    """Fewest context splits that give at least one full wave of programs with ≥ 90% of the last wave
    busy (a partial last wave idles SMs for a whole program's time; more splits cost combine traffic)."""
    if interpreting():
        return 2
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    max_splits = max(1, triton.cdiv(max(S, 1), block_s))
    for splits in range(1, min(max_splits, 4 * sms) + 1):
        programs = B * splits
        if programs / (triton.cdiv(programs, sms) * sms) >= 0.9:
            return splits
    return min(max_splits, triton.cdiv(sms, max(B, 1)))


class _LaunchPlan(NamedTuple):
    block_h: int
    block_c: int
    block_r: int
    block_s: int
    num_splits: int
    num_warps: int
    num_stages: int
    precision: str


@functools.cache
def _launch_plan(B: int, H: int, C: int, R: int, S: int, dtype: torch.dtype, device: torch.device,
                 interpret: bool, num_splits: int | None, block_s: int | None, num_warps: int | None,
                 num_stages: int | None) -> _LaunchPlan:
    """Tile sizes and split count for one problem shape, computed once per shape (host time per decode
    step is on the critical path: at B=64, S=4096 the whole kernel takes ~0.11 ms on an H100)."""
    sixteen_bit = dtype != torch.float32
    if block_s is None:  # 64 keys x (C+R) x 2 B x 3 stages fits shared memory in 16-bit; fp32 takes 32 x 2
        block_s = 64 if (interpret or sixteen_bit) else 32
    if num_warps is None:
        num_warps = 4 if interpret else 8
    if num_stages is None:
        num_stages = 3 if sixteen_bit else 2
    if num_splits is None:
        num_splits = _default_splits(B, S, block_s, device)
    num_splits = max(1, min(num_splits, triton.cdiv(max(S, 1), block_s)))
    return _LaunchPlan(max(16, next_pow2(H)), next_pow2(C), max(16, next_pow2(R)), block_s, num_splits, num_warps,
                       num_stages, dot_precision(dtype))


# Per-(device, stream) int32 arrival counters of the split programs. The kernel leaves every counter it
# uses at 0 again (the last split of a sequence resets it), so a call needs no memset launch; calls on
# one stream run one after the other, so they can share the buffer. Not a cache of results: only the
# all-zero counters persist between calls.
_ARRIVALS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _arrival_counters(B: int, device: torch.device) -> torch.Tensor:
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        # CPU interpreter, or a CUDA graph being captured: the graph's memory pool must own the buffer
        # (the captured memset replays with it), not a cache that may later replace it.
        return torch.zeros(B, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    counters = _ARRIVALS.get(key)
    if counters is None or counters.numel() < B:
        counters = _ARRIVALS[key] = torch.zeros(max(B, 256), dtype=torch.int32, device=device)
    return counters


# Compiled kernels by specialisation, for `_launch`.
_COMPILED: dict[tuple, object] = {}


def _launch(grid, tensors, ints, scale: float, constexprs, plan: _LaunchPlan, device: torch.device) -> None:
    """Launch `_mla_decode_kernel`. The first launch of a specialisation goes through Triton's JIT
    (compile, or its cache), which returns the compiled kernel; later launches call that kernel
    directly, skipping `JITFunction.run`'s per-call argument binding and cache lookup (host time of a
    whole `mla_decode` call on the H100 machine: 133 µs through the JIT, 83 µs direct; the kernel
    itself takes ~110 µs at B=64, S=4096, so the JIT path left the GPU waiting in a decode loop).
    The key holds everything Triton specialises a launch on: each tensor's 16-byte alignment (dtypes
    follow from the input dtype and the constexprs), each int's ==1 / %16 / 32-bit range, the
    constexprs and the launch options."""
    args = (*tensors[:10], *ints[:1], scale, *ints[1:], *constexprs)
    if interpreting():
        _mla_decode_kernel[grid](*args, num_warps=plan.num_warps, num_stages=plan.num_stages)
        return
    key = (device, tensors[2].dtype, constexprs, plan.num_warps, plan.num_stages,
           tuple(t.data_ptr() % 16 == 0 for t in tensors),
           tuple((i == 1, i % 16 == 0, -2 ** 31 <= i < 2 ** 31) for i in ints))
    kernel = _COMPILED.get(key)
    if kernel is None:
        kernel = _mla_decode_kernel[grid](*args, num_warps=plan.num_warps, num_stages=plan.num_stages)
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        _COMPILED[key] = kernel
    else:
        kernel[grid](*args, stream=torch.cuda.current_stream().cuda_stream)  # the JIT's choice too


def mla_decode(q_lat_BHC: torch.Tensor, q_pe_BHR: torch.Tensor, c_kv_BSC: torch.Tensor, k_pe_BSR: torch.Tensor,
               start_B: torch.Tensor, end_B: torch.Tensor, softmax_scale: float,
               key_mask_BS: torch.Tensor | None = None, num_splits: int | None = None, *,
               block_s: int | None = None, num_warps: int | None = None, num_stages: int | None = None
               ) -> torch.Tensor:
    """Latent attention output [B, H, C] (dtype of c_kv) of one query token per sequence.

    c_kv / k_pe may be strided views into one [B, S, C+R] cache (last dim contiguous).
    start_B / end_B: int tensors, the key range [start_b, end_b) of each sequence (only it is read).
    key_mask_BS: optional bool/int8 [B, S], keys inside the range that are nevertheless masked out.
    num_splits / block_s / num_warps / num_stages: launch shape (defaults: tuned on an H100 at V2-Lite
    shapes, see benchmarks/README.md); results do not depend on them beyond rounding.
    One kernel launch; every check here is host-side metadata (no device sync).
    """
    check_inputs("mla_decode", q_lat_BHC, q_pe_BHR, c_kv_BSC, k_pe_BSR)
    B, H, C = q_lat_BHC.shape
    _, S, R = k_pe_BSR.shape
    if q_pe_BHR.shape != (B, H, R) or c_kv_BSC.shape != (B, S, C) or start_B.shape != (B,) or end_B.shape != (B,):
        raise ValueError(f"mla_decode: shapes q_lat {tuple(q_lat_BHC.shape)}, q_pe {tuple(q_pe_BHR.shape)}, "
                         f"c_kv {tuple(c_kv_BSC.shape)}, k_pe {tuple(k_pe_BSR.shape)}, ranges {tuple(start_B.shape)}")
    dtype = c_kv_BSC.dtype
    if q_lat_BHC.dtype != dtype or q_pe_BHR.dtype != dtype or k_pe_BSR.dtype != dtype:
        raise TypeError("mla_decode: query and cache must share a dtype")
    if key_mask_BS is not None and key_mask_BS.shape != (B, S):
        raise ValueError(f"mla_decode: key mask {tuple(key_mask_BS.shape)}, expected {(B, S)}")
    device = c_kv_BSC.device
    out_BHC = torch.empty(B, H, C, dtype=dtype, device=device)
    if B == 0:
        return out_BHC
    if q_lat_BHC.stride(-1) != 1:
        q_lat_BHC = q_lat_BHC.contiguous()
    if q_pe_BHR.stride(-1) != 1:
        q_pe_BHR = q_pe_BHR.contiguous()
    if c_kv_BSC.stride(-1) != 1:
        c_kv_BSC = c_kv_BSC.contiguous()
    if k_pe_BSR.stride(-1) != 1:
        k_pe_BSR = k_pe_BSR.contiguous()
    plan = _launch_plan(B, H, C, R, S, dtype, device, interpreting(), num_splits, block_s, num_warps, num_stages)
    split = plan.num_splits > 1
    if split:  # partial outputs [B, P, BLOCK_H, BLOCK_C] followed by (max, sum) [B, P, BLOCK_H, 2], fp32
        partials = torch.empty(B * plan.num_splits * plan.block_h * (plan.block_c + 2), dtype=torch.float32,
                               device=device)
        arrivals = _arrival_counters(B, device)
    else:
        partials = arrivals = out_BHC  # unused
    if start_B.dtype != torch.int32 or not start_B.is_contiguous():
        start_B = start_B.to(torch.int32).contiguous()
    if end_B.dtype != torch.int32 or not end_B.is_contiguous():
        end_B = end_B.to(torch.int32).contiguous()
    if key_mask_BS is not None:
        key_mask_BS = key_mask_BS.to(torch.int8).contiguous()
    tensors = (q_lat_BHC, q_pe_BHR, c_kv_BSC, k_pe_BSR, start_B, end_B,
               key_mask_BS if key_mask_BS is not None else start_B, partials, arrivals, out_BHC)
    ints = (H, q_lat_BHC.stride(0), q_lat_BHC.stride(1), q_pe_BHR.stride(0), q_pe_BHR.stride(1),
            c_kv_BSC.stride(0), c_kv_BSC.stride(1), k_pe_BSR.stride(0), k_pe_BSR.stride(1),
            key_mask_BS.stride(0) if key_mask_BS is not None else 0, out_BHC.stride(0), out_BHC.stride(1))
    constexprs = (C, R, split, key_mask_BS is not None, plan.precision, plan.block_h, plan.block_c, plan.block_r,
                  plan.block_s)
    _launch((B, plan.num_splits, 1), tensors, ints, float(softmax_scale), constexprs, plan, device)
    return out_BHC


def decode_key_ranges(mask_B1TS: torch.Tensor | None, B: int, S: int, device):
    """(start_B, end_B, key_mask_BS or None) for a one-query boolean mask, without a host sync.

    [start, end) spans the first to the last True key of each row (left padding moves start, a shorter
    sequence moves end); the mask itself is passed on only when some row has a hole inside its range,
    which `mla_decode` then also honours — checking that would need a host sync, so the mask is always
    passed when given (reading B·S bytes against B·S·(C+R)·2 of cache is free)."""
    if mask_B1TS is None:
        return (torch.zeros(B, dtype=torch.int32, device=device), torch.full((B,), S, dtype=torch.int32, device=device),
                None)
    valid_BS = mask_B1TS[:, 0, -1, :].expand(B, S).to(torch.int8)
    start_B = valid_BS.argmax(1)
    end_B = S - valid_BS.flip(1).argmax(1)
    end_B = torch.where(valid_BS.amax(1) > 0, end_B, start_B)  # no key at all: an empty range (nan)
    return start_B.to(torch.int32), end_B.to(torch.int32), valid_BS
