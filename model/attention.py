"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Shape legend: B batch, T query tokens, S key tokens (cache + new), D hidden, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, Q q_lora_rank.

  c_kv = RMSNorm(W_DKV·h)            [B, T, C]   (kv_a_proj_with_mqa, first C outputs)
  k_pe = RoPE(W_KR·h)                [B, T, R]   (its last R outputs; ONE rope key for all heads)
  k_nope, v = W_UK·c_kv, W_UV·c_kv   [B, H, S, N], [B, H, S, V]   (kv_b_proj holds [W_UK; W_UV] per head)
  q = W_UQ·RMSNorm(W_DQ·h) or W_Q·h  split into q_nope [B, H, T, N] and q_pe (RoPE'd) [B, H, T, R]
  scores = (q_nope·k_nope + q_pe·k_pe) · softmax_scale

Only [c_kv ; k_pe] (C + R values per token and layer) is cached. Two paths over it:
  * naive: expand K and V per head from the latent and run SDPA (training / prefill);
  * absorb: fold W_UK into the query (q_lat = q_nope·W_UK, [B, H, T, C]) and W_UV into the output, so
    attention runs as MQA over the C+R-wide latent (decode). Both give the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekV2Config
from .norm import RMSNorm
from .rope import rope_function


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.softmax_scale = config.softmax_scale
        hidden, heads, bias = config.hidden_size, self.num_heads, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps, kernels=config.kernels)
            self.q_b_proj = nn.Linear(config.q_lora_rank, heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps, kernels=config.kernels)
        self.kv_b_proj = nn.Linear(self.kv_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)
        self.apply_rope = rope_function(config.kernels)  # reference or Triton kernel, same formula

    # ------------------------------------------------------------------ pieces
    def project_query(self, h_BTD: torch.Tensor, cos_BTR2, sin_BTR2) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = h_BTD.shape
        if self.config.q_lora_rank is None:
            q = self.q_proj(h_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h_BTD)))
        q_BHTK = q.view(B, T, self.num_heads, self.qk_dim).transpose(1, 2)
        q_nope_BHTN, q_pe_BHTR = q_BHTK.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope_BHTN, self.apply_rope(q_pe_BHTR, cos_BTR2, sin_BTR2)

    def project_latent(self, h_BTD: torch.Tensor, cos_BTR2, sin_BTR2) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached part: (c_kv [B, T, C] normalised, k_pe [B, T, R] rotated)."""
        c_kv_BTC, k_pe_BTR = self.kv_a_proj_with_mqa(h_BTD).split([self.kv_rank, self.rope_dim], dim=-1)
        k_pe_BTR = self.apply_rope(k_pe_BTR[:, None], cos_BTR2, sin_BTR2)[:, 0]
        return self.kv_a_layernorm(c_kv_BTC), k_pe_BTR

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, N, C], W_UV [H, V, C]) views of kv_b_proj."""
        w_HKC = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w_HKC[:, : self.nope_dim], w_HKC[:, self.nope_dim :]

    # ------------------------------------------------------------------ forward
    def forward(self, h_BTD: torch.Tensor, cos_BTR2: torch.Tensor, sin_BTR2: torch.Tensor,
                mask_B1TS: torch.Tensor | None, cache=None) -> torch.Tensor:
        """mask_B1TS: boolean (True = attend) or None for plain causal attention with S == T.

        `cache`: any object with `update(c_kv [B,1,T,C], k_pe [B,1,T,R], layer_idx)` returning the full
        latent ([B,1,S,C], [B,1,S,R]) — our `LatentCache` or a transformers `DynamicCache`.
        """
        B, T, _ = h_BTD.shape
        q_nope_BHTN, q_pe_BHTR = self.project_query(h_BTD, cos_BTR2, sin_BTR2)
        c_kv_BTC, k_pe_BTR = self.project_latent(h_BTD, cos_BTR2, sin_BTR2)
        had_past = cache is not None and cache.get_seq_length(self.layer_idx) > 0
        if cache is not None:
            c_kv_B1SC, k_pe_B1SR = cache.update(c_kv_BTC[:, None], k_pe_BTR[:, None], self.layer_idx)
            c_kv_BSC, k_pe_BSR = c_kv_B1SC[:, 0], k_pe_B1SR[:, 0]
        else:
            c_kv_BSC, k_pe_BSR = c_kv_BTC, k_pe_BTR
        impl = self.config.mla_impl
        if impl == "auto":
            impl = "absorb" if had_past else "naive"
        if impl == "naive":
            out_BHTV = self._naive(q_nope_BHTN, q_pe_BHTR, c_kv_BSC, k_pe_BSR, mask_B1TS)
        else:
            out_BHTV = self._absorb(q_nope_BHTN, q_pe_BHTR, c_kv_BSC, k_pe_BSR, mask_B1TS)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def _naive(self, q_nope_BHTN, q_pe_BHTR, c_kv_BSC, k_pe_BSR, mask_B1TS) -> torch.Tensor:
        B, S, _ = c_kv_BSC.shape
        kv_BHSK = self.kv_b_proj(c_kv_BSC).view(B, S, self.num_heads, -1).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv_BHSK.split([self.nope_dim, self.v_dim], dim=-1)
        k_BHSK = torch.cat([k_nope_BHSN, k_pe_BSR[:, None].expand(-1, self.num_heads, -1, -1)], dim=-1)
        q_BHTK = torch.cat([q_nope_BHTN, q_pe_BHTR], dim=-1)
        return F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSV, attn_mask=mask_B1TS,
                                              is_causal=mask_B1TS is None, scale=self.softmax_scale)

    def _absorb(self, q_nope_BHTN, q_pe_BHTR, c_kv_BSC, k_pe_BSR, mask_B1TS) -> torch.Tensor:
        w_uk_HNC, w_uv_HVC = self.absorbed_weights()
        if self.config.kernels == "triton" and q_nope_BHTN.shape[2] == 1 and not torch.is_grad_enabled():
            return self._absorb_decode_kernel(q_nope_BHTN, q_pe_BHTR, c_kv_BSC, k_pe_BSR, mask_B1TS)
        q_lat_BHTC = torch.einsum("bhtn,hnc->bhtc", q_nope_BHTN, w_uk_HNC)
        scores_BHTS = (torch.einsum("bhtc,bsc->bhts", q_lat_BHTC, c_kv_BSC)
                       + torch.einsum("bhtr,bsr->bhts", q_pe_BHTR, k_pe_BSR)).float() * self.softmax_scale
        if mask_B1TS is None:
            T, S = scores_BHTS.shape[-2:]
            mask_B1TS = torch.ones(T, S, dtype=torch.bool, device=scores_BHTS.device).tril(S - T)
        scores_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf"))
        probs_BHTS = scores_BHTS.softmax(-1).to(c_kv_BSC.dtype)
        out_lat_BHTC = torch.einsum("bhts,bsc->bhtc", probs_BHTS, c_kv_BSC)
        return torch.einsum("bhtc,hvc->bhtv", out_lat_BHTC, w_uv_HVC)

    def _absorb_decode_kernel(self, q_nope_BHTN, q_pe_BHTR, c_kv_BSC, k_pe_BSR, mask_B1TS) -> torch.Tensor:
        """One decode token per sequence through model.kernels.mla_decode: per-row key range
        [first, last attended key] from the mask (left padding, ragged lengths), no host sync."""
        from .kernels.mla_decode import decode_key_ranges, mla_decode

        B, S = c_kv_BSC.shape[:2]
        start_B, end_B, key_mask_BS = decode_key_ranges(mask_B1TS, B, S, c_kv_BSC.device)
        w_uk_HNC, w_uv_HVC = self.absorbed_weights()
        q_lat_BHC = torch.einsum("bhn,hnc->bhc", q_nope_BHTN[:, :, 0], w_uk_HNC)
        out_lat_BHC = mla_decode(q_lat_BHC, q_pe_BHTR[:, :, 0], c_kv_BSC, k_pe_BSR, start_B, end_B,
                                 self.softmax_scale, key_mask_BS)
        return torch.einsum("bhc,hvc->bhv", out_lat_BHC, w_uv_HVC)[:, :, None]
