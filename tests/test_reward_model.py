"""Reward-model stage (alignment/reward_model.py): Bradley–Terry loss, held-out pairwise accuracy on the
shipped safety pairs, the saved format `rewards` loads, SFT initialisation, other transformers models,
and data errors. Seeded and single-threaded like tests/test_sft.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.data import DataConfig, DatasetValidationError
from alignment.reward_model import (
    RewardModelConfig,
    RewardTrainingConfig,
    build_reward_model,
    build_reward_trainer,
    pairwise_accuracy,
    run_reward_model,
)
from alignment.sft import LoggingConfig, ModelConfig, OutputConfig, SFTConfig, SFTTrainingConfig, run_sft

MICRO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32,
             qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=128,
             moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             rope_scaling=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tasks(default_tasks) -> Path:
    return default_tasks


def _config(tasks: Path, out: Path, model: ModelConfig | None = None, train_files=None, eval_files=None,
            **training) -> RewardModelConfig:
    defaults = dict(learning_rate=3e-3, warmup_steps=5, per_device_train_batch_size=16, per_device_eval_batch_size=100,
                    max_steps=60, use_cpu=True, seed=0)
    return RewardModelConfig(
        model=model or ModelConfig(tokenizer_path=str(tasks / "tokenizer"), config_overrides=dict(MICRO)),
        data=DataConfig(train_files=train_files or [str(tasks / "safety_pairs/train.jsonl")],
                        eval_files=eval_files if eval_files is not None else [str(tasks / "safety_pairs/test.jsonl")]),
        output=OutputConfig(output_dir=str(out), save_steps=None),
        training=RewardTrainingConfig(**{**defaults, **training}),
        logging=LoggingConfig(logging_steps=10, progress_bar=False, tensorboard=False),
    )


SAFETY_ACCURACY_FLOOR = 0.9
"""Measured 1.00 on the 200 held-out safety pairs (held-out templates and entities) after 60 steps of 16
pairs; the untrained model scores 0.70 (Trainer's eval_accuracy at step 0)."""


def test_safety_reward_model_reaches_pairwise_accuracy_on_held_out_pairs(tasks, tmp_path):
    """~30 s on one thread."""
    from rewards import get_reward
    from rewards.model_reward import OUR_ARCHITECTURE

    out = tmp_path / "rm"
    result = run_reward_model(_config(tasks, out, eval_on_start=True))
    start = next(h for h in result.log_history if "eval_accuracy" in h and h["step"] == 0)
    print(f"held-out pairwise accuracy {start['eval_accuracy']:.3f} -> {result.eval_metrics['pairwise_accuracy']:.3f}")
    assert result.global_step == 60
    assert result.eval_metrics["pairwise_accuracy"] >= SAFETY_ACCURACY_FLOOR
    assert result.eval_metrics["pairwise_accuracy"] > start["eval_accuracy"] + 0.1
    assert result.eval_metrics["eval_loss"] < 0.3 < start["eval_loss"]
    assert any(h.get("aux_loss", 0) > 0 for h in result.log_history)  # MoE balance loss was trained on
    # No checkpoint was kept (save_steps None), yet the run's report has its curves and final accuracy.
    from alignment.report import write_report

    summary = write_report(out).read_text()
    assert "| loss |" in summary and "| eval_pairwise_accuracy |" in summary

    # The saved directory is what rewards.model_reward loads; its scores reproduce the accuracy.
    assert json.loads((out / "config.json").read_text())["architectures"] == [OUR_ARCHITECTURE]
    scorer = get_reward("model", path=str(out), device="cpu")
    rows = [json.loads(line) for line in (tasks / "safety_pairs/test.jsonl").read_text().splitlines()[:40]]
    columns = {key: [row[key] for row in rows] for key in ("prompt", "chosen", "rejected")}
    assert pairwise_accuracy(scorer, columns) >= SAFETY_ACCURACY_FLOOR


def test_training_loss_is_bradley_terry_plus_balance_loss(tasks, tmp_path):
    config = _config(tasks, tmp_path / "rm", model=ModelConfig(tokenizer_path=str(tasks / "tokenizer"),
                                                                config_overrides=dict(MICRO, aux_loss_alpha=0.5)))
    trainer = build_reward_trainer(config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rewards_B = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    chosen, rejected = rewards_B[:4], rewards_B[4:]
    # Read at the last real token of each right-padded row.
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(rewards_B, model.score(out.last_hidden_state[torch.arange(8), last])[:, 0])
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + 0.5 * out.balance_losses["expert"]
    assert float(0.5 * out.balance_losses["expert"]) > 0.1
    torch.testing.assert_close(loss.detach(), expected)


def test_reward_model_starts_from_an_sft_checkpoint(tasks, tmp_path):
    from model import DeepseekV2ForCausalLM

    sft_dir = tmp_path / "sft"
    run_sft(SFTConfig(
        model=ModelConfig(tokenizer_path=str(tasks / "tokenizer"), config_overrides=dict(MICRO)),
        data=DataConfig(train_files=[str(tasks / "math_sft/train.jsonl")], max_train_samples=32),
        output=OutputConfig(output_dir=str(sft_dir), save_steps=None),
        training=SFTTrainingConfig(max_steps=2, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True),
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
    ))
    sft_model = DeepseekV2ForCausalLM.from_pretrained(sft_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sft_dir))
    reward_model = build_reward_model(ModelConfig(name_or_path=str(sft_dir)), tokenizer, seed=0)
    assert reward_model.config.num_labels == 1
    sft_backbone = sft_model.model.state_dict()
    for key, value in reward_model.model.state_dict().items():
        assert torch.equal(value, sft_backbone[key]), key

    result = run_reward_model(_config(tasks, tmp_path / "rm", model=ModelConfig(name_or_path=str(sft_dir)),
                                      max_steps=10, eval_files=[]))
    assert result.global_step == 10
    assert (tmp_path / "rm/model.safetensors").is_file()


def test_any_transformers_sequence_classifier_trains_and_loads_in_rewards(tasks, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rewards import get_reward

    tokenizer = AutoTokenizer.from_pretrained(str(tasks / "tokenizer"))
    base = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    result = run_reward_model(_config(tasks, tmp_path / "rm", model=ModelConfig(name_or_path=str(base)),
                                      max_steps=30))
    assert json.loads((tmp_path / "rm/config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert result.eval_metrics["pairwise_accuracy"] >= 0.8
    scorer = get_reward("model", path=str(tmp_path / "rm"), device="cpu")
    assert len(scorer([[{"role": "user", "content": "hi"}]], ["hello"])) == 1


def test_malformed_preference_row_is_reported_with_row_and_field(tasks, tmp_path):
    good = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [good, {k: v for k, v in good.items() if k != "rejected"}]))
    with pytest.raises(DatasetValidationError, match=r"pairs\.jsonl: row 1: rejected: missing"):
        run_reward_model(_config(tasks, tmp_path / "rm", train_files=[str(data)], eval_files=[]))
