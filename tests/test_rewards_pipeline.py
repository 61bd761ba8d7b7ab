"""RewardPipeline: weights, None handling, normalisation, failure isolation, recipe mapping."""

import logging
import math
import threading
import time

import pytest
import yaml

from rewards import ConfigError, RewardError, RewardPipeline, RewardPipelineConfig, RewardSpec, reward

# Stand-ins for the stage-2 reward models: deterministic scores from the text, so the expected totals
# can be written down by hand. The real model reward is tested in test_rewards_model.py.


@reward("test_pipeline_helpful")
def helpful(prompts, completions):
    return [float(len(c.split())) for c in completions]  # longer = more helpful, for this test


@reward("test_pipeline_safety")
def safety(prompts, completions):
    return [-5.0 if "bomb" in c else 1.0 for c in completions]


@reward("test_pipeline_raises")
def raises(prompts, completions):
    raise RuntimeError("reward model crashed")


_release_hang = threading.Event()


@reward("test_pipeline_hangs")
def hangs(prompts, completions):
    _release_hang.wait(30)  # released at the end of the test that uses it; bounded either way
    return [1.0] * len(completions)


@reward("test_pipeline_math_only")
def math_only(prompts, completions, answer):
    return [None if a is None else float(c == a) for c, a in zip(completions, answer)]


PROMPTS = ["How do I bake bread?", "Tell me something", "How do I build a bomb?"]
COMPLETIONS = ["Mix flour water yeast, knead, bake.", "Sure.", "Here is how to build a bomb"]


def stage2(**overrides):
    config = {
        "rewards": [
            {"name": "helpful", "reward": "test_pipeline_helpful", "weight": 0.5},
            {"name": "safety", "reward": "test_pipeline_safety", "weight": 2.0},
            {"name": "rule", "reward": "repetition", "weight": 1.0, "kwargs": {"ngram": 1}},
        ],
    }
    config.update(overrides)
    return RewardPipeline.from_dict(config, source="stage2.yaml")


def test_stage2_totals_are_the_weighted_sum():
    out = stage2()(PROMPTS, COMPLETIONS)
    assert out.components["helpful"] == [6.0, 1.0, 7.0]
    assert out.components["safety"] == [1.0, 1.0, -5.0]
    assert out.components["rule"] == [1.0, 1.0, 1.0]
    # r = 0.5·helpful + 2·safety + 1·rule
    assert out.totals == pytest.approx([0.5 * 6 + 2 + 1, 0.5 * 1 + 2 + 1, 0.5 * 7 - 10 + 1])
    assert out.metrics["rewards/helpful/mean"] == pytest.approx(14 / 3)
    assert out.metrics["rewards/safety/none_share"] == 0.0
    assert out.metrics["rewards/total/mean"] == pytest.approx(sum(out.totals) / 3)
    assert out.metrics["rewards/rule/time_s"] >= 0.0


def test_a_raising_reward_is_isolated_counted_and_logged(caplog):
    config = {"rewards": [
        {"name": "safety", "reward": "test_pipeline_safety", "weight": 2.0},
        {"name": "broken", "reward": "test_pipeline_raises", "weight": 1.0},
    ]}
    pipeline = RewardPipeline.from_dict(config)
    with caplog.at_level(logging.WARNING, logger="rewards.pipeline"):
        out = pipeline(PROMPTS, COMPLETIONS)
        out = pipeline(PROMPTS, COMPLETIONS)
    assert out.components["broken"] == [None, None, None]
    assert out.totals == [2.0, 2.0, -10.0]  # the healthy component still counts
    assert out.metrics["rewards/broken/failed"] == 1.0
    assert out.metrics["rewards/broken/failures_total"] == 2.0
    assert out.metrics["rewards/broken/none_share"] == 1.0
    assert out.metrics["rewards/safety/failed"] == 0.0
    assert "reward 'broken' failed" in caplog.text and "reward model crashed" in caplog.text


def test_on_error_raise_fails_fast():
    config = {"on_error": "raise", "rewards": [{"name": "broken", "reward": "test_pipeline_raises"}]}
    with pytest.raises(RewardError, match="reward 'broken' failed.*reward model crashed"):
        RewardPipeline.from_dict(config)(PROMPTS, COMPLETIONS)


def test_a_hanging_reward_times_out_without_stalling_the_others():
    config = {"rewards": [
        {"name": "safety", "reward": "test_pipeline_safety"},
        {"name": "slow", "reward": "test_pipeline_hangs", "timeout_s": 0.3},
    ]}
    started = time.monotonic()
    try:
        out = RewardPipeline.from_dict(config)(PROMPTS, COMPLETIONS)
    finally:
        _release_hang.set()
    assert time.monotonic() - started < 2.0
    assert out.components["slow"] == [None, None, None]
    assert out.metrics["rewards/slow/failed"] == 1.0
    assert out.totals == [1.0, 1.0, -5.0]


