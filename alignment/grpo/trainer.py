"""The GRPO loop on accelerate: rollout → rewards → advantages → policy update → weight sync → eval → checkpoint.

    trainer = GRPOTrainer(model, tokenizer, prompts, RewardPipeline(cfg), GRPOConfig(...),
                          RolloutConfig(backend="native"), output_dir="runs/stage1")
    result = trainer.train()            # resumes from output_dir's newest complete checkpoint
    # or, from recipe sections:
    result = run_grpo(model_cfg, data_cfg, rollout_cfg, rewards_cfg, grpo_cfg, "runs/stage1")

One step (`GRPOConfig.max_steps` of them):
1. Draw `prompts_per_step` prompts from the data stream (a seeded permutation per epoch; the position is
   checkpointed). Process r of W takes the r-th contiguous 1/W of them, so whole groups live on one process
   and group statistics need no communication.
2. Sample G completions per prompt with the rollout engine. With `seed_per_group` each group is seeded from
   (seed, stream position), so the samples do not depend on the number of processes.
3. Score with the stage's RewardPipeline (per-sample totals; per-component metrics); optional DAPO soft
   overlong penalty; dynamic sampling drops zero-variance groups and refills from the stream, then every
   process trims to the same number of groups (DDP needs equal micro-batch counts).
4. Advantages (advantages.py), padded tensors (batch.py), π_old logprobs (a no-grad pass, only when μ > 1;
   with μ = 1 π_old = π_θ detached), reference logprobs (β > 0).
5. μ optimizer steps, each over 1/μ of the batch in micro-batches with gradient accumulation; the loss is
   normalised by the counts of the whole part over all processes (loss.py), so the update equals one big
   batch on one process.
6. Weight sync to the engine (nothing to copy for the native engine on the live policy), evaluation
   (the EvalRunner's evaluators on their schedule, with the engine; plain eval hooks every `eval_every`
   steps), metrics, callbacks, atomic checkpoint (checkpointing.py).

Under an accelerate DeepSpeed launch (ZeRO-2 / ZeRO-3) the same loop runs on DeepSpeed's engine: zero.py
says what changes (engine step and clipping, no loss division by its accumulation steps, partitioned
building, gathered weights, the reference's own engine).

Departures from the paper / TRL, and why:
- Population std in the advantage (advantages.py).
- The MoE balance losses are off by default during RL (`balance_coef_*`): with a few hundred sequences per
  step they are noisy and pull against the policy gradient; the router keeps its SFT balance.
- The training forward runs the policy in train mode (balance losses, token dropping if configured) for
  π_old and π_θ alike, so the first update's ratio is exactly 1.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import zero
from .advantages import group_advantages, overlong_soft_penalty, zero_variance_groups
from .batch import PolicyLogprobs, RouterProbe, SequenceBatch, build_sequence_batch, moe_metrics
from .checkpointing import final_model_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import GRPOConfig
from .loss import GRPOLoss, LossNormalizer, make_aggregation
from .metrics import MetricsLogger

EvalHook = Callable[[Any, Any], dict[str, float]]
"""`hook(model, tokenizer) -> {name: value}` (alignment.evaluation's convention); logged as eval/<name>."""


class PromptStream:
    """Prompts in a seeded random order, epoch after epoch; `position` counts prompts drawn so far."""

    def __init__(self, dataset, seed: int, position: int = 0):
        if len(dataset) == 0:
            raise ValueError("the prompt dataset is empty")
        self.dataset, self.seed, self.position = dataset, seed, position
        self._perm: tuple[int, list[int]] | None = None

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, len(self.dataset))
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g).tolist())
        return self._perm[1][k]

    def take(self, count: int) -> list[tuple[int, dict]]:
        out = [(p, self.dataset[self._index(p)]) for p in range(self.position, self.position + count)]
        self.position += count
        return out


@dataclass
class GRPOResult:
    final_model_dir: str
    """Where the trained policy was saved (HF layout, tokenizer beside it; LoRA merged)."""
    steps: int
    """Rollout steps completed."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Metrics of every step run by this call (main process)."""


