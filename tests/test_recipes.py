"""Recipe loading: every shipped recipe validates; broken recipes fail before any work, naming the key and file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment.recipes import RecipeError, load_recipe, read_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    stage, config = load_recipe(path, check_paths=False)
    assert stage in ("sft", "rm", "grpo")


def test_accelerate_configs_are_yaml_with_a_distributed_type():
    for path in (ROOT / "recipes" / "accelerate").glob("*.yaml"):
        assert "distributed_type" in yaml.safe_load(path.read_text()), path


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sft_recipe(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    tok = tmp_path / "tok"
    tok.mkdir()
    return {"stage": "sft", "model": {"preset": "tiny", "tokenizer_path": str(tok)},
            "data": {"train_files": [str(data)]}, "output": {"output_dir": str(tmp_path / "out")}}


def test_a_valid_recipe_loads_with_dotted_overrides(tmp_path, sft_recipe):
    path = _write(tmp_path, sft_recipe)
    stage, cfg = load_recipe(path, ["training.learning_rate=1e-4", "model.lora.r=4", "training.max_steps=3"])
    assert stage == "sft" and cfg.training.learning_rate == 1e-4 and cfg.model.lora.r == 4
    assert cfg.training.max_steps == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["training"].__setitem__("learning_rat", 1e-3), r"unknown key 'learning_rat'"),
    (lambda r: r["training"].__setitem__("max_steps", "ten"), r"key 'max_steps' .* is 'ten'"),
    (lambda r: r["data"].__setitem__("train_files", ["/nonexistent/train.jsonl"]),
     r"key 'data\.train_files': '/nonexistent/train\.jsonl' does not exist"),
    (lambda r: r.__setitem__("stage", "ppo"), r"key 'stage' is 'ppo'"),
    (lambda r: r.pop("output"), r"missing required key\(s\) output"),
])
def test_broken_recipes_name_the_key_and_the_file(tmp_path, sft_recipe, mutate, message):
    sft_recipe["training"] = {}
    mutate(sft_recipe)
    path = _write(tmp_path, sft_recipe)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_yaml_syntax_error_and_bad_override(tmp_path, sft_recipe):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_recipe(bad)
    path = _write(tmp_path, sft_recipe)
    with pytest.raises(RecipeError, match="dotted.key=value"):
        read_recipe(path, ["training.learning_rate"])


def test_cli_reports_the_error_and_exits_2(tmp_path, sft_recipe):
    sft_recipe["model"]["bogus"] = 1
    path = _write(tmp_path, sft_recipe)
    proc = subprocess.run([sys.executable, "-m", "alignment", "validate", str(path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown key 'bogus'" in proc.stderr and str(path) in proc.stderr


def test_report_writes_plots_and_a_summary(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(5):
            f.write(json.dumps({"step": step, "rewards/math/mean": 0.1 * step, "kl": 0.01 * step,
                                "entropy": 1.0 - 0.1 * step, "completion_length": 20 + step}) + "\n")
        f.write('{"step": 5, "kl": 0.0')  # a line cut by a crash is skipped
    with open(tmp_path / "evals.jsonl", "w") as f:
        f.write(json.dumps({"step": 4, "eval/math/accuracy": 0.5}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "alignment", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "report"
    for panel in ("reward", "kl", "entropy", "completion_length", "eval"):
        png = report / f"{panel}.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG", panel
    summary = (report / "summary.md").read_text()
    assert "| rewards/math/mean | 0 | 0.4 | 5 |" in summary


def _grpo_recipe(tmp_path, rewards):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}) + "\n")
    return {"stage": "grpo", "model": {"preset": "tiny", "tokenizer_path": str(tmp_path)},
            "data": {"train_files": [str(data)]}, "rewards": {"rewards": rewards},
            "output": {"output_dir": str(tmp_path / "out")}}


@pytest.mark.parametrize("rewards, message", [
    ([{"name": "no_such_reward"}], r"rewards\.rewards\[0\].*no_such_reward"),
    ([{"name": "math"}, {"name": "length", "kwargs": {"min_words": 3}}], r"rewards\.rewards\[1\].*'min_words'"),
])
def test_unregistered_reward_or_bad_reward_kwargs_is_named(tmp_path, rewards, message):
    path = _write(tmp_path, _grpo_recipe(tmp_path, rewards))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_user_reward_from_a_dotted_path_validates(tmp_path):
    path = _write(tmp_path, _grpo_recipe(tmp_path, [{"name": "mine", "reward": "rewards.rules:LengthBand",
                                                      "kwargs": {"min_length": 2}}]))
    stage, cfg = load_recipe(path)
    assert stage == "grpo" and cfg.rewards.rewards[0].reward == "rewards.rules:LengthBand"


def test_evaluators_are_checked_and_a_user_evaluator_from_a_dotted_path_runs(tmp_path):
    from alignment.evaluators import EvalRunner

    recipe = _grpo_recipe(tmp_path, [{"name": "math"}])
    recipe["eval"] = {"evaluators": [{"name": "mine", "evaluator": "tests.fixtures.user_evaluator:count_params",
                                      "kwargs": {"scale": 2.0}}]}
    stage, cfg = load_recipe(_write(tmp_path, recipe))
    runner = EvalRunner(cfg.eval, tmp_path / "run")
    import torch
    record = runner.run(torch.nn.Linear(3, 2), tokenizer=None, step=0)
    assert record["eval/mine/params"] == 16.0  # (3·2 + 2) · scale
    assert json.loads((tmp_path / "run" / "evals.jsonl").read_text())["eval/mine/params"] == 16.0
    recipe["eval"]["evaluators"][0]["kwargs"] = {"scael": 2.0}
    with pytest.raises(RecipeError, match=r"eval\.evaluators\[0\].*'scael'"):
        load_recipe(_write(tmp_path, recipe))
    recipe["eval"]["evaluators"][0]["evaluator"] = "no_such_evaluator"
    with pytest.raises(RecipeError, match="unknown evaluator 'no_such_evaluator'"):
        load_recipe(_write(tmp_path, recipe))