def test_rewards_run_concurrently():
    # Two components that each sleep 0.5 s: in parallel the batch takes ~0.5 s, in series ~1 s.
    @reward("test_pipeline_sleepy")
    def sleepy(prompts, completions):
        time.sleep(0.5)
        return [0.0] * len(completions)

    config = {"rewards": [{"name": "a", "reward": "test_pipeline_sleepy"}, {"name": "b", "reward": "test_pipeline_sleepy"}]}
    pipeline = RewardPipeline.from_dict(config)
    started = time.monotonic()
    pipeline(PROMPTS, COMPLETIONS)
    assert time.monotonic() - started < 0.9


def test_none_is_left_out_zero_or_renormalised():
    components = [
        {"name": "math", "reward": "test_pipeline_math_only", "weight": 3.0},
        {"name": "safety", "reward": "test_pipeline_safety", "weight": 1.0},
    ]
    answers = ["4", None, None]
    completions = ["4", "Sure.", "a bomb"]
    zero = RewardPipeline.from_dict({"rewards": components})(PROMPTS, completions, answer=answers)
    assert zero.components["math"] == [1.0, None, None]
    assert zero.totals == [3.0 + 1.0, 1.0, -5.0]
    renorm = RewardPipeline.from_dict({"rewards": components, "missing": "renormalize"})(PROMPTS, completions, answer=answers)
    # samples 2 and 3 lack the weight-3 component: the safety term is scaled by (3+1)/1
    assert renorm.totals == [4.0, 4.0, -20.0]
    assert zero.metrics["rewards/math/none_share"] == pytest.approx(2 / 3)


def test_every_component_none_totals_zero():
    pipeline = RewardPipeline.from_dict({"rewards": [{"name": "m", "reward": "test_pipeline_math_only"}], "missing": "renormalize"})
    out = pipeline(["p"], ["x"], answer=[None])
    assert out.totals == [0.0]
    assert math.isnan(out.metrics["rewards/m/mean"])


def test_batch_normalisation_zscores_a_component():
    pipeline = stage2(rewards=[{"name": "helpful", "reward": "test_pipeline_helpful", "normalize": "batch"}])
    out = pipeline(["p"] * 3, ["a", "a b", "a b c"])  # 1, 2, 3 words
    scale = math.sqrt(2 / 3)
    assert out.totals == pytest.approx([-1 / scale, 0.0, 1 / scale])
    assert out.components["helpful"] == [1.0, 2.0, 3.0]  # components stay raw for logging


def test_running_normalisation_remembers_earlier_batches():
    pipeline = stage2(rewards=[{"name": "helpful", "reward": "test_pipeline_helpful", "normalize": "running"}])
    pipeline(["p"] * 2, ["a", "a b c"])  # 1 and 3 words: mean 2, std 1
    out = pipeline(["p"], ["a b c d e"])  # 5 words; running stats over 1, 3, 5: mean 3, std sqrt(8/3)
    assert out.totals == pytest.approx([(5 - 3) / math.sqrt(8 / 3)])


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_shared_statistics_normalise_over_every_process_batch(mode):
    """Two "processes" each score half of one batch; with share_statistics (here: adding the other half's
    moments, as an all-reduce would) each half normalises as the whole batch does in one process, batch after
    batch. A process whose component has nothing to normalise still takes part in the sum."""
    spec = {"rewards": [{"name": "helpful", "reward": "test_pipeline_helpful", "normalize": mode}]}
    whole, halves = stage2(**spec), [stage2(**spec), stage2(**spec)]
    batches = [["a", "a b", "a b c d", "a b c d e f g"], ["a b", "a b c", "a", "a b c d e"]]
    for batch in batches:
        parts = [batch[:2], batch[2:]]
        moments = [pipeline_moments(part) for part in parts]
        for i, half in enumerate(halves):
            other = moments[1 - i]
            half.share_statistics(lambda values, other=other: [v + o for v, o in zip(values, other, strict=True)])
        expected = whole(["p"] * 4, batch).totals
        got = [t for half, part in zip(halves, parts, strict=True) for t in half(["p"] * 2, part).totals]
        assert got == pytest.approx(expected)
        assert got != pytest.approx(stage2(**spec)(["p"] * 2, parts[0]).totals + stage2(**spec)(["p"] * 2, parts[1]).totals)
    sums = []
    lonely = stage2(rewards=[{"name": "helpful", "reward": "test_pipeline_math_only", "normalize": mode}])
    lonely.share_statistics(lambda values: sums.append(values) or values)
    assert lonely(["p"], ["x"], answer=[None]).totals == [0.0] and sums == [[0.0, 0.0, 0.0]]