class GRPOTrainer:
    def __init__(self, model, tokenizer, train_dataset, reward_pipeline, config: GRPOConfig, rollout_config,
                 output_dir: str | Path, *, ref_model=None, eval_hooks: Sequence[EvalHook] = (), accelerator=None,
                 engine=None, reward_columns: Sequence[str] | None = None, eval_runner=None):
        self.config = config
        self.accelerator = accelerator or make_accelerator()
        self.zero_stage = zero.zero_stage(self.accelerator)
        """DeepSpeed ZeRO stage of the launch (zero.py), None on the DDP / single-process path."""
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.reward_pipeline = reward_pipeline
        self.eval_hooks = list(eval_hooks)
        self.eval_runner = eval_runner
        """alignment.evaluators.EvalRunner (a recipe's `eval:` section): evaluators, schedule, callbacks."""
        self.dataset = train_dataset
        self.reward_columns = (list(reward_columns) if reward_columns is not None
                               else [c for c in train_dataset.column_names if c != "prompt"])
        world = self.accelerator.num_processes
        if reward_pipeline is not None:
            reward_pipeline.check_columns(self.reward_columns, "the prompt dataset")
            if world > 1:  # `batch` / `running` reward normalisation over the whole step's batch, not each share
                acc = self.accelerator
                reward_pipeline.share_statistics(lambda values: acc.reduce(
                    torch.tensor(values, dtype=torch.float64, device=acc.device), "sum").tolist())
        if config.prompts_per_step % world:
            raise ValueError(f"grpo.prompts_per_step={config.prompts_per_step} must divide evenly over {world} processes")
        if config.routing_replay and not rollout_config.return_routed_experts:
            raise ValueError("grpo.routing_replay needs rollout.return_routed_experts: true")
        torch.manual_seed(config.seed)

        self.is_peft = hasattr(model, "get_base_model")
        self.ref_policy = None
        if config.beta > 0:
            if config.reference == "disable_adapter":
                if not self.is_peft:
                    raise ValueError("grpo.reference=disable_adapter needs a LoRA (PEFT) policy")
            else:  # a frozen copy of the starting policy (before any resume: the reference is the stage's start)
                if ref_model is None and zero.is_partitioned(model):
                    raise ValueError(
                        "grpo.reference=frozen_copy under ZeRO-3: a partitioned policy cannot be deep-copied; pass "
                        "ref_model (build_grpo_trainer builds it from the checkpoint), or use beta=0, or LoRA with "
                        "reference=disable_adapter")
                ref = ref_model if ref_model is not None else copy.deepcopy(model)
                ref.eval().requires_grad_(False)
                if not zero.is_partitioned(ref):  # ZeRO-3's partitioned reference gets its own engine below
                    ref.to(self.accelerator.device)  # the copy was taken before `prepare` moved the policy
                self.ref_policy = PolicyLogprobs(ref, config.temperature, config.logprob_chunk_size)
        self.model = model
        self.model.train()
        self.local_policy = PolicyLogprobs(model, config.temperature, config.logprob_chunk_size)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                           weight_decay=config.weight_decay, eps=config.adam_eps)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        if self.zero_stage is None:
            # Only the model is prepared (DDP); optimizer and schedule stay plain so that one `step()` is one step.
            self.policy = self.accelerator.prepare_model(self.local_policy)
        else:
            # DeepSpeed: the engine owns the optimizer step; `self.optimizer` stays the AdamW whose param groups
            # the ZeRO optimizer steps (the LambdaLR sets their lr). See zero.py.
            zero.configure(self.accelerator, config.micro_batch_size, config.max_grad_norm)
            self.policy, _ = self.accelerator.prepare(self.local_policy, self.optimizer)
            if self.zero_stage == 3:
                zero.register_external_parameters(self.local_policy)
                if self.ref_policy is not None and zero.is_partitioned(self.ref_policy):
                    self.ref_policy = zero.reference_engine(self.ref_policy, self.accelerator)
        self.loss_fn = GRPOLoss(config.clip_eps_low, config.clip_eps_high, config.beta,
                                make_aggregation(config.aggregation, config.max_new_tokens), config.ratio_level)
        self.router_probe = RouterProbe(model)

        self.rollout_config = rollout_config
        self.live_engine = engine is None and rollout_config.backend == "native" and rollout_config.model is None
        if engine is None:
            from rollout import build_engine

            engine = build_engine(rollout_config, model=model if self.live_engine else None, tokenizer=tokenizer)
        self.engine = engine
        if self.zero_stage == 3 and self.accelerator.num_processes > 1:
            self._refuse_main_only_forwards()
        self.stream = PromptStream(train_dataset, config.seed)
        self.step = 0

    def _refuse_main_only_forwards(self) -> None:
        """ZeRO-3 with several processes: every forward of the partitioned policy gathers its parameters from
        all processes, so every process must run the same forwards. Rollouts on the live policy do not (each
        process decodes until its own groups stop), nor do evaluation hooks (main process only)."""
        if self.live_engine:
            raise NotImplementedError(
                "ZeRO-3 with several processes and rollout.backend=native on the live policy: the processes decode "
                "different numbers of steps and a ZeRO-3 forward is collective. Use rollout.backend: vllm (each "
                "process's engine gets the gathered weights), a native engine on its own copy (rollout.model), or ZeRO-2")
        if self.eval_hooks:
            raise NotImplementedError("ZeRO-3 with several processes: eval hooks run the partitioned policy on the "
                                      "main process only; use the eval: section's evaluators (they use the engine)")

    # ------------------------------------------------------------------ rollouts and rewards
    def _sampling(self, seed: int):
        from model.generation import SamplingConfig

        c = self.config
        return SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                              top_k=c.top_k, seed=seed)

    def _generate(self, draws: list[tuple[int, dict]], round_index: int):
        c = self.config
        prompts = [row["prompt"] for _, row in draws]
        if c.seed_per_group:
            return [self.engine.generate_groups([p], c.group_size, self._sampling((c.seed << 32) + pos))[0]
                    for p, (pos, _) in zip(prompts, draws)]
        seed = (c.seed << 32) + (self.step * 64 + round_index) * self.accelerator.num_processes \
            + self.accelerator.process_index
        return self.engine.generate_groups(prompts, c.group_size, self._sampling(seed))

    def _score(self, groups, rows) -> tuple[torch.Tensor, dict[str, float], list[str]]:
        G = self.config.group_size
        prompts = [row["prompt"] for row in rows for _ in range(G)]
        texts = [comp.text if comp.text is not None else "" for g in groups for comp in g.completions]
        columns = {col: [row[col] for row in rows for _ in range(G)] for col in self.reward_columns}
        out = self.reward_pipeline(prompts, texts, **columns)
        rewards_NG = torch.tensor(out.totals, dtype=torch.float64).view(len(groups), G)
        return rewards_NG, out.metrics, texts

    def collect(self):
        """Rollouts + rewards for one step, dynamic sampling included. Returns (kept groups, their rewards
        [n, G], metrics); every process returns the same number of groups."""
        c, acc = self.config, self.accelerator
        local_n = c.prompts_per_step // acc.num_processes
        kept_groups, kept_rewards, sampled_rewards = [], [], []
        reward_metrics: dict[str, list[float]] = defaultdict(list)
        filtered = total_groups = 0
        lengths, truncated = [], []
        timers = defaultdict(float)
        samples = []
        round_index = 0
        while True:
            draws = self.stream.take(c.prompts_per_step)
            mine = draws[acc.process_index * local_n:(acc.process_index + 1) * local_n]
            t0 = time.perf_counter()
            groups = self._generate(mine, round_index)
            timers["time/rollout_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rewards_NG, rmetrics, texts = self._score(groups, [row for _, row in mine])
            timers["time/reward_s"] += time.perf_counter() - t0
            for k, v in rmetrics.items():
                reward_metrics[k].append(v)
            lengths_NG = torch.tensor([[len(x.token_ids) for x in g.completions] for g in groups])
            if c.overlong == "soft_penalty":
                rewards_NG = rewards_NG + overlong_soft_penalty(lengths_NG, c.max_new_tokens, c.overlong_cache,
                                                                c.overlong_penalty)
            lengths += lengths_NG.flatten().tolist()
            truncated += [x.finish_reason == "length" for g in groups for x in g.completions]
            sampled_rewards.append(rewards_NG)
            if len(samples) < c.log_completions:
                samples += [{"prompt": g.prompt_text, "completion": t, "reward": float(r)}
                            for g, t, r in zip([g for g in groups for _ in range(c.group_size)], texts,
                                               rewards_NG.flatten())][:c.log_completions - len(samples)]
            keep_N = ~zero_variance_groups(rewards_NG) if c.dynamic_sampling else torch.ones(len(groups), dtype=torch.bool)
            filtered += int((~keep_N).sum())
            total_groups += len(groups)
            kept_groups += [g for g, k in zip(groups, keep_N) if k]
            kept_rewards += [r for r, k in zip(rewards_NG, keep_N) if k]
            if not c.dynamic_sampling:
                break
            short = torch.tensor([local_n - len(kept_groups)], dtype=torch.long)
            if int(acc.reduce(short.to(acc.device), "max")) <= 0 or round_index >= c.max_refill_rounds:
                break
            round_index += 1
        n_keep = torch.tensor([min(len(kept_groups), local_n)], dtype=torch.long)
        if acc.num_processes > 1:  # accelerate's reduce has no "min"
            n_keep = n_keep.to(acc.device)
            torch.distributed.all_reduce(n_keep, torch.distributed.ReduceOp.MIN)
        n_keep = int(n_keep)
        kept_groups, kept_rewards = kept_groups[:n_keep], kept_rewards[:n_keep]
        all_rewards = torch.cat(sampled_rewards)
        metrics = {k: sum(v) / len(v) for k, v in reward_metrics.items()}
        metrics.update(timers)
        metrics.update({
            "reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std(unbiased=False)),
            "completion/length_mean": sum(lengths) / len(lengths), "completion/length_max": float(max(lengths)),
            "completion/truncated_share": sum(truncated) / len(truncated),
            "groups/filtered": float(filtered), "groups/filtered_share": filtered / total_groups,
            "groups/refill_rounds": float(round_index), "groups/trained": float(n_keep),
            "completion/tokens": float(sum(lengths)),
        })
        self._samples = samples
        rewards = torch.stack(kept_rewards) if kept_rewards else torch.zeros(0, c.group_size, dtype=torch.float64)
        return kept_groups, rewards, metrics

    # ------------------------------------------------------------------ tensors
    def build_batch(self, groups, rewards_NG: torch.Tensor) -> tuple[SequenceBatch, dict[str, float]]:
        c, acc = self.config, self.accelerator
        batch_std = None
        if c.advantage_scale == "batch":
            everything = acc.gather(rewards_NG.to(acc.device).float()) if acc.num_processes > 1 else rewards_NG
            batch_std = float(everything.double().std(unbiased=False))
        adv_NG = group_advantages(rewards_NG, c.advantage_scale, c.advantage_eps, batch_std)
        prompt_ids = [g.prompt_ids for g in groups for _ in g.completions]
        completion_ids = [x.token_ids for g in groups for x in g.completions]
        engine_logp = [x.logprobs for g in groups for x in g.completions]
        finish = [x.finish_reason for g in groups for x in g.completions]
        loss_rows = torch.tensor([not (c.overlong == "mask" and f == "length") for f in finish])
        routed = [x.routed_experts for g in groups for x in g.completions] if c.routing_replay else None
        if routed is not None and any(r is None for r in routed):
            raise RuntimeError("routing replay: the rollout engine returned no routed experts")
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        batch = build_sequence_batch(prompt_ids, completion_ids, engine_logp, adv_NG.flatten(), loss_rows, pad, routed)
        metrics = {"advantage/mean": float(adv_NG.mean()), "advantage/std": float(adv_NG.std(unbiased=False)),
                   "advantage/abs_max": float(adv_NG.abs().max()),
                   "completion/masked_share": float((~loss_rows).float().mean())}
        return batch, metrics

    def _forward(self, module, mb: SequenceBatch, with_entropy: bool):
        replay = mb.routing_replay_LBSK if self.config.routing_replay else None
        dev = self.accelerator.device
        move = lambda t: None if t is None else t.to(dev)
        return module(move(mb.input_ids_BS), move(mb.attention_mask_BS), move(mb.positions_BC), move(mb.targets_BC),
                      move(replay), with_entropy=with_entropy)

    def _micro_batches(self, batch: SequenceBatch) -> list[SequenceBatch]:
        m = self.config.micro_batch_size
        return [batch.select(slice(s, s + m)) for s in range(0, len(batch), m)]

    @torch.no_grad()
    def _precompute(self, batch: SequenceBatch) -> None:
        """π_old (μ > 1) and π_ref (β > 0) for the whole local batch, without gradients."""
        c = self.config
        need_old = c.updates_per_batch > 1
        need_ref = c.beta > 0
        if not (need_old or need_ref):
            return
        old, ref = [], []
        for mb in self._micro_batches(batch):
            if need_old:
                old.append(self._forward(self.local_policy, mb, False)[0].cpu())
            if need_ref:
                if self.ref_policy is not None:
                    ref.append(self._forward(self.ref_policy, mb, False)[0].cpu())
                else:
                    with self.model.disable_adapter():
                        ref.append(self._forward(self.local_policy, mb, False)[0].cpu())
        self.router_probe.pop()
        batch.old_logp_BC = torch.cat(old) if need_old else None
        batch.ref_logp_BC = torch.cat(ref) if need_ref else None

    # ------------------------------------------------------------------ update
    def update(self, batch: SequenceBatch) -> dict[str, float]:
        c, acc = self.config, self.accelerator
        sums: dict[str, float] = defaultdict(float)
        tokens_seen = 0.0
        mismatch = defaultdict(float)
        moe = defaultdict(list)
        part_size = math.ceil(len(batch) / c.updates_per_batch)
        grad_norms = []
        loss_total = 0.0
        for u in range(c.updates_per_batch):
            part = batch.select(slice(u * part_size, (u + 1) * part_size))
            counts = torch.tensor([float((part.mask_BC.sum(1) > 0).sum()), float(part.mask_BC.sum())], device=acc.device)
            if acc.num_processes > 1:
                counts = acc.reduce(counts, "sum")
            norm = LossNormalizer(float(counts[0]), float(counts[1]), acc.num_processes)
            micro = self._micro_batches(part) if len(part) else []
            for k, mb in enumerate(micro):
                last = k == len(micro) - 1
                if self.zero_stage is not None:
                    self.policy.set_gradient_accumulation_boundary(last)
                with nullcontext() if last or self.zero_stage is not None else acc.no_sync(self.policy):
                    first_pass = u == 0 or mb.old_logp_BC is None
                    logp_BC, entropy_BC, balance, routed = self._forward(self.policy, mb, with_entropy=first_pass)
                    dev = logp_BC.device
                    mask_BC = mb.mask_BC.to(dev)
                    old_BC = mb.old_logp_BC.to(dev) if mb.old_logp_BC is not None else logp_BC.detach()
                    engine_BC = mb.engine_logp_BC.to(dev)
                    is_weight = None
                    if c.tis_cap is not None:
                        is_weight = torch.exp(old_BC - engine_BC).clamp(max=c.tis_cap)
                    ref_BC = mb.ref_logp_BC.to(dev) if mb.ref_logp_BC is not None else None
                    loss, m = self.loss_fn(logp_BC, old_BC, mb.advantages_B.to(dev), mask_BC, norm, ref_BC, is_weight)
                    if balance is not None and (c.balance_coef_expert or c.balance_coef_device or c.balance_coef_comm):
                        share = float((mb.mask_BC.sum(1) > 0).sum()) * acc.num_processes / max(norm.num_sequences, 1.0)
                        aux = (c.balance_coef_expert * balance["expert"] + c.balance_coef_device * balance["device"]
                               + c.balance_coef_comm * balance["comm"])
                        loss = loss + share * aux
                    if self.zero_stage is None:
                        acc.backward(loss)
                    else:  # the loss is normalised over the whole batch already: DeepSpeed must not divide by its GAS
                        self.policy.backward(loss, scale_wrt_gas=False)
                n_tok = m.pop("tokens")
                tokens_seen += n_tok
                loss_total += float(loss.detach()) / c.updates_per_batch  # the mean over processes is the batch loss
                for key, value in m.items():
                    sums[key] += value * n_tok
                scores = self.router_probe.pop()
                if first_pass and n_tok > 0:
                    with torch.no_grad():
                        diff_BC = (old_BC - engine_BC) * mask_BC
                        mismatch["mismatch/abs_logp_diff"] += float(diff_BC.abs().sum())
                        d = (engine_BC - old_BC) * mask_BC
                        mismatch["mismatch/k3_kl"] += float(((torch.exp(d) - d - 1) * mask_BC).sum())
                        mismatch["entropy"] += float((entropy_BC * mask_BC).sum()) if entropy_BC is not None else 0.0
                        mismatch["_tokens"] += n_tok
                        valid = mb.attention_mask_BS.to(dev)
                        for key, v in moe_metrics(scores, routed, valid, self.model.config.n_routed_experts).items():
                            moe[key].append(v)
            if self.zero_stage is None:
                grad_norm = acc.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm) if c.max_grad_norm > 0 else None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            else:  # clipping (config gradient_clipping), step and zero_grad; nothing to step without a backward
                grad_norm = None
                if micro:
                    self.policy.step()
                    grad_norm = self.policy.get_global_grad_norm() if c.max_grad_norm > 0 else None
            if grad_norm is not None:
                grad_norms.append(float(grad_norm))
            self.scheduler.step()
        metrics = {k: v / max(tokens_seen, 1.0) for k, v in sums.items()}
        metrics.pop("ratio/max", None)
        t = mismatch.pop("_tokens", 0.0)
        metrics.update({k: v / max(t, 1.0) for k, v in mismatch.items()})
        metrics.update({k: sum(v) / len(v) for k, v in moe.items()})
        if grad_norms:
            metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["loss"] = loss_total
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    # ------------------------------------------------------------------ the loop
    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        acc = self.accelerator
        if acc.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=acc.device)
        values = acc.reduce(values, "mean")
        return dict(zip(keys, values.tolist()))

    def _trainer_state(self) -> dict:
        return {"step": self.step, "data_position": self.stream.position, "config": self.config.to_dict(),
                "num_processes": self.accelerator.num_processes}

    def _reward_state(self):
        return {"running": getattr(self.reward_pipeline, "_running", None),
                "failures_total": getattr(self.reward_pipeline, "failures_total", None)}

    def resume(self, checkpoint: str | Path | None = None) -> bool:
        """Load `checkpoint` (default: output_dir's newest complete one). False when there is none."""
        checkpoint = Path(checkpoint) if checkpoint is not None else latest_checkpoint(self.output_dir)
        if checkpoint is None:
            return False
        state, reward_state = load_checkpoint(self.accelerator, checkpoint, self.model, self.optimizer, self.scheduler,
                                              deepspeed=self.zero_stage is not None)
        self.step, self.stream.position = state["step"], state["data_position"]
        if reward_state is not None and reward_state.get("running") is not None:
            self.reward_pipeline._running = reward_state["running"]
            self.reward_pipeline.failures_total = reward_state["failures_total"]
        self.sync_engine()
        return True

    def full_state_dict(self, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: the policy's state dict gathered module by module (zero.gathered_state_dict; on the main
        process only unless `everywhere`); None where every process holds the whole parameters."""
        return zero.gathered_state_dict(self.model, everywhere) if self.zero_stage == 3 else None

    def sync_engine(self) -> None:
        """The policy's weights into a rollout engine that holds its own copy (vLLM, a separate native model).
        Under ZeRO-3 every process gathers the full weights (its engine needs them all), LoRA merged."""
        if self.live_engine:
            return
        state = self.full_state_dict(everywhere=True)
        if state is None:
            self.engine.update_weights(self.model)
        else:
            self.engine.update_weights(zero.rebuilt_peft(self.model, state) if self.is_peft else state)

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self._trainer_state(), self._reward_state(), self.config.keep_checkpoints,
                               deepspeed=self.zero_stage is not None, model_state=self.full_state_dict())

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """What is due at the current step, on the main process: the plain eval hooks (every
        `eval_every` steps, step 0 included) and the EvalRunner's evaluators (its schedule; `final`: all),
        which also write evals.jsonl. Every process must call it (the others wait)."""
        every = self.config.eval_every
        hooks_due = bool(self.eval_hooks) and every > 0 and self.step % every == 0
        runner_due = self.eval_runner is not None and self.eval_runner.due(self.step, final)
        out = {}
        if not (hooks_due or runner_due):
            return out
        if self.accelerator.is_main_process:
            for hook in self.eval_hooks if hooks_due else ():
                out.update({f"eval/{k}": float(v) for k, v in hook(self.model, self.tokenizer).items()})
            if runner_due:
                out.update(self.eval_runner.run(self.model, self.tokenizer, self.step, engine=self.engine, final=final))
            self.model.train()
        self.accelerator.wait_for_everyone()
        return out

    def train_step(self) -> dict[str, float]:
        t_start = time.perf_counter()
        groups, rewards_NG, metrics = self.collect()
        if len(groups):
            t0 = time.perf_counter()
            batch, batch_metrics = self.build_batch(groups, rewards_NG)
            self._precompute(batch)
            metrics.update(batch_metrics)
            metrics["time/logprobs_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.router_probe.active = True
            try:
                metrics.update(self.update(batch))
            finally:
                self.router_probe.active = False
            metrics["time/update_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.sync_engine()
        metrics["time/weight_sync_s"] = time.perf_counter() - t0
        self.step += 1
        metrics["time/step_s"] = time.perf_counter() - t_start
        metrics["tokens_per_s"] = metrics["completion/tokens"] / metrics["time/step_s"]
        return self._reduce_metrics(metrics)

    def train(self, resume: bool = True, max_steps: int | None = None) -> GRPOResult:
        """Run to `max_steps` (default the config's), resuming first when asked; returns the result."""
        c, acc = self.config, self.accelerator
        if resume:
            self.resume()
        total = max_steps if max_steps is not None else c.max_steps
        logger = MetricsLogger(self.output_dir, acc.is_main_process, total, self.step, c.tensorboard, c.progress_bar)
        history = []
        try:
            if self.step == 0:  # the starting point, logged as step 0
                self.sync_engine()
                start = self.evaluate()
                if start:
                    logger.log(0, start)
                    history.append(start)
            while self.step < total:
                metrics = self.train_step()
                metrics.update(self.evaluate(final=self.step == total))
                logger.log(self.step, metrics)
                if acc.is_main_process and self._samples:
                    self._write_samples()
                history.append(metrics)
                self._notify("step_end", metrics)
                if (c.save_every and self.step % c.save_every == 0) or self.step == total:
                    self._notify("saved", self.save())
        finally:
            logger.close()
        final = self.save_final()
        self._notify("saved", final)
        return GRPOResult(str(final), self.step, history)

    def _notify(self, event: str, arg) -> None:
        """The EvalRunner's callbacks (`step_end(step, metrics)` / `saved(step, path)`), main process only."""
        if self.eval_runner is not None and self.accelerator.is_main_process:
            getattr(self.eval_runner, event)(self.step, arg)

    def _write_samples(self) -> None:
        import json

        with open(self.output_dir / "completions.jsonl", "a") as f:
            for s in self._samples:
                f.write(json.dumps({"step": self.step, **s}) + "\n")

    def save_final(self) -> Path:
        """The trained policy in HF layout (LoRA merged) + tokenizer: what the next stage starts from."""
        final = final_model_dir(self.output_dir)
        state = self.full_state_dict()  # ZeRO-3: gathered onto the main process (every process takes part)
        if self.accelerator.is_main_process:
            model = self.model
            if self.is_peft and state is not None:
                model, state = zero.rebuilt_peft(model, state).merge_and_unload(), None
            elif self.is_peft:
                # Merge a copy: the live policy keeps its adapters. (Loading the merged weights into a copy
                # of get_base_model() does not work: peft wraps the base model's layers in place, so their
                # keys are `base_layer.weight` and a non-strict load skipped them all.)
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(final, state_dict=state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(final)
        self.accelerator.wait_for_everyone()
        return final

    def close(self) -> None:
        self.router_probe.close()
        self.engine.close()


def make_accelerator():
    """The trainer's Accelerator for the current launch. Without a GPU, `cpu=True` is what makes a `--multi_gpu`
    launch a gloo MULTI_CPU group (otherwise every process believes it is alone), but it also turns a DeepSpeed
    launch into MULTI_CPU: under DeepSpeed it is left off (DeepSpeed picks its CPU accelerator itself)."""
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    return Accelerator(cpu=not torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"))


def run_grpo(model_cfg, data_cfg, rollout_cfg, rewards_cfg, grpo_cfg: GRPOConfig, output_dir: str | Path, *,
             eval_hooks: Sequence[EvalHook] = (), resume: bool = True, required_columns: Sequence[str] = (),
             eval_runner=None) -> GRPOResult:
    """One GRPO stage from recipe sections: model (alignment.sft.ModelConfig), data (DataConfig, `prompt` +
    reward columns), rollout (RolloutConfig), rewards (RewardPipelineConfig), grpo (GRPOConfig).

    Stage chaining: stage 2 passes stage 1's `GRPOResult.final_model_dir` as model.name_or_path and its own
    rewards section. The reference policy (β > 0) is the model this stage starts from, also after a resume.
    """
    trainer = build_grpo_trainer(model_cfg, data_cfg, rollout_cfg, rewards_cfg, grpo_cfg, output_dir,
                                 eval_hooks=eval_hooks, required_columns=required_columns, eval_runner=eval_runner)
    try:
        return trainer.train(resume=resume)
    finally:
        trainer.close()


def build_grpo_trainer(model_cfg, data_cfg, rollout_cfg, rewards_cfg, grpo_cfg: GRPOConfig, output_dir: str | Path, *,
                       eval_hooks: Sequence[EvalHook] = (), required_columns: Sequence[str] = (),
                       eval_runner=None) -> GRPOTrainer:
    """`run_grpo`'s trainer (model, tokenizer, data, reward pipeline, rollout engine), before `train()`.

    The accelerator comes before the model: under an accelerate ZeRO-3 launch (zero3_init_flag) its DeepSpeed
    plugin registers the config with transformers, and only then is the model built partitioned (as in
    alignment.sft.build_sft_trainer). The frozen reference is then built a second time from the same
    checkpoint / seed (a partitioned model cannot be deep-copied; zero.py)."""
    from alignment.data import TRAIN_SPLIT, load_prompt_dataset
    from alignment.sft import apply_lora, build_deepseek, load_tokenizer
    from rewards.pipeline import RewardPipeline

    accelerator = make_accelerator()
    tokenizer = load_tokenizer(model_cfg)
    model = build_deepseek(model_cfg, tokenizer, grpo_cfg.seed)
    ref_model = None
    if grpo_cfg.beta > 0 and grpo_cfg.reference == "frozen_copy" and zero.is_partitioned(model):
        ref_model = build_deepseek(model_cfg, tokenizer, grpo_cfg.seed)  # the stage's starting weights, partitioned
    if model_cfg.lora is not None:
        # Not get_peft_model directly: apply_lora works around peft retargeting deepseek_v2 experts.
        model = apply_lora(model, model_cfg.lora, "CAUSAL_LM")
    if model_cfg.gradient_checkpointing:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).gradient_checkpointing_enable()
    dataset = load_prompt_dataset(data_cfg, required_columns)[TRAIN_SPLIT]
    if rollout_cfg.backend != "native" and rollout_cfg.model is None:
        if model_cfg.name_or_path is None:
            raise ValueError("rollout.model is unset and the model is built fresh: a vLLM engine needs a checkpoint dir")
        rollout_cfg = dataclasses.replace(rollout_cfg, model=model_cfg.name_or_path)
    return GRPOTrainer(model, tokenizer, dataset, RewardPipeline(rewards_cfg), grpo_cfg, rollout_cfg, output_dir,
                       ref_model=ref_model, eval_hooks=eval_hooks, accelerator=accelerator, eval_runner=eval_runner)
