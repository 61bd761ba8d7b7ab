"""The tiny model's tokenizer: saved and reloaded through AutoTokenizer, lossless, digit-level, chat template."""

from __future__ import annotations

import json

import pytest

from alignment.tasks.build import BuildConfig, TaskSizes, generate_rows, tokenizer_corpus
from alignment.tokenizer import (
    MAX_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

SIZES = TaskSizes(
    math_sft_train=600, math_grpo_train=0, math_test=20, code_train=150, code_test=10, helpful_train=300,
    helpful_test=0, safety_train=300, safety_test=0, chat_train=60, chat_test=0, stage2_prompts_train=0,
    stage2_prompts_test=0,
)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return tokenizer_corpus(generate_rows(BuildConfig(out_dir="unused", seed=0, sizes=SIZES, tokenizer=False)))


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(corpus, directory, vocab_size=512)
    return load_tokenizer(directory)  # the ordinary AutoTokenizer.from_pretrained path


def test_loads_through_auto_tokenizer_with_special_tokens(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 512 <= MAX_VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert tokenizer.chat_template


@pytest.mark.parametrize(
    "text",
    [
        "Tom has 12 apples. He gets 7 more. How many apples does Tom have now?",
        "12 + 7 = 19. 19 - 4 = 15. The answer is \\boxed{15}.",
        "```python\ndef add(a, b):\n    return a + b\n```",
        "  leading spaces, tabs\tand trailing newline\n",
        "Grüße, naïve café — 東京 ✓ 🙂",
        "",
    ],
)
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_plain_text_gets_no_automatic_special_tokens(tokenizer):
    ids = tokenizer("hello")["input_ids"]
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_digits_are_single_tokens(tokenizer):
    for digit in "0123456789":
        assert len(tokenizer(digit, add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer("x=90817", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[-5:] == list("90817")
    # No learned token glues a digit to anything else (not even another digit or a space).
    for token in tokenizer.get_vocab():
        if any(ch.isdigit() for ch in token) and token not in SPECIAL_TOKENS:
            assert len(token) == 1, token


def test_the_corpus_compresses(tokenizer, corpus):
    text = " ".join(corpus[:500])
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 0.5 * len(text.encode())


def test_chat_template_and_assistant_mask_on_a_hand_checked_example(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 plus 5?"},
        {"role": "assistant", "content": "3 + 5 = 8."},
        {"role": "user", "content": "And 2 more?"},
        {"role": "assistant", "content": "10."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|bos|><|system|>Be brief.<|user|>What is 3 plus 5?<|assistant|>3 + 5 = 8.<|eos|>"
        "<|user|>And 2 more?<|assistant|>10.<|eos|>"
    )
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert len(ids) == len(mask)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    # Exactly the assistant contents and their eos, in two runs; nothing of the prompt, no role marker.
    masked = [i for i, m in enumerate(mask) if m]
    first_reply = tokens.index("<|assistant|>") + 1
    first_eos = tokens.index("<|eos|>")
    second_reply = len(tokens) - 1 - tokens[::-1].index("<|assistant|>") + 1
    assert masked == list(range(first_reply, first_eos + 1)) + list(range(second_reply, len(tokens)))
    assert tokens[first_reply:first_eos + 1] == ["3", "Ġ+", "Ġ", "5", "Ġ=", "Ġ", "8", ".", "<|eos|>"]
    assert tokenizer.decode([ids[i] for i in masked]) == "3 + 5 = 8.<|eos|>10.<|eos|>"
    assert tokenizer.decode([ids[i] for i, m in enumerate(mask) if not m]) == (
        "<|bos|><|system|>Be brief.<|user|>What is 3 plus 5?<|assistant|><|user|>And 2 more?<|assistant|>"
    )


def test_generation_prompt_ends_with_the_assistant_marker(tokenizer):
    prompt = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == (
        "<|bos|><|user|>Hi<|assistant|>"
    )
    assert tokenizer.apply_chat_template(prompt, tokenize=False) == "<|bos|><|user|>Hi"
    # A completed reply ends in eos, so a model trained on it stops there.
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "Hello"}], tokenize=True,
                                         return_dict=True)["input_ids"]
    assert full[-1] == tokenizer.eos_token_id


def test_unknown_role_is_rejected(tokenizer):
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_training_is_deterministic_and_bounded(corpus, tmp_path):
    first, second = train_tokenizer(corpus, vocab_size=400), train_tokenizer(corpus, vocab_size=400)
    assert first.get_vocab() == second.get_vocab() and len(first) == 400
    first.save_pretrained(str(tmp_path))
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == json.loads(second.backend_tokenizer.to_str())["model"]["merges"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=MAX_VOCAB_SIZE + 1)
