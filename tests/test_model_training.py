"""Training-side behaviour: gradient checkpointing, PEFT LoRA, chunked logprobs, Trainer hooks."""

import pytest
import torch

from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.logprobs import token_logprobs_reference


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny", initializer_range=0.1, **kw))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(3, 512, (2, 14))
    grads = []
    for checkpointing in (False, True):
        lm = tiny_lm().train()
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_trains_only_adapters_and_merges_back():
    from peft import LoraConfig, get_peft_model

    lm = tiny_lm()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    peft_lm = get_peft_model(lm, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_lm.train()
    opt = torch.optim.AdamW([p for p in peft_lm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 40, (4, 16))
    losses = []
    for _ in range(12):
        loss = peft_lm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    for name, p in peft_lm.base_model.model.named_parameters():
        if "lora_" not in name:
            clean = name.replace("base_layer.", "")
            assert torch.equal(p, before[clean]), f"{clean} changed"
    peft_lm.eval()
    with torch.no_grad():
        adapted = peft_lm(input_ids=ids).logits
        merged = peft_lm.merge_and_unload()
        assert isinstance(merged, DeepseekV2ForCausalLM)
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(p, before[n]) for n, p in merged.named_parameters())


@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_logprobs_match_full_log_softmax_and_gradients(with_entropy):
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (2, 7))
    logp, ent = token_logprobs_reference(h, w, y, temperature=0.7, chunk_size=3, with_entropy=with_entropy)
    full = ((h @ w.T) / 0.7).log_softmax(-1)
    ref = full.gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(logp, ref)
    objective = logp.sum()
    ref_objective = ref.sum()
    if with_entropy:
        ref_ent = -(full.exp() * full).sum(-1)
        torch.testing.assert_close(ent, ref_ent)
        objective = objective + ent.sum()
        ref_objective = ref_objective + ref_ent.sum()
    g = torch.autograd.grad(objective, (h, w))
    g_ref = torch.autograd.grad(ref_objective, (h, w))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_num_items_in_batch_normalises_the_summed_loss():
    lm = tiny_lm().eval()
    ids = torch.randint(3, 512, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    mean = lm(ids, labels=labels).loss
    summed = lm(ids, labels=labels, num_items_in_batch=torch.tensor(12)).loss
    torch.testing.assert_close(summed, mean)  # 2 rows × (10 − 4 masked − 1 shifted) = 12 targets


def test_packed_rows_do_not_attend_across_samples():
    """Padding-free packing: position_ids restart per sample; each sample's logits equal its own pass."""
    lm = tiny_lm().eval()
    a, b = torch.randint(3, 512, (1, 7)), torch.randint(3, 512, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        out = lm(packed, position_ids=positions).logits
        torch.testing.assert_close(out[:, :7], lm(a).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:], lm(b).logits, atol=1e-5, rtol=0)
        leaky = lm(packed).logits[:, 7:]  # without the restart, b would see a
        assert (leaky - lm(b).logits).abs().max() > 1e-3
