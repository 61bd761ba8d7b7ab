"""HF-format checkpoints: round trips, sharding, and clear errors for malformed directories."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import (
    CheckpointError,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV2ForSequenceClassification,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    lm = DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny", initializer_range=0.1)).eval()
    path = tmp_path_factory.mktemp("ckpt")
    lm.save_pretrained(path)
    return lm, path


def test_saved_keys_are_hf_names_with_per_expert_weights(saved):
    _, path = saved
    keys = set(load_file(path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.weight" in keys
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense first layer
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in keys
    assert not any(k.endswith("experts.gate_proj") for k in keys)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["DeepseekV2ForCausalLM"]


def test_sharded_round_trip_keeps_logits(saved, tmp_path):
    lm, _ = saved
    lm.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    again = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lm(ids).logits, atol=0, rtol=0)


def test_resaving_into_the_same_dir_keeps_foreign_files_and_drops_stale_shards(saved, tmp_path):
    lm, _ = saved
    lm.save_pretrained(tmp_path, max_shard_size="200KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    assert not list(tmp_path.glob("model-*.safetensors")) and (tmp_path / "model.safetensors").exists()


def _copy(path, tmp_path, mutate):
    tensors = load_file(path / "model.safetensors")
    mutate(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    return tmp_path


def test_missing_key_is_named(saved, tmp_path):
    _copy(saved[1], tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key 'model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight'"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def test_unexpected_key_is_named(saved, tmp_path):
    _copy(saved[1], tmp_path, lambda t: t.__setitem__("model.layers.9.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.9\.bogus\.weight'"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def test_misshaped_key_is_named(saved, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :-1].contiguous()
    _copy(saved[1], tmp_path, shrink)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.o_proj\.weight' has shape"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def test_pickle_only_truncated_and_wrong_type_checkpoints(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved[1] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled .bin weights are not loaded"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((saved[1] / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    raw = json.loads((saved[1] / "config.json").read_text())
    raw["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def test_dtype_and_config_overrides_on_load(saved):
    lm = DeepseekV2ForCausalLM.from_pretrained(saved[1], dtype=torch.bfloat16, capacity_factor=1.5)
    assert next(lm.parameters()).dtype == torch.bfloat16 and lm.config.capacity_factor == 1.5


def test_reward_model_head_round_trips_and_loads_in_transformers(tmp_path):
    import transformers

    torch.manual_seed(0)
    cfg = DeepseekV2Config.preset("tiny", initializer_range=0.1, num_labels=1)
    rm = DeepseekV2ForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path)
    ids = torch.randint(3, 512, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on row 1
    ids[1, :3] = 0
    with torch.no_grad():
        ours = rm(ids, attention_mask=mask).logits
        again = DeepseekV2ForSequenceClassification.from_pretrained(tmp_path)(ids, attention_mask=mask).logits
        theirs = transformers.DeepseekV2ForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32)
        hf = theirs.eval()(ids[:1]).logits
    assert ours.shape == (2, 1)
    torch.testing.assert_close(again, ours)
    torch.testing.assert_close(hf, ours[:1], atol=1e-4, rtol=0)
    # left padding does not change the score of the real tokens
    alone = rm(ids[1:, 3:]).logits
    torch.testing.assert_close(alone, ours[1:], atol=1e-4, rtol=0)
