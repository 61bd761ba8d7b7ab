"""Our GRPO trainer vs TRL's GRPOTrainer on the CPU: same tiny SFT'd model, prompts, G, lengths, updates.

    python benchmarks/grpo_vs_trl.py --work /tmp/grpo_bench                 # 1. per-step time and peak memory
    python benchmarks/grpo_vs_trl.py --work /tmp/grpo_bench --budget-s 300  # 2. + held-out accuracy over time

Setup: the shipped arithmetic task (`python -m alignment.tasks build`), a tiny DeepseekV2 SFT'd with
alignment/grpo/tiny.py (held-out greedy accuracy printed), `math` reward, in-process generation for both
(ours: the native latent-cache sampler on the live policy; TRL: transformers' `generate` on transformers'
DeepseekV2ForCausalLM loaded from the same checkpoint). Both: P prompts × G completions per step, one update per
rollout batch (μ = 1), β = 0.04 with a frozen reference, per-sequence-mean loss (TRL loss_type="grpo"),
group-std advantages, temperature 1, AdamW at the same learning rate, one torch thread each.

Each trainer runs in its own subprocess, so "peak memory" is that process's peak RSS (ru_maxrss); the RSS right
after the imports is printed too, since TRL imports more. Per-step time = median wall time of steps 2..N (step 1
includes one-off warm-up). With `--budget-s`, each trainer trains for that much wall time (evaluation excluded)
and the held-out greedy accuracy on `--eval-rows` test problems is recorded every `--eval-every` steps.
vLLM rows: TRL's vLLM colocate mode fails at weight sync on the CPU (../shared/ENVIRONMENT.md), so only the
in-process rows are measured here.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on sys.path and benchmarks/model.py would shadow the `model` package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- children
def run_ours(args) -> dict:
    import torch

    torch.set_num_threads(1)
    import datasets
    from transformers import AutoTokenizer

    from alignment.grpo import GRPOConfig
    from alignment.grpo.tiny import greedy_accuracy
    from alignment.grpo.trainer import GRPOTrainer
    from model import DeepseekV2ForCausalLM
    from rewards.pipeline import RewardPipeline, RewardPipelineConfig
    from rollout import RolloutConfig

    after_imports = _rss_mb()
    tasks = Path(args.tasks)
    tok = AutoTokenizer.from_pretrained(args.sft)
    model = DeepseekV2ForCausalLM.from_pretrained(args.sft, dtype=torch.float32)
    train = datasets.Dataset.from_list(_rows(tasks / "math_grpo" / "train.jsonl"))
    test_rows = _rows(tasks / "math_grpo" / "test.jsonl")[:args.eval_rows]
    cfg = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group, micro_batch_size=args.prompts * args.group,
                     max_new_tokens=args.max_new_tokens, learning_rate=args.lr, beta=0.04, aggregation="sequence_mean",
                     max_steps=10**9, seed_per_group=False, save_every=0, progress_bar=False, tensorboard=False,
                     seed=args.seed)
    pipeline = RewardPipeline(RewardPipelineConfig.from_dict({"rewards": [{"name": "math"}]}))
    trainer = GRPOTrainer(model, tok, train, pipeline, cfg, RolloutConfig(backend="native", max_model_len=256),
                          Path(args.out) / "ours")
    return _loop(args, trainer.train_step, lambda: greedy_accuracy(model, tok, test_rows), after_imports)


def _loop(args, step_fn, eval_fn, after_imports) -> dict:
    times, curve, rewards = [], [], []
    trained = 0.0
    if args.budget_s:
        curve.append((0.0, 0, eval_fn()))
    step = 0
    while (step < args.steps) if not args.budget_s else (trained < args.budget_s):
        t0 = time.perf_counter()
        metrics = step_fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        trained += dt
        step += 1
        if metrics is not None:
            rewards.append(metrics.get("reward/mean"))
        if args.budget_s and step % args.eval_every == 0:
            curve.append((trained, step, eval_fn()))
    if args.budget_s and (not curve or curve[-1][1] != step):
        curve.append((trained, step, eval_fn()))
    return {"step_times": times, "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": after_imports, "curve": curve,
            "rewards": rewards}


def run_trl(args) -> dict:
    import torch

    torch.set_num_threads(1)
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from transformers import DeepseekV2ForCausalLM as HFDeepseekV2
    from trl import GRPOConfig, GRPOTrainer

    from rewards.math_accuracy import MathAccuracy

    after_imports = _rss_mb()
    tasks = Path(args.tasks)
    tok = AutoTokenizer.from_pretrained(args.sft)
    model = HFDeepseekV2.from_pretrained(args.sft, dtype=torch.float32)
    train = datasets.Dataset.from_list(_rows(tasks / "math_grpo" / "train.jsonl"))
    test_rows = _rows(tasks / "math_grpo" / "test.jsonl")[:args.eval_rows]
    scorer = MathAccuracy()

    def math_reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [scorer.score(t, a) or 0.0 for t, a in zip(texts, answer)]

    @torch.no_grad()
    def accuracy(m) -> float:
        was = m.training
        m.eval()
        correct = 0.0
        for row in test_rows:
            ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = m.generate(**ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += scorer.score(text, row["answer"]) or 0.0
        m.train(was)
        return correct / len(test_rows)

    config = GRPOConfig(output_dir=str(Path(args.out) / "trl"), per_device_train_batch_size=args.prompts * args.group,
                        gradient_accumulation_steps=1, num_generations=args.group,
                        max_completion_length=args.max_new_tokens, beta=0.04, loss_type="grpo", scale_rewards="group",
                        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=10**6,
                        logging_steps=1, use_cpu=True, bf16=False, report_to=[], save_strategy="no", temperature=1.0,
                        disable_dropout=True, dataloader_num_workers=0, seed=args.seed, max_grad_norm=1.0,
                        adam_beta2=0.99, weight_decay=0.0)
    state = {"times": [], "t0": None, "curve": [], "trained": 0.0, "rewards": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, s, control, model=None, **kw):
            if args.budget_s:
                state["curve"].append((0.0, 0, accuracy(model)))

        def on_step_begin(self, a, s, control, **kw):
            state["t0"] = time.perf_counter()

        def on_step_end(self, a, s, control, model=None, **kw):
            dt = time.perf_counter() - state["t0"]
            state["times"].append(dt)
            state["trained"] += dt
            done = (state["trained"] >= args.budget_s) if args.budget_s else (s.global_step >= args.steps)
            if args.budget_s and (s.global_step % args.eval_every == 0 or done):
                state["curve"].append((state["trained"], s.global_step, accuracy(model)))
            if done:
                control.should_training_stop = True

        def on_log(self, a, s, control, logs=None, **kw):
            if logs and "reward" in logs:
                state["rewards"].append(logs["reward"])

    trainer = GRPOTrainer(model=model, reward_funcs=[math_reward], args=config, train_dataset=train,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"step_times": state["times"], "peak_rss_mb": _rss_mb(), "rss_after_imports_mb": after_imports,
            "curve": state["curve"], "rewards": state["rewards"]}


# ----------------------------------------------------------------------------------------------- parent
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory (tasks, SFT checkpoint, runs, results.json)")
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=6, help="steps timed per trainer (part 1)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=0.0, help="part 2: wall seconds of training per trainer (0 = skip)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-rows", type=int, default=100)
    p.add_argument("--which", default="ours,trl")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--tasks", help=argparse.SUPPRESS)
    p.add_argument("--sft", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        result = run_ours(args) if args.child == "ours" else run_trl(args)
        Path(args.out, f"{args.child}.json").write_text(json.dumps(result))
        return 0

    work = Path(args.work)
    tasks, sft = work / "tasks", work / f"sft{args.sft_steps}"
    if not (tasks / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "alignment.tasks", "build", "--out", str(tasks)], check=True, cwd=ROOT,
                       capture_output=True)
    if not (sft / "config.json").exists():
        import torch

        from alignment.grpo.tiny import tiny_sft_checkpoint

        torch.set_num_threads(1)
        acc = tiny_sft_checkpoint(tasks, sft, steps=args.sft_steps)
        (sft / "heldout_accuracy.txt").write_text(f"{acc}\n")
    print(f"SFT checkpoint {sft}: held-out greedy accuracy {(sft / 'heldout_accuracy.txt').read_text().strip()}")
    results = {}
    for name in args.which.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--tasks", str(tasks), "--sft", str(sft), "--out", str(work),
               "--work", str(work)]
        for key in ("steps", "prompts", "group", "max_new_tokens", "lr", "seed", "budget_s", "eval_every", "eval_rows"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-4000:]}")
            continue
        results[name] = json.loads((work / f"{name}.json").read_text())
        results[name]["process_wall_s"] = time.time() - t0

    print(f"\nP={args.prompts} prompts × G={args.group}, max_new_tokens={args.max_new_tokens}, μ=1, β=0.04, 1 thread")
    print(f"{'trainer':8} {'median s/step':>14} {'mean s/step':>12} {'peak RSS MB':>12} {'RSS after imports':>18}")
    for name, r in results.items():
        t = r["step_times"][1:] or r["step_times"]
        print(f"{name:8} {statistics.median(t):14.3f} {statistics.mean(t):12.3f} {r['peak_rss_mb']:12.0f} "
              f"{r['rss_after_imports_mb']:18.0f}")
    if "ours" in results and "trl" in results:
        speed = statistics.median(results["trl"]["step_times"][1:]) / statistics.median(results["ours"]["step_times"][1:])
        print(f"speed-up (TRL median / ours median): {speed:.2f}x")
    if args.budget_s:
        for name, r in results.items():
            print(f"{name} held-out accuracy over training time: "
                  + ", ".join(f"{t:.0f}s/step {s}: {a:.3f}" for t, s, a in r["curve"]))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
