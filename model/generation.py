"""Batched sampling on the latent KV cache (our own engine; `rollout`'s native backend wraps it).

Shape legend: B active sequences, P padded prompt length, S cached positions, V vocab, Lm MoE layers,
K experts per token.

Prompts are left-padded; the prefill writes [c_kv ; k_pe] for every prompt token into a preallocated
`LatentCache`, then each step feeds one token per sequence and attends over the latent with absorbed
weights. Finished sequences leave the batch (their cache rows are dropped).

Logprobs reported per sampled token (`SamplingConfig.logprobs_mode`):
- `scaled` (default): log-softmax(logits / temperature) over the whole vocabulary, before top-k /
  top-p truncation — what a trainer recomputes;
- `processed`: log-softmax over the distribution actually sampled from, after temperature and
  top-k / top-p (truncated tokens get −inf, the rest renormalise) — vLLM's `processed_logprobs`, so
  that our engine and vLLM report the same numbers. Without top-k / top-p the two are equal.
With temperature 0 (greedy) both are the raw log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .cache import LatentCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    """Tokens to generate at most per sequence (finish reason `length` when reached)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a sequence (kept in the output; finish reason `stop`)."""
    seed: int | None = None
    """Seed of the sampling generator (None = torch's global RNG)."""
    logprobs_mode: Literal["scaled", "processed"] = "scaled"
    """Which log-softmax the reported logprobs are (module docstring): before or after top-k/top-p."""


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    """`stop` (a stop token was sampled) or `length` (max_new_tokens reached)."""
    routed_experts: torch.Tensor | None = field(default=None, repr=False)
    """[prompt + completion − 1, Lm, K] expert ids per fed token (the last sampled token is never fed)."""


def filter_logits(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (−inf) tokens outside top-k and outside the top-p nucleus."""
    if top_k and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_sorted_BV = cum_BV - sorted_BV.softmax(-1) >= top_p  # mass before this token already ≥ p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """(token ids [B], their logprobs [B]) under the module docstring's convention."""
    logits_BV = logits_BV.float()
    if cfg.temperature == 0:
        tokens_B = logits_BV.argmax(-1)
        return tokens_B, logits_BV.log_softmax(-1).gather(1, tokens_B[:, None])[:, 0]
    scaled_BV = logits_BV / cfg.temperature
    filtered_BV = filter_logits(scaled_BV, cfg.top_k, cfg.top_p)
    tokens_B = torch.multinomial(filtered_BV.softmax(-1), 1, generator=generator)[:, 0]
    reported_BV = filtered_BV if cfg.logprobs_mode == "processed" else scaled_BV
    return tokens_B, reported_BV.log_softmax(-1).gather(1, tokens_B[:, None])[:, 0]


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: SamplingConfig,
             return_routing: bool = False) -> list[Generation]:
    """Sample one completion per prompt (repeat a prompt G times for a group)."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    limit = cfg.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + sampling.max_new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                         f"model's max_position_embeddings {limit}")
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    B, P = len(prompts), longest
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    input_BP = torch.full((B, P), pad, dtype=torch.long, device=device)
    mask_BS = torch.zeros(B, P + sampling.max_new_tokens, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        input_BP[b, P - len(p):] = torch.tensor(p, device=device)
        mask_BS[b, P - len(p):P] = 1
    cache = LatentCache(cfg, B, P + sampling.max_new_tokens, dtype, device)
    stop = torch.tensor(list(sampling.stop_token_ids) or [-1], device=device)

    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    routing: list[list[torch.Tensor]] = [[] for _ in range(B)]
    finish = ["length"] * B
    active_A = torch.arange(B, device=device)  # original row of each active sequence
    step_input = input_BP
    for step in range(sampling.max_new_tokens):
        S = cache.get_seq_length() + step_input.shape[1]
        out = model(input_ids=step_input, attention_mask=mask_BS[:, :S], past_key_values=cache,
                    logits_to_keep=1, output_routing=return_routing)
        next_A, logp_A = sample_next(out.logits[:, -1], sampling, generator)
        if return_routing and out.routed_experts is not None:
            routed_ATLK = out.routed_experts.permute(1, 2, 0, 3).cpu()  # [A, T, Lm, K]
            for a, row in enumerate(active_A.tolist()):
                routing[row].append(routed_ATLK[a, -len(prompts[row]) if step == 0 else -1:])
        done_A = torch.isin(next_A, stop)
        for a, row in enumerate(active_A.tolist()):
            tokens[row].append(int(next_A[a]))
            logprobs[row].append(float(logp_A[a]))
            if done_A[a]:
                finish[row] = "stop"
        mask_BS[:, S] = 1
        keep_A = ~done_A
        if not bool(keep_A.any()):
            break
        if not bool(keep_A.all()):
            cache.select(keep_A.nonzero()[:, 0])
            active_A, next_A, mask_BS = active_A[keep_A], next_A[keep_A], mask_BS[keep_A]
        step_input = next_A[:, None]
    model.train(was_training)
    return [Generation(prompt_ids=list(prompts[b]), token_ids=tokens[b], logprobs=logprobs[b],
                       finish_reason=finish[b],
                       routed_experts=torch.cat(routing[b]) if return_routing and routing[b] else None)
            for b in range(B)]
