"""The `eval:` section in every stage: the EvalRunner's schedule (step 0 with on_start, every N steps, per
evaluator periods, all evaluators at the last step), evals.jsonl, the stage's own log (GRPO metrics.jsonl,
the Trainer's log and TensorBoard), the rollout engine in the evaluators' context, and user callbacks
(on_step_end / on_evaluate / on_save). Tiny models, a few steps each, one thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignment.data import DataConfig
from alignment.evaluators import EvalConfig, EvaluatorSpec
from alignment.sft import LoggingConfig, ModelConfig, OutputConfig
from alignment.tasks.build import BuildConfig, TaskSizes, build_task_files
from tests.fixtures.user_evaluator import EventLog

SMALL_TASKS = TaskSizes(math_sft_train=64, math_grpo_train=32, math_test=8, code_train=8, code_test=4,
                        helpful_train=48, helpful_test=12, safety_train=8, safety_test=4, chat_train=8, chat_test=4,
                        stage2_prompts_train=8, stage2_prompts_test=4)
MICRO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32,
             qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=128,
             moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             rope_scaling=None)
PROBE = "tests.fixtures.user_evaluator:engine_probe"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    build_task_files(BuildConfig(out_dir=str(out), seed=0, sizes=SMALL_TASKS))
    return out


def _evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]


def _math_accuracy(tasks: Path) -> dict:
    return {"name": "math", "evaluator": "accuracy",
            "kwargs": {"files": [str(tasks / "math_grpo/test.jsonl")], "max_samples": 3, "max_new_tokens": 4}}


def test_grpo_stage_runs_the_eval_section_on_its_schedule_with_the_engine(tasks, tmp_path):
    from alignment.grpo_recipe import run_grpo_stage
    from alignment.recipes import load_recipe

    out = tmp_path / "grpo"
    recipe = {
        "stage": "grpo",
        "model": {"preset": "tiny", "tokenizer_path": str(tasks / "tokenizer"), "config_overrides": MICRO},
        "data": {"train_files": [str(tasks / "math_grpo/train.jsonl")]},
        "rollout": {"backend": "native", "dtype": "float32", "max_model_len": 256},
        "rewards": {"rewards": [{"name": "math"}]},
        "grpo": {"prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4, "max_steps": 3, "max_new_tokens": 4,
                 "save_every": 0, "progress_bar": False, "tensorboard": False, "beta": 0.0},
        "eval": {"every_steps": 2, "evaluators": [_math_accuracy(tasks), {"name": "probe", "evaluator": PROBE,
                                                                           "every_steps": 1}]},
        "output": {"output_dir": str(out)},
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _, config = load_recipe(path)
    log = EventLog()
    result = run_grpo_stage(config, callbacks=[log])

    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 1, 2, 3]  # on_start, probe every step, math every 2 and at the end
    assert [("eval/math/accuracy" in e) for e in evals] == [True, False, True, True]
    assert all(e["eval/probe/has_engine"] == 1.0 and e["eval/probe/step"] == e["step"] for e in evals)
    # The same results are logged with the step metrics (metrics.jsonl: step 0, then one line per step).
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    for line, e in zip(lines, evals):
        assert {k: line[k] for k in e if k.startswith("eval/") and "time_s" not in k} == \
            {k: v for k, v in e.items() if k.startswith("eval/") and "time_s" not in k}
    assert "reward/mean" in lines[1] and "reward/mean" not in lines[0]
    assert result.history[0]["eval/probe/step"] == 0.0
    # Callbacks: every evaluation, every step's metrics, the end-of-run checkpoint and the final model.
    assert log.steps("evaluate") == [0, 1, 2, 3]
    assert log.steps("step_end") == [1, 2, 3]
    step_metrics = [payload for name, _, payload in log.events if name == "step_end"]
    assert all("loss" in m for m in step_metrics) and "eval/math/accuracy" in step_metrics[1]
    saves = [(step, Path(payload)) for name, step, payload in log.events if name == "save"]
    assert saves == [(3, out / "checkpoints" / "step-3"), (3, out / "final")]
    assert all(path.is_dir() for _, path in saves)


def _sft_config(tasks: Path, out: Path, eval_config: EvalConfig):
    from alignment.sft import SFTConfig, SFTTrainingConfig

    return SFTConfig(
        model=ModelConfig(tokenizer_path=str(tasks / "tokenizer"), config_overrides=dict(MICRO)),
        data=DataConfig(train_files=[str(tasks / "math_sft/train.jsonl")], eval_files=[]),
        output=OutputConfig(output_dir=str(out), save_steps=2),
        training=SFTTrainingConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_steps=3, use_cpu=True,
                                   max_length=128),
        logging=LoggingConfig(logging_steps=1, progress_bar=False, tensorboard=True),
        eval=eval_config,
    )


def test_sft_runs_the_eval_section_through_a_trainer_callback(tasks, tmp_path):
    from alignment.sft import run_sft

    out = tmp_path / "sft"
    eval_config = EvalConfig(every_steps=2, evaluators=[
        EvaluatorSpec(**_math_accuracy(tasks)), EvaluatorSpec(name="probe", evaluator=PROBE, every_steps=1)])
    log = EventLog()
    result = run_sft(_sft_config(tasks, out, eval_config), eval_callbacks=[log])

    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 1, 2, 3]
    assert [("eval/math/accuracy" in e) for e in evals] == [True, False, True, True]
    assert all(e["eval/probe/has_engine"] == 0.0 and e["eval/probe/step"] == e["step"] for e in evals)
    # The Trainer's log holds them with its eval prefix (hence trainer_state.json and every tracker) ...
    logged = [h for h in result.log_history if any(k.startswith("eval_probe/") for k in h)]
    assert [h["step"] for h in logged] == [0, 1, 2, 3]
    assert logged[-1]["eval_math/accuracy"] == evals[-1]["eval/math/accuracy"]
    assert result.eval_metrics["eval_math/accuracy"] == evals[-1]["eval/math/accuracy"]
    # ... and TensorBoard files them under the GRPO stage's tag.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "runs")).Reload()
    assert [e.step for e in events.Scalars("eval/math/accuracy")] == [0, 2, 3]
    # User callbacks: the training logs (logging_steps=1), evaluations, the checkpoints (every 2 steps and
    # the last) and the final model.
    assert log.steps("evaluate") == [0, 1, 2, 3]
    assert log.steps("step_end") == [1, 2, 3]
    assert all("loss" in payload for name, _, payload in log.events if name == "step_end")
    assert [(s, p) for name, s, p in log.events if name == "save"] == [
        (2, str(out / "checkpoint-2")), (3, str(out / "checkpoint-3")), (3, str(out))]


def test_sft_stopped_early_skips_the_final_evaluation(tasks, tmp_path):
    from transformers import TrainerCallback

    from alignment.sft import run_sft

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 1

    out = tmp_path / "sft"
    eval_config = EvalConfig(on_start=False, evaluators=[EvaluatorSpec(name="probe", evaluator=PROBE)])
    result = run_sft(_sft_config(tasks, out, eval_config), extra_callbacks=[Stop()])
    assert result.global_step == 1 and not (out / "evals.jsonl").exists() and result.eval_metrics == {}


def test_reward_model_stage_evaluates_the_model_in_training(tasks, tmp_path):
    """rm_accuracy without a path scores the live model: at the last step it agrees exactly with the
    pairwise accuracy the stage computes on the saved model over the same held-out pairs."""
    from alignment.reward_model import RewardModelConfig, RewardTrainingConfig, run_reward_model

    out = tmp_path / "rm"
    test_file = str(tasks / "helpful_pairs/test.jsonl")
    config = RewardModelConfig(
        model=ModelConfig(tokenizer_path=str(tasks / "tokenizer"), config_overrides=dict(MICRO)),
        data=DataConfig(train_files=[str(tasks / "helpful_pairs/train.jsonl")], eval_files=[test_file]),
        output=OutputConfig(output_dir=str(out), save_steps=None),
        training=RewardTrainingConfig(learning_rate=3e-3, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                                      max_steps=4, use_cpu=True, seed=0),
        logging=LoggingConfig(logging_steps=2, progress_bar=False, tensorboard=False),
        eval=EvalConfig(every_steps=2, on_start=False, evaluators=[
            EvaluatorSpec(name="pairs", evaluator="rm_accuracy", kwargs={"files": [test_file], "batch_size": 16})]),
    )
    log = EventLog()
    result = run_reward_model(config, eval_callbacks=[log])

    evals = _evals(out)
    assert [e["step"] for e in evals] == [2, 4]
    assert evals[-1]["eval/pairs/pairwise_accuracy"] == pytest.approx(result.eval_metrics["pairwise_accuracy"])
    assert evals[0]["eval/pairs/mean_margin"] != evals[1]["eval/pairs/mean_margin"]  # the model it scores trains
    assert result.eval_metrics["eval_pairs/pairwise_accuracy"] == evals[-1]["eval/pairs/pairwise_accuracy"]
    assert log.steps("evaluate") == [2, 4] and log.steps("step_end") == [1, 2, 4]  # logging_first_step
    assert [(s, p) for name, s, p in log.events if name == "save"] == [(4, str(out))]


def test_callbacks_from_a_recipe_are_built_and_a_bad_one_is_named(tmp_path):
    from alignment.evaluators import EvalRunner
    from alignment.recipes import RecipeError, load_recipe

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}) + "\n")
    recipe = {"stage": "grpo", "model": {"preset": "tiny", "tokenizer_path": str(tmp_path)},
              "data": {"train_files": [str(data)]}, "rewards": {"rewards": [{"name": "math"}]},
              "eval": {"callbacks": ["tests.fixtures.user_evaluator:EventLog"]},
              "output": {"output_dir": str(tmp_path / "out")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _, config = load_recipe(path)
    runner = EvalRunner(config.eval, tmp_path / "out")
    assert [type(c) for c in runner.callbacks] == [EventLog]
    runner.saved(5, tmp_path / "ckpt")
    assert runner.callbacks[0].events == [("save", 5, str(tmp_path / "ckpt"))]
    for bad, message in (("tests.fixtures.user_evaluator:engine_probe", "not a subclass"),
                         ("tests.fixtures.nowhere:Log", "cannot import")):
        recipe["eval"]["callbacks"] = [bad]
        path.write_text(yaml.safe_dump(recipe))
        with pytest.raises(RecipeError, match=rf"eval\.callbacks\[0\].*{message}"):
            load_recipe(path)
