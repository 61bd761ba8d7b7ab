"""Helpers shared by the rollout test modules (no tests here): a tiny checkpoint with a tokenizer, an
independent logprob recomputation, and parameter perturbation."""

from __future__ import annotations

from pathlib import Path

import torch

from model import DeepseekV2Config, DeepseekV2ForCausalLM

TEXTS = [f"The sum of {a} and {b} is {a + b}. What is {a} times {b}? It is {a * b}." for a in range(12) for b in range(9)]


def make_checkpoint(path: Path, seed: int = 0, with_tokenizer: bool = True) -> DeepseekV2ForCausalLM:
    """The vLLM-runnable tiny preset (fp32), saved to `path` with a tokenizer beside it."""
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny", initializer_range=0.1)).float().eval()
    model.save_pretrained(path)
    if with_tokenizer:
        from alignment.tokenizer import build_tokenizer

        build_tokenizer(TEXTS, path, vocab_size=400)
    return model


def recompute_logprobs(model, prompt_ids: list[int], token_ids: list[int], temperature: float = 1.0,
                       top_k: int = 0) -> torch.Tensor:
    """log-softmax(logits / T) of each sampled token from one teacher-forced forward pass; with top_k,
    over the k most likely tokens only (the distribution sampled from). Written independently of
    model.generation."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits_TV = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].double()
    if temperature > 0:
        logits_TV = logits_TV / temperature
    if top_k:
        kth_T1 = logits_TV.topk(top_k, dim=-1).values[:, -1:]
        logits_TV = torch.where(logits_TV >= kth_T1, logits_TV, torch.tensor(float("-inf"), dtype=logits_TV.dtype))
    return logits_TV.log_softmax(-1).gather(1, torch.tensor(token_ids)[:, None])[:, 0]


def max_logprob_error(model, groups, temperature: float = 1.0, top_k: int = 0) -> float:
    worst = 0.0
    for group in groups:
        for c in group.completions:
            ref = recompute_logprobs(model, group.prompt_ids, c.token_ids, temperature, top_k)
            worst = max(worst, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
    return worst


def perturb_(model, seed: int, scale: float = 0.05) -> None:
    """Add noise to every parameter in place (a stand-in for an optimizer step)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def assert_well_formed(groups, n_prompts: int, group_size: int, max_new_tokens: int, stop_ids) -> None:
    """Shape, and finish reasons consistent with the tokens: `stop` iff it ends on the first stop token."""
    assert len(groups) == n_prompts
    for group in groups:
        assert len(group.completions) == group_size
        for c in group.completions:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            assert len(c.token_ids) <= max_new_tokens
            stops_at = [i for i, t in enumerate(c.token_ids) if t in stop_ids]
            if c.finish_reason == "stop":
                assert stops_at == [len(c.token_ids) - 1]
            else:
                assert c.finish_reason == "length" and not stops_at and len(c.token_ids) == max_new_tokens
