"""A tiny SFT'd DeepseekV2 on the shipped arithmetic task: the starting point of the GRPO tests and of
benchmarks/grpo_vs_trl.py (a fixture, not a training stage: alignment/sft.py is the SFT stage).

A plain loop on purpose — AdamW, assistant-only cross-entropy, fixed seed — so that the fixture does not
depend on the SFT stage under test elsewhere and runs in about a minute on two CPU cores. The number of
steps sets the starting accuracy; `tiny_sft_checkpoint` reports it (greedy, held-out) so callers can check
it lies strictly between 0 and 100%.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sft_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of user + assistant turn, number of prompt tokens) per chat row."""
    out = []
    for row in rows:
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        out.append((full, len(prompt)))
    return out


def train_tiny_sft(task_dir: str | Path, steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                   config_overrides: dict | None = None):
    """(model, tokenizer) after `steps` SFT steps on math_sft/train from a fresh tiny preset."""
    from transformers import AutoTokenizer

    from model import DeepseekV2Config, DeepseekV2ForCausalLM

    task_dir = Path(task_dir)
    tokenizer = AutoTokenizer.from_pretrained(task_dir / "tokenizer")
    config = DeepseekV2Config.preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **(config_overrides or {}))
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(config)
    model.train()
    examples = sft_examples(tokenizer, _rows(task_dir / "math_sft" / "train.jsonl"))
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    for _ in range(steps):
        batch = rng.sample(examples, batch_size)
        S = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, S), tokenizer.pad_token_id)
        labels = torch.full((batch_size, S), -100)
        mask = torch.zeros(batch_size, S, dtype=torch.long)
        for b, (ids, n_prompt) in enumerate(batch):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            labels[b, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
            mask[b, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model, tokenizer


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 100) -> float:
    """Share of prompt rows (`prompt`, `answer`) whose greedy completion the `math` reward scores 1."""
    from model.generation import SamplingConfig, generate
    from rewards.math_accuracy import MathAccuracy

    scorer = MathAccuracy()
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
               for r in rows]
    correct = 0.0
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    for s in range(0, len(rows), batch_size):
        gens = generate(model, prompts[s:s + batch_size], sampling)
        for g, r in zip(gens, rows[s:s + batch_size]):
            correct += scorer.score(tokenizer.decode(g.token_ids, skip_special_tokens=True), r["answer"]) or 0.0
    return correct / len(rows)


def tiny_sft_checkpoint(task_dir: str | Path, out_dir: str | Path, steps: int = 300, seed: int = 0,
                        eval_rows: int = 200) -> float:
    """Train, save (HF layout + tokenizer) to out_dir, return held-out greedy accuracy on math_grpo/test."""
    model, tokenizer = train_tiny_sft(task_dir, steps=steps, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    rows = _rows(Path(task_dir) / "math_grpo" / "test.jsonl")[:eval_rows]
    return greedy_accuracy(model, tokenizer, rows)
