"""Our DeepseekV2 vs transformers' DeepseekV2ForCausalLM on the same weights, in one run.

Prints, for the tiny preset and a ~100M-parameter config (CPU by default, CUDA if available):
  * forward+backward time and peak memory (each measured in a fresh subprocess: max RSS on the CPU,
    torch.cuda.max_memory_allocated on a GPU), and the ratios ours/theirs;
  * generation tokens/s: our latent-cache sampler vs transformers' `generate` (greedy, same prompts);
  * KV-cache bytes per token for v2, v2-lite and tiny against an MHA cache of the same heads.

    python benchmarks/model.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DeepseekV2Config, DeepseekV2ForCausalLM, kv_cache_bytes_per_token  # noqa: E402
from model.generation import SamplingConfig, generate  # noqa: E402

CONFIGS = {
    "tiny": dict(),
    "100M": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=12,
                 n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=512, intermediate_size=1536),
}


def build(name: str) -> DeepseekV2Config:
    return DeepseekV2Config.preset("tiny", **CONFIGS[name])


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(which: str, path: str):
    if which == "ours":
        return DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    import transformers

    return transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32)


def measure_train_step(which: str, path: str, batch: int, length: int, steps: int) -> dict:
    """Runs in a subprocess: fwd+bwd timing and peak memory of one implementation."""
    torch.manual_seed(0)
    dev = device()
    lm = _load(which, path).to(dev).train()
    ids = torch.randint(3, lm.config.vocab_size, (batch, length), device=dev)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    lm(input_ids=ids, labels=ids).loss.backward()  # warm-up
    lm.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        if dev == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        lm(input_ids=ids, labels=ids).loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        lm.zero_grad(set_to_none=True)
    if dev == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"time_s": sorted(times)[len(times) // 2], "peak_mb": peak_mb}


def measure_generation(path: str, prompts: list[list[int]], new_tokens: int) -> dict:
    dev = device()
    ours = _load("ours", path).to(dev).eval()
    theirs = _load("theirs", path).to(dev).eval()
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    generate(ours, prompts[:1], SamplingConfig(max_new_tokens=2, temperature=0))  # warm-up
    start = time.perf_counter()
    gens = generate(ours, prompts, cfg)
    ours_s = time.perf_counter() - start
    ours_tokens = sum(len(g.token_ids) for g in gens)
    batch = torch.tensor(prompts, device=dev)  # equal lengths: no padding differences
    with torch.no_grad():
        theirs.generate(batch[:1], max_new_tokens=2, do_sample=False)
        start = time.perf_counter()
        out = theirs.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        theirs_s = time.perf_counter() - start
    theirs_tokens = (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return {"ours_tok_s": ours_tokens / ours_s, "theirs_tok_s": theirs_tokens / theirs_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny config only, fewer steps")
    parser.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        which, path, batch, length, steps = args._child
        print(json.dumps(measure_train_step(which, path, int(batch), int(length), int(steps))))
        return
    names = ["tiny"] if args.quick else ["tiny", "100M"]
    print(f"device: {device()}, torch threads: {torch.get_num_threads()}")
    print("\n## forward+backward (fp32), same weights")
    print("| config | params | batch×len | ours s | theirs s | time ours/theirs | ours MB | theirs MB | mem ours/theirs |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen_rows = []
    for name in names:
        cfg = build(name)
        torch.manual_seed(0)
        lm = DeepseekV2ForCausalLM(cfg)
        params = sum(p.numel() for p in lm.parameters())
        with tempfile.TemporaryDirectory() as path:
            lm.save_pretrained(path)
            del lm
            batch, length, steps = (8, 128, 5) if name == "tiny" else (4, 256, 3)
            res = {}
            for which in ("ours", "theirs"):
                out = subprocess.run([sys.executable, __file__, "--_child", which, path, str(batch), str(length),
                                      str(steps)], capture_output=True, text=True, check=True)
                res[which] = json.loads(out.stdout.strip().splitlines()[-1])
            o, t = res["ours"], res["theirs"]
            print(f"| {name} | {params / 1e6:.1f}M | {batch}×{length} | {o['time_s']:.3f} | {t['time_s']:.3f} | "
                  f"{o['time_s'] / t['time_s']:.2f} | {o['peak_mb']:.0f} | {t['peak_mb']:.0f} | "
                  f"{o['peak_mb'] / max(t['peak_mb'], 1e-9):.2f} |")
            g = torch.Generator().manual_seed(0)
            prompts = torch.randint(3, cfg.vocab_size, (8, 16), generator=g).tolist()
            gen = measure_generation(path, prompts, 32 if name == "tiny" else 16)
            gen_rows.append((name, gen))
    print("\n## greedy generation, batch 8, prompt 16 (tokens/s)")
    print("| config | ours (latent cache) | transformers generate | ratio |")
    print("|---|---|---|---|")
    for name, gen in gen_rows:
        print(f"| {name} | {gen['ours_tok_s']:.0f} | {gen['theirs_tok_s']:.0f} | "
              f"{gen['ours_tok_s'] / gen['theirs_tok_s']:.2f} |")
    print("\n## KV cache per token, all layers, bf16")
    print("| config | MLA latent bytes | MHA bytes (same heads) | MHA / MLA |")
    print("|---|---|---|---|")
    for preset in ("v2", "v2-lite", "tiny"):
        b = kv_cache_bytes_per_token(DeepseekV2Config.preset(preset))
        print(f"| {preset} | {b['mla']:,} | {b['mha']:,} | {b['mha'] / b['mla']:.1f}x |")


if __name__ == "__main__":
    main()
