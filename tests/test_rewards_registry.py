"""The plug-in API: decorator registration, kwargs checking, dotted paths, async rewards, entry points."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import ENTRY_POINT_GROUP, REGISTRY, call_reward, get_reward, reward

PLUGIN_SOURCE = Path(__file__).parent / "fixtures" / "rewards_plugin"


@reward("test_registry_contains")
def contains_word(prompts, completions, word: str = "yes"):
    return [1.0 if word in completion else 0.0 for completion in completions]


@reward("test_registry_async")
async def async_length(prompts, completions):
    return [float(len(completion)) for completion in completions]


def answer_echo(prompts, completions, answer):
    """Named only by dotted path; takes just the `answer` column."""
    return [1.0 if completion == gold else 0.0 for completion, gold in zip(completions, answer)]


def test_builtin_names_are_registered():
    assert {"math", "code", "format", "length", "language", "repetition", "model", "remote"} <= set(REGISTRY.names())


def test_function_reward_binds_kwargs_and_rejects_unknown_ones():
    fn = get_reward("test_registry_contains", word="cat")
    assert call_reward(fn, ["p", "p"], ["a cat", "a dog"]) == [1.0, 0.0]
    with pytest.raises(TypeError, match="unknown kwarg 'wrod'"):
        get_reward("test_registry_contains", wrod="cat")


def test_class_reward_rejects_unknown_kwargs_by_name():
    with pytest.raises(TypeError, match="reward 'repetition' got an unknown kwarg 'n_gram'"):
        get_reward("repetition", n_gram=3)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'.*math"):
        get_reward("no_such_reward")


def test_registering_a_second_object_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        reward("math")(lambda prompts, completions: [])


@pytest.mark.parametrize("path", [f"{__name__}:answer_echo", f"{__name__}.answer_echo"])
def test_dotted_path_reward_receives_only_the_columns_it_names(path):
    fn = get_reward(path)
    # `tests` is not a parameter of answer_echo: it must be filtered out, not passed.
    scores = call_reward(fn, ["p", "p"], ["4", "5"], answer=["4", "4"], tests=[[], []])
    assert scores == [1.0, 0.0]


def test_dotted_path_errors_name_the_missing_part():
    with pytest.raises(KeyError, match="has no 'nope'"):
        get_reward(f"{__name__}:nope")
    with pytest.raises(KeyError, match="cannot import module"):
        get_reward("no_such_package_xyz.module:fn")


def test_async_reward_is_awaited():
    assert call_reward(get_reward("test_registry_async"), ["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]


def test_call_reward_rejects_wrong_length_and_type():
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        call_reward(lambda prompts, completions: [1.0], ["p", "p"], ["a", "b"])
    with pytest.raises(TypeError, match="expected float or None"):
        call_reward(lambda prompts, completions: ["high"], ["p"], ["a"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        call_reward(lambda prompts, completions, **c: [1.0, 1.0], ["p", "p"], ["a", "b"], answer=["x"])


def test_reward_from_a_separately_installed_package_is_found_by_entry_point(tmp_path, monkeypatch):
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(PLUGIN_SOURCE, source)  # pip builds in place; keep tests/fixtures clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, timeout=120,
    )
    assert "exclamation" not in REGISTRY.names()
    monkeypatch.syspath_prepend(str(target))  # as if installed: its dist-info is now on sys.path
    assert "exclamation" in REGISTRY.names()
    fn = get_reward("exclamation", minimum=2)
    assert type(fn).__module__ == "latentalign_reward_plugin"
    assert call_reward(fn, ["p", "p"], ["wow!!", "ok!"]) == [1.0, 0.0]
    from importlib import metadata

    (entry_point,) = metadata.entry_points(group=ENTRY_POINT_GROUP, name="exclamation")
    assert entry_point.dist.name == "latentalign-reward-plugin"
