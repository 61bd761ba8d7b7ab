"""Our model against transformers' own DeepseekV2ForCausalLM (random weights, fp32), both directions."""

import pytest
import torch
import transformers

from model import DeepseekV2Config, DeepseekV2ForCausalLM

VARIANTS = {
    "greedy": dict(),
    "group_limited+q_lora": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=48,
                                 routed_scaling_factor=2.5),
    "group_limited": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1),
    "q_lora": dict(q_lora_rank=40),
}


def tiny(**overrides):
    # initializer_range 0.1: the default 0.02 makes routing and attention nearly uniform, which
    # would let a wrong router or rope pass unnoticed.
    return DeepseekV2Config.preset("tiny", initializer_range=0.1, **overrides)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ours_saved_loads_in_transformers_with_same_logits(tmp_path, variant):
    torch.manual_seed(0)
    ours = DeepseekV2ForCausalLM(tiny(**VARIANTS[variant])).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (2, 41))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.abs().max() > 0.5  # logits are not trivially small
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["greedy", "group_limited+q_lora"])
def test_transformers_saved_loads_in_ours_with_same_logits(tmp_path, variant):
    torch.manual_seed(1)
    hf_cfg = transformers.DeepseekV2Config(**tiny(**VARIANTS[variant]).to_dict())
    theirs = transformers.DeepseekV2ForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 512, (3, 29))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                   theirs(ids, attention_mask=mask).logits, atol=1e-4, rtol=0)


def test_yarn_changes_the_logits():
    """Guard that the YaRN path is really exercised by the parity tests above."""
    torch.manual_seed(0)
    with_yarn = DeepseekV2ForCausalLM(tiny()).eval()
    no_yarn_cfg = tiny(rope_scaling=None)
    plain = DeepseekV2ForCausalLM(no_yarn_cfg).eval()
    plain.load_state_dict(with_yarn.state_dict())
    ids = torch.randint(3, 512, (1, 300))
    with torch.no_grad():
        assert (with_yarn(ids).logits - plain(ids).logits).abs().max() > 1e-3
