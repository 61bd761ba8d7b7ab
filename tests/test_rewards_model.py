"""Model-based rewards: tiny sequence-classification models built from configs, saved and reloaded.

The reference for every score is the model itself, called directly on one unpadded sample rendered
by hand through the saved chat template: batching, padding, truncation side and template handling
in `RewardModel` must reproduce it.
"""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from rewards import RewardModel, call_reward, get_reward, load_reward_model

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
)
PROMPTS = ["How do I bake bread?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
COMPLETIONS = ["Mix flour, water and yeast; knead; bake for forty minutes.", "Hello!"]


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences; ids 0/1/2 are pad/bos/eos like the tiny configs."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(COMPLETIONS), "How do I bake bread? Be brief. Hi", "user assistant system"] * 4
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>")
    tokenizer.chat_template = chat_template
    return tokenizer


def direct_score(model, tokenizer, prompt, completion) -> float:
    """The model on one unpadded sample, the chat rendered by the template string itself."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = "<bos>" + "".join(f"<|{m['role']}|>{m['content']}<eos>" for m in messages)
    text += f"<|assistant|>{completion}<eos>"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item()


@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
                         attention_dropout=0.5)  # dropout makes train-mode scores noisy: eval mode must be on
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("llama_rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model.eval(), tokenizer


def test_transformers_reward_model_matches_direct_scoring(llama_rm):
    path, model, tokenizer = llama_rm
    rm = get_reward("model", path=str(path), batch_size=2, device="cpu")
    assert not rm.model.training
    scores = call_reward(rm, PROMPTS, COMPLETIONS)
    expected = [direct_score(model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scores[0] != pytest.approx(scores[1], abs=1e-3)  # the head reads different tokens
    assert call_reward(rm, PROMPTS, COMPLETIONS) == scores  # eval mode: no dropout noise


def test_batch_size_does_not_change_scores(llama_rm):
    path, _, _ = llama_rm
    prompts, completions = PROMPTS * 3, [c[: 5 + 7 * i] for i, c in enumerate(COMPLETIONS * 3)]
    one_by_one = RewardModel(str(path), batch_size=1, device="cpu")(prompts, completions)
    padded = RewardModel(str(path), batch_size=4, device="cpu")(prompts, completions)
    assert padded == pytest.approx(one_by_one, abs=1e-5)


def test_chat_template_is_applied(llama_rm):
    path, _, _ = llama_rm
    rm = RewardModel(str(path), device="cpu")
    assert rm.render("Hi", "Hello!") == "<bos><|user|>Hi<eos><|assistant|>Hello!<eos>"


def test_truncation_keeps_the_end_of_the_completion(llama_rm):
    path, model, tokenizer = llama_rm
    rm = RewardModel(str(path), device="cpu", max_length=8)
    text = rm.render(PROMPTS[0], COMPLETIONS[0])
    tail_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-8:]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tail_ids])).logits[0, 0].item()
    assert rm([PROMPTS[0]], [COMPLETIONS[0]]) == pytest.approx([expected], abs=1e-5)


def test_a_multi_label_model_is_refused(tmp_path):
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=3; a scalar reward model needs 1"):
        load_reward_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_reward_model(tmp_path / "missing")


def test_our_deepseek_v2_reward_model_loads_through_our_class(tmp_path):
    model_package = pytest.importorskip("model")
    if not hasattr(model_package, "DeepseekV2ForSequenceClassification"):
        pytest.skip("model.DeepseekV2ForSequenceClassification is not available yet")
    torch.manual_seed(0)
    config = model_package.DeepseekV2Config.preset("tiny", num_labels=1)
    model = model_package.DeepseekV2ForSequenceClassification(config).eval()
    tokenizer = build_tokenizer()
    assert len(tokenizer) <= config.vocab_size
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # after: our save replaces the directory

    rm = get_reward("model", path=str(tmp_path), batch_size=2, device="cpu", dtype="float32")
    assert type(rm.model) is model_package.DeepseekV2ForSequenceClassification
    scores = rm(PROMPTS, COMPLETIONS)
    expected = [direct_score(model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_stage2_pipeline_combines_two_reward_models_and_a_rule(llama_rm, tmp_path):
    """r = c1·helpful + c2·safety + c3·rule with two real (tiny) reward models loaded from paths."""
    from rewards import RewardPipeline

    helpful_path, helpful_model, tokenizer = llama_rm
    torch.manual_seed(1)
    safety_model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=0)).eval()
    safety_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    pipeline = RewardPipeline.from_dict({"rewards": [
        {"name": "helpful", "reward": "model", "weight": 1.0, "kwargs": {"path": str(helpful_path), "device": "cpu"}},
        {"name": "safety", "reward": "model", "weight": 0.5, "kwargs": {"path": str(tmp_path), "device": "cpu"}},
        {"name": "rule", "reward": "length", "weight": 0.25, "kwargs": {"max_length": 3}},
    ]}, source="grpo_stage2.yaml")
    out = pipeline(PROMPTS, COMPLETIONS)
    helpful = [direct_score(helpful_model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    safety = [direct_score(safety_model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    rule = [0.0, 1.0]  # the first completion is longer than 3 words
    assert out.components["helpful"] == pytest.approx(helpful, abs=1e-5)
    assert out.components["safety"] == pytest.approx(safety, abs=1e-5)
    expected = [h + 0.5 * s + 0.25 * r for h, s, r in zip(helpful, safety, rule)]
    assert out.totals == pytest.approx(expected, abs=1e-5)
