"""The latent KV cache: per token and layer only [c_kv ; k_pe] (kv_lora_rank + qk_rope_head_dim values).

Shape legend: L layers, B batch, S cached positions, W = C + R latent width.

Preallocated to a maximum length so decode steps write in place. It speaks the small part of
transformers' `Cache` protocol our attention uses (`update`, `get_seq_length`), so the attention
module treats it and a transformers `DynamicCache` alike.
"""

from __future__ import annotations

import torch

from .config import DeepseekV2Config


class LatentCache:
    def __init__(self, config: DeepseekV2Config, batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv_rank = config.kv_lora_rank
        width = config.latent_cache_width()
        self.latent_LBSW = torch.zeros(config.num_hidden_layers, batch_size, max_length, width,
                                       dtype=dtype, device=device)
        self.lengths_L = [0] * config.num_hidden_layers
        self.max_length = max_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths_L[layer_idx]

    def update(self, c_kv_B1TC: torch.Tensor, k_pe_B1TR: torch.Tensor, layer_idx: int):
        start = self.lengths_L[layer_idx]
        end = start + c_kv_B1TC.shape[2]
        if end > self.max_length:
            raise ValueError(f"LatentCache holds {self.max_length} positions; writing up to {end}")
        latent_BSW = self.latent_LBSW[layer_idx]
        latent_BSW[:, start:end, : self.kv_rank] = c_kv_B1TC[:, 0]
        latent_BSW[:, start:end, self.kv_rank :] = k_pe_B1TR[:, 0]
        self.lengths_L[layer_idx] = end
        filled_BSW = latent_BSW[:, :end]
        return filled_BSW[None, ..., : self.kv_rank].transpose(0, 1), filled_BSW[None, ..., self.kv_rank :].transpose(0, 1)

    def select(self, batch_idx: torch.Tensor) -> None:
        """Keep only the given rows (e.g. drop finished sequences)."""
        self.latent_LBSW = self.latent_LBSW[:, batch_idx]

    def bytes_per_token(self) -> int:
        L, _, _, W = self.latent_LBSW.shape
        return L * W * self.latent_LBSW.element_size()


def kv_cache_bytes_per_token(config: DeepseekV2Config, bytes_per_element: int = 2) -> dict[str, int]:
    """Cache bytes per token (all layers): MLA's latent vs an MHA cache with the same heads."""
    mla = config.num_hidden_layers * config.latent_cache_width() * bytes_per_element
    mha = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * bytes_per_element
    return {"mla": mla, "mha": mha}
