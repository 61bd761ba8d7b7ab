import json

import pytest

from model import DeepseekV2Config


def test_presets_match_the_published_tables():
    lite = DeepseekV2Config.preset("v2-lite")
    assert (lite.num_hidden_layers, lite.hidden_size, lite.num_attention_heads) == (27, 2048, 16)
    assert lite.q_lora_rank is None and lite.n_routed_experts == 64 and lite.topk_method == "greedy"
    v2 = DeepseekV2Config.preset("v2")
    assert (v2.q_lora_rank, v2.n_routed_experts, v2.n_group, v2.topk_group) == (1536, 160, 8, 3)
    assert v2.routed_scaling_factor == 16.0
    # DESIGN.md §2: 192^-0.5 · (0.1·0.707·ln 40 + 1)^2 = 0.11472
    assert lite.softmax_scale == pytest.approx(0.11472, abs=1e-5)
    tiny = DeepseekV2Config.preset("tiny")
    assert tiny.latent_cache_width() == 576


def test_reads_a_published_style_config_json(tmp_path):
    raw = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
        "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
                                              "mscale": 0.707, "mscale_all_dim": 0.707,
                                              "original_max_position_embeddings": 4096, "type": "yarn"},
        "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = DeepseekV2Config.from_pretrained(tmp_path)
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 40
    assert cfg.softmax_scale == pytest.approx(0.11472, abs=1e-5)
    assert cfg.seq_aux is True and cfg.aux_loss_alpha == 0.001
    # our own fields default, and survive a round trip
    cfg.capacity_factor = 1.0
    cfg.save_pretrained(tmp_path / "out")
    again = DeepseekV2Config.from_pretrained(tmp_path / "out")
    assert again.capacity_factor == 1.0 and again.rope_parameters["factor"] == 40


@pytest.mark.parametrize("overrides, field", [
    (dict(topk_group=2), "topk_group"),  # > n_group = 1
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),  # > 8 routed experts
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(n_group=3), "n_group"),  # does not divide 8 experts
    (dict(ep_size=3), "ep_size"),
    (dict(topk_method="device_limited_greedy", ep_size=4, max_devices_per_token=None), "max_devices_per_token"),
    (dict(topk_method="group_limited_greedy", n_group=8, topk_group=1), "topk_group"),  # 1 group of 1 < top-2
    (dict(topk_method="best"), "topk_method"),
    (dict(kernels="cuda"), "kernels"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(capacity_factor=0.0), "capacity_factor"),
])
def test_inconsistent_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"DeepseekV2Config\.{field}="):
        DeepseekV2Config.preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        DeepseekV2Config.preset("v3")
