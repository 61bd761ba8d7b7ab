"""Latent-cache decode (absorbed weights) equals the full forward pass; sampling reports its logprobs."""

import pytest
import torch

from model import DeepseekV2Config, DeepseekV2ForCausalLM, LatentCache
from model.generation import SamplingConfig, filter_logits, generate


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny", initializer_range=0.1, q_lora_rank=48)).eval()


def test_absorb_equals_naive_on_full_sequences(lm):
    ids = torch.randint(3, 512, (2, 23))
    with torch.no_grad():
        naive = lm(ids).logits
        lm.config.mla_impl = "absorb"
        try:
            absorbed = lm(ids).logits
        finally:
            lm.config.mla_impl = "auto"
    torch.testing.assert_close(absorbed, naive, atol=1e-4, rtol=0)


def test_incremental_decode_with_left_padding_matches_full_forward(lm):
    torch.manual_seed(3)
    lengths = [9, 4, 7]
    P, steps = max(lengths), 6
    seqs = [torch.randint(3, 512, (n + steps,)) for n in lengths]
    B = len(seqs)
    # Reference: each sequence alone, no padding, no cache.
    with torch.no_grad():
        ref = [lm(s[None]).logits[0] for s in seqs]
        cache = LatentCache(lm.config, B, P + steps, torch.float32, "cpu")
        prompt = torch.zeros(B, P, dtype=torch.long)
        mask = torch.zeros(B, P + steps, dtype=torch.long)
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            prompt[b, P - n:] = s[:n]
            mask[b, P - n:P] = 1
        out = lm(prompt, attention_mask=mask[:, :P], past_key_values=cache)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(out.logits[b, P - n:], ref[b][:n], atol=1e-4, rtol=0)
        for t in range(steps - 1):
            mask[:, P + t] = 1
            step_ids = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
            out = lm(step_ids, attention_mask=mask[:, :P + t + 1], past_key_values=cache)
            for b, n in enumerate(lengths):
                torch.testing.assert_close(out.logits[b, 0], ref[b][n + t], atol=1e-4, rtol=0)
    # only the latent is cached: C + R values per token and layer
    assert cache.latent_LBSW.shape[-1] == 512 + 64


def test_sampled_logprobs_match_recomputation_and_routing_is_recorded(lm):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    gens = generate(lm, prompts, SamplingConfig(max_new_tokens=7, temperature=0.8, seed=1), return_routing=True)
    for g in gens:
        full = torch.tensor([g.prompt_ids + g.token_ids])
        P = len(g.prompt_ids)
        with torch.no_grad():
            logp = (lm(full).logits[0] / 0.8).log_softmax(-1)
            routed = lm(full[:, :-1], output_routing=True).routed_experts[:, 0].permute(1, 0, 2)
        ref = torch.stack([logp[P - 1 + i, t] for i, t in enumerate(g.token_ids)])
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-4, rtol=0)
        assert g.finish_reason == "length" and len(g.token_ids) == 7
        assert torch.equal(g.routed_experts, routed)


def test_stop_token_ends_a_sequence_and_is_reported(lm):
    greedy = generate(lm, [[5, 6, 7]], SamplingConfig(max_new_tokens=6, temperature=0))[0]
    stop = greedy.token_ids[2]
    first = greedy.token_ids.index(stop)
    stopped = generate(lm, [[5, 6, 7], [9, 9]], SamplingConfig(max_new_tokens=6, temperature=0,
                                                               stop_token_ids=(stop,)))
    assert stopped[0].token_ids == greedy.token_ids[:first + 1] and stopped[0].finish_reason == "stop"
    other = generate(lm, [[9, 9]], SamplingConfig(max_new_tokens=6, temperature=0, stop_token_ids=(stop,)))[0]
    assert stopped[1].token_ids == other.token_ids  # the batch-mate is unaffected by the early finish


def test_greedy_matches_transformers_generate(lm):
    ours = generate(lm, [[5, 6, 7, 8]], SamplingConfig(max_new_tokens=8, temperature=0))[0].token_ids
    hf = lm.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    assert hf[0, 4:].tolist() == ours


def test_too_long_prompt_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(lm, [[5] * 2040], SamplingConfig(max_new_tokens=16))


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    p = logits.softmax(-1)[0]
    kept = filter_logits(logits, 0, float(p[0] + 1e-3))[0]
    assert torch.isfinite(kept[:2]).all() and torch.isinf(kept[2:]).all()