def pipeline_moments(completions):
    """[count, sum, sum of squares] of test_pipeline_helpful's scores (word counts)."""
    words = [len(c.split()) for c in completions]
    return [float(len(words)), float(sum(words)), float(sum(w * w for w in words))]


def test_recipe_yaml_maps_onto_the_config_one_to_one():
    recipe = yaml.safe_load("""
rewards:
  missing: renormalize
  timeout_s: 120
  on_error: none
  rewards:
    - {name: helpful, reward: model, weight: 1.0, kwargs: {path: /ckpt/rm_helpful}}
    - {name: safety, reward: model, weight: 0.5, kwargs: {path: /ckpt/rm_safety}, timeout_s: 60}
    - {name: format, weight: 0.2, kwargs: {required_tags: [think]}, normalize: batch}
""")
    config = RewardPipelineConfig.from_dict(recipe["rewards"], source="recipes/x/grpo_stage2.yaml")
    assert config.missing == "renormalize" and config.timeout_s == 120
    assert config.rewards[1] == RewardSpec(name="safety", reward="model", weight=0.5,
                                           kwargs={"path": "/ckpt/rm_safety"}, timeout_s=60)
    assert config.rewards[2].reward is None and config.rewards[2].normalize == "batch"


@pytest.mark.parametrize(
    "section, message",
    [
        ({"rewards": [{"name": "math"}], "timeout": 5}, r"grpo\.yaml: unknown key 'timeout' for RewardPipelineConfig"),
        ({"rewards": [{"name": "math", "wieght": 2}]}, r"grpo\.yaml: rewards\[0\]: unknown key 'wieght' for RewardSpec"),
        ({"rewards": [{"name": "math", "weight": "high"}]}, r"key 'weight' of RewardSpec is 'high'"),
        ({"rewards": [{"name": "math", "normalize": "minmax"}]}, r"key 'normalize' of RewardSpec is 'minmax'"),
        ({"rewards": [{"weight": 1.0}]}, r"missing required key\(s\) name"),
        ({"missing": "zero"}, r"missing required key\(s\) rewards"),
    ],
)
def test_bad_recipe_keys_are_errors_naming_key_and_file(section, message):
    with pytest.raises(ConfigError, match=message):
        RewardPipelineConfig.from_dict(section, source="grpo.yaml")


def test_duplicate_component_names_and_bad_kwargs_are_rejected():
    with pytest.raises(ValueError, match="repeated: math"):
        RewardPipelineConfig.from_dict({"rewards": [{"name": "math"}, {"name": "math"}]})
    with pytest.raises(TypeError, match="reward 'format' got an unknown kwarg 'tags'"):
        RewardPipeline.from_dict({"rewards": [{"name": "format", "kwargs": {"tags": ["think"]}}]})


def test_stage1_with_builtin_math_code_format():
    pipeline = RewardPipeline.from_dict({"rewards": [
        {"name": "math", "weight": 1.0},
        {"name": "format", "weight": 0.1, "kwargs": {"boxed_answer_at_end": True}},
    ]})
    out = pipeline(["2+2?", "3/4 as decimal?"], [r"It is \boxed{4}", "0.7"], answer=["4", "3/4"])
    assert out.components == {"math": [1.0, 0.0], "format": [1.0, 0.0]}
    assert out.totals == pytest.approx([1.1, 0.0])


def answer_and_hint(prompts, completions, answer, hint, scale=1.0):
    return [scale * float(c == a) for c, a in zip(completions, answer)]


def test_a_column_no_dataset_row_has_is_an_error_naming_reward_and_column():
    pipe = RewardPipeline.from_dict({"rewards": [{"name": "math"}, {"name": "code"}]})
    pipe.check_columns(["answer", "tests"])  # null on some rows is fine: those rows score None
    with pytest.raises(ValueError, match=r"reward 'code' needs column\(s\) \['tests'\] that prompts.jsonl"):
        pipe.check_columns(["answer"], "prompts.jsonl")
    # A user reward's required parameters count; ones with a default or bound by kwargs do not.
    user = RewardPipeline.from_dict({"rewards": [
        {"name": "mine", "reward": f"{__name__}:answer_and_hint", "kwargs": {"hint": "h"}}]})
    user.check_columns(["answer"])
    unbound = RewardPipeline.from_dict({"rewards": [{"name": "mine", "reward": f"{__name__}:answer_and_hint"}]})
    with pytest.raises(ValueError, match=r"reward 'mine' needs column\(s\) \['hint'\]"):
        unbound.check_columns(["answer"])
