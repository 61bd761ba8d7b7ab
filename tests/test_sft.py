"""SFT stage (alignment/sft.py): masking, packing, learning, LoRA, checkpoints and resume, data errors.

Every run is seeded and single-threaded (torch.set_num_threads(1)): on a shared 2-core machine one
thread is both faster (no oversubscription) and bitwise reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.data import DataConfig, DatasetValidationError
from alignment.evaluators import EvalConfig, EvaluatorSpec
from alignment.sft import (
    LoggingConfig,
    LoraSettings,
    ModelConfig,
    OutputConfig,
    SFTConfig,
    SFTTrainingConfig,
    build_sft_trainer,
    run_sft,
)

# A small MLA/MoE model (~1.2M parameters): 4 layers (1 dense + 3 MoE of 8 experts, top-2, 1 shared).
SMALL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
             qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, intermediate_size=256,
             moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
             rope_scaling=None)
MICRO = dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=128, moe_intermediate_size=32,
             n_routed_experts=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tasks(default_tasks) -> Path:
    return default_tasks


def _config(tasks: Path, out: Path, overrides=MICRO, train_files=None, eval_files=None, lora=None,
            eval_config=None, **training) -> SFTConfig:
    defaults = dict(learning_rate=3e-3, per_device_train_batch_size=8, per_device_eval_batch_size=50, max_steps=4,
                    use_cpu=True, warmup_steps=0, lr_scheduler_type="constant")
    return SFTConfig(
        model=ModelConfig(tokenizer_path=str(tasks / "tokenizer"), config_overrides=dict(overrides), lora=lora),
        data=DataConfig(train_files=train_files or [str(tasks / "math_sft/train.jsonl")],
                        eval_files=eval_files if eval_files is not None else [str(tasks / "math_sft/test.jsonl")],
                        max_eval_samples=50),
        output=OutputConfig(output_dir=str(out), save_steps=None),
        training=SFTTrainingConfig(**{**defaults, **training}),
        logging=LoggingConfig(logging_steps=1, progress_bar=False, tensorboard=False),
        eval=eval_config or EvalConfig(),
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Assistant-only masking.
# ---------------------------------------------------------------------------------------------


def test_assistant_only_labels_are_exactly_the_assistant_replies(tasks, tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Now 4."},
        {"role": "assistant", "content": "9"},
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    trainer = build_sft_trainer(_config(tasks, tmp_path / "out", train_files=[str(data)], eval_files=[]))
    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    # Hand-checked rendering: <|bos|><|system|>Be brief.<|user|>Add 2 and 3.<|assistant|>2 + 3 = 5.<|eos|>
    # <|user|>Now 4.<|assistant|>9<|eos|>; the labels keep the two replies with their <|eos|> and nothing else.
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    special = {name: tokenizer.convert_tokens_to_ids(name)
               for name in ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|eos|>")}
    prompt_1 = [special["<|bos|>"], special["<|system|>"], *enc("Be brief."), special["<|user|>"],
                *enc("Add 2 and 3."), special["<|assistant|>"]]
    reply_1 = [*enc("2 + 3 = 5."), special["<|eos|>"]]
    prompt_2 = [special["<|user|>"], *enc("Now 4."), special["<|assistant|>"]]
    reply_2 = [*enc("9"), special["<|eos|>"]]
    assert ids == prompt_1 + reply_1 + prompt_2 + reply_2
    masked = [-100] * len(prompt_1) + reply_1 + [-100] * len(prompt_2) + reply_2
    assert labels == masked
    assert tokenizer.decode([t for t in labels if t != -100]) == "2 + 3 = 5.<|eos|>9<|eos|>"

    # The loss the trainer optimises is the token-mean CE over exactly those labels (eval mode: no aux loss).
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1]
    targets = torch.tensor(ids[1:])
    keep = torch.tensor(masked[1:]) != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_balance_losses_are_part_of_the_training_loss(tasks, tmp_path):
    config = _config(tasks, tmp_path / "out", overrides=dict(MICRO, aux_loss_alpha=0.5, device_balance_alpha=0.25,
                                                             comm_balance_alpha=0.125, ep_size=2))
    trainer = build_sft_trainer(config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    balance = out.balance_losses
    aux = 0.5 * balance["expert"] + 0.25 * balance["device"] + 0.125 * balance["comm"]
    assert float(aux) > 0.1  # large enough that leaving it out would fail the comparison below
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                           ignore_index=-100)
    torch.testing.assert_close(loss.detach(), ce + aux)


# ---------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------


def test_packed_samples_do_not_attend_to_each_other(tasks, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}]}
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4))]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    trainer = build_sft_trainer(_config(tasks, tmp_path / "out", train_files=[str(data)], eval_files=[],
                                        packing=True, max_length=64, per_device_train_batch_size=2))
    packed_rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(packed_rows)
    ids_T, position_ids_T, labels_T = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free: one row
    starts = (position_ids_T == 0).nonzero()[:, 0].tolist()
    assert len(starts) >= 3  # several samples in the row
    assert all(labels_T[s] == -100 for s in starts)  # no loss target crosses a sample boundary

    model = trainer.model.eval()
    with torch.no_grad():
        packed_logits_TV = model(input_ids=ids_T[None], position_ids=position_ids_T[None]).logits[0]
        unmasked_logits_TV = model(input_ids=ids_T[None]).logits[0]  # the same row with one causal mask
        alone_logits_TV = torch.cat([model(input_ids=ids_T[None, s:e]).logits[0]
                                     for s, e in zip(starts, starts[1:] + [len(ids_T)])])
        loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(packed_logits_TV, alone_logits_TV, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked_logits_TV, alone_logits_TV, atol=1e-3)  # the check can fail
    # The trainer's loss on the packed row = token-mean CE over the samples run one by one.
    targets_T = labels_T[1:]
    keep_T = targets_T != -100
    expected = torch.nn.functional.cross_entropy(alone_logits_TV[:-1][keep_T], targets_T[keep_T])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Learning.
# ---------------------------------------------------------------------------------------------

EXACT_MATCH_FLOOR = 0.06
"""Measured 0.125 (25 of 200 held-out problems) after these 300 steps; the untrained model scores 0,
and a model that has learnt only the answer format (~50 steps) ~0.045."""


@pytest.mark.slow
def test_sft_on_arithmetic_lowers_eval_loss_and_reaches_exact_match_floor(tasks, tmp_path):
    """~2.5 minutes on one thread."""
    out = tmp_path / "sft"
    config = SFTConfig(
        model=ModelConfig(tokenizer_path=str(tasks / "tokenizer"), config_overrides=dict(SMALL, aux_loss_alpha=0.001)),
        data=DataConfig(train_files=[str(tasks / "math_sft/train.jsonl")],
                        eval_files=[str(tasks / "math_sft/test.jsonl")]),
        output=OutputConfig(output_dir=str(out), save_steps=None),
        training=SFTTrainingConfig(learning_rate=3e-3, warmup_steps=10, per_device_train_batch_size=32,
                                   per_device_eval_batch_size=100, max_steps=300, eval_on_start=True,
                                   use_cpu=True, seed=0),
        logging=LoggingConfig(logging_steps=50, progress_bar=False, tensorboard=True),
        eval=EvalConfig(evaluators=[EvaluatorSpec(name="math", evaluator="accuracy", kwargs={
            "files": [str(tasks / "math_grpo/test.jsonl")], "max_new_tokens": 40, "batch_size": 100})]),
    )
    result = run_sft(config)

    start = next(h for h in result.log_history if "eval_loss" in h and h["step"] == 0)
    start_accuracy = next(h for h in result.log_history if "eval_math/accuracy" in h and h["step"] == 0)
    print(f"eval_loss {start['eval_loss']:.3f} -> {result.eval_metrics['eval_loss']:.3f}; exact match "
          f"{start_accuracy['eval_math/accuracy']:.3f} -> {result.eval_metrics['eval_math/accuracy']:.3f}")
    assert result.global_step == 300
    assert start_accuracy["eval_math/accuracy"] == 0.0
    assert result.eval_metrics["eval_loss"] < 0.15 * start["eval_loss"]
    assert result.eval_metrics["eval_math/accuracy"] >= EXACT_MATCH_FLOOR
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 300]
    assert evals[-1]["eval/math/accuracy"] == result.eval_metrics["eval_math/accuracy"]
    # The MoE balance loss was part of training, and TensorBoard got the metrics.
    assert any(h.get("aux_loss", 0) > 0 for h in result.log_history)
    assert list((out / "runs").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume.
# ---------------------------------------------------------------------------------------------


class _StopAt:
    """TrainerCallback that interrupts training after `step` (after that step's checkpoint is written)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    control.should_training_stop = True
                return control

        return Stop()


def _record_batches(trainer_factory):
    """Wrap `build_sft_trainer` so every training forward's input_ids are recorded."""
    seen: list[torch.Tensor] = []

    def build(config, *args):
        trainer = trainer_factory(config, *args)

        def hook(module, args, kwargs):
            if module.training:
                seen.append(kwargs["input_ids"].clone())

        trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
        return trainer

    return build, seen


def test_resume_continues_from_the_checkpoint_like_an_uninterrupted_run(tasks, tmp_path, monkeypatch):
    import alignment.sft as sft

    def config(out):
        c = _config(tasks, out, max_steps=6, lr_scheduler_type="cosine", warmup_steps=2)
        c.output.save_steps = 3
        return c

    build, seen_full = _record_batches(build_sft_trainer)
    monkeypatch.setattr(sft, "build_sft_trainer", build)
    full = run_sft(config(tmp_path / "full"))

    build, seen_first = _record_batches(build_sft_trainer)
    monkeypatch.setattr(sft, "build_sft_trainer", build)
    interrupted = run_sft(config(tmp_path / "resumed"), extra_callbacks=[_StopAt(3)])
    assert interrupted.global_step == 3
    assert (tmp_path / "resumed/checkpoint-3/model.safetensors").is_file()
    assert not (tmp_path / "resumed/model.safetensors").exists()  # no final model from an interrupted run

    resumed_config = config(tmp_path / "resumed")
    resumed_config.output.resume_from_checkpoint = True
    build, seen_second = _record_batches(build_sft_trainer)
    monkeypatch.setattr(sft, "build_sft_trainer", build)
    resumed = run_sft(resumed_config)

    assert resumed.global_step == 6
    # Same data position: the resumed run trains on batches 4..6 of the uninterrupted run.
    assert len(seen_full) == 6 and len(seen_first) == 3 and len(seen_second) == 3
    for a, b in zip(seen_full, seen_first + seen_second, strict=True):
        assert torch.equal(a, b)
    # Same step and state: the per-step losses and the final weights agree.
    losses = {h["step"]: h["loss"] for h in full.log_history if "loss" in h}
    resumed_losses = {h["step"]: h["loss"] for h in resumed.log_history if "loss" in h}
    # The resumed history holds steps 1-3 from the checkpoint's trainer_state.json and 4-6 from this run.
    assert set(resumed_losses) == set(losses) == {1, 2, 3, 4, 5, 6}
    for step, value in resumed_losses.items():
        assert value == pytest.approx(losses[step], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    final_full = load_file(str(tmp_path / "full/model.safetensors"))
    final_resumed = load_file(str(tmp_path / "resumed/model.safetensors"))
    assert final_full.keys() == final_resumed.keys()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpoints_and_final_model_load_in_transformers(tasks, tmp_path):
    from transformers import AutoTokenizer
    from transformers import DeepseekV2ForCausalLM as HFDeepseekV2ForCausalLM

    from model import DeepseekV2ForCausalLM

    config = _config(tasks, tmp_path / "out", max_steps=2)
    config.output.save_steps = 2
    run_sft(config)
    for directory in (tmp_path / "out/checkpoint-2", tmp_path / "out"):
        assert json.loads((directory / "config.json").read_text())["architectures"] == ["DeepseekV2ForCausalLM"]
        ours = DeepseekV2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        theirs = HFDeepseekV2ForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Sam has 3 pens."}],
                                                          add_generation_prompt=True)["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_trains_only_adapters_and_saves_a_merged_model(tasks, tmp_path):
    from model import DeepseekV2ForCausalLM

    config = _config(tasks, tmp_path / "out", max_steps=8, lora=LoraSettings(r=4, alpha=8.0), learning_rate=1e-2)
    config.output.save_steps = 4
    trainer = build_sft_trainer(config)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in changed}
    # Every Linear target got an adapter (the dense FFN and the shared experts included); the stacked routed
    # experts, not Linear, got none.
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj",
            "model.layers.1.self_attn.kv_b_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa"} <= adapted
    assert not any("experts" in name and "shared_experts" not in name for name in adapted)
    assert (tmp_path / "out/checkpoint-4/adapter_model.safetensors").is_file()

    result = run_sft(_config(tasks, tmp_path / "run", max_steps=8, lora=LoraSettings(r=4, alpha=8.0),
                             learning_rate=1e-2))
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    merged = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "run")  # a plain full checkpoint
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Data errors.
# ---------------------------------------------------------------------------------------------


def test_missing_column_is_reported_with_row_and_field(tasks, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    data = _write_jsonl(tmp_path / "bad.jsonl", [good, good, {"conversation": good["messages"]}])
    with pytest.raises(DatasetValidationError, match=r"bad\.jsonl: row 2: messages: missing"):
        run_sft(_config(tasks, tmp_path / "out", train_files=[str(data)], eval_files=[]))


def test_malformed_message_is_reported_with_row_and_field(tasks, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    data = _write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DatasetValidationError, match=r"row 1: messages\[1\]\.role: unknown role 'bot'"):
        run_sft(_config(tasks, tmp_path / "out", train_files=[str(data)], eval_files=[]))
