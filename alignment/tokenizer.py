"""A small byte-level BPE tokenizer with a chat template, for the tiny models of tests and demos.

Built with the `tokenizers` library on the generated task corpus and saved as a
`PreTrainedTokenizerFast` directory that `transformers.AutoTokenizer.from_pretrained` loads.

Choices and why:
- Byte-level BPE: lossless on any text (decode(encode(s)) == s), and the 256-byte base alphabet
  means no unknown token.
- Digits are pre-split one by one and never merged, so every number is spelled digit by digit with
  one token per digit: the model can learn column arithmetic instead of memorising a token per number.
- Vocabulary of at most 1024 (default 512): the embedding and the LM head dominate a 2M-parameter
  model, and the templated corpus compresses well with few merges.
- Chat format (no newlines, special tokens delimit turns):
      <|bos|><|system|>...<|user|>...<|assistant|>...<|eos|><|user|>...
  The assistant turn ends with `eos_token`, so generation stops at the end of the reply. The template
  wraps assistant content and its eos in `{% generation %}` markers, so
  `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens an
  assistant-only loss trains on. `add_generation_prompt=True` appends `<|assistant|>`.
- No automatic bos/eos on plain `tokenizer(text)`: the chat template places bos itself, and TRL
  tokenizes templated text with add_special_tokens=False anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]
"""In id order: pad is 0, bos 1, eos 2, then the role markers."""
MAX_VOCAB_SIZE = 1024

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Jinja chat template; roles are system, user and assistant."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train the byte-level BPE on `texts` and wrap it as a PreTrainedTokenizerFast.

    `vocab_size` counts everything: the special tokens, the 256 bytes and the learned merges.
    """
    from transformers import PreTrainedTokenizerFast  # heavy: only when a tokenizer is built

    if not len(SPECIAL_TOKENS) + 256 < vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must lie in ({len(SPECIAL_TOKENS) + 256}, {MAX_VOCAB_SIZE}], got {vocab_size}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Isolate every digit first; the byte-level regex then never sees two digits together.
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        # Left padding: batched generation needs the prompts flush against the new tokens.
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512):
    """Train on `texts`, save to `out_dir` (loadable with AutoTokenizer.from_pretrained) and return it."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path):
    """Load a saved tokenizer through the ordinary transformers path."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
