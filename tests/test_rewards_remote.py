"""`python -m rewards.serve` and the `remote` client, over loopback only, with bounded waits."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards import RemoteRewardError, RewardPipeline, call_reward, get_reward
from rewards.serve import parse_reward_arg

REPO = Path(__file__).resolve().parents[1]
COMPLETIONS = [r"\boxed{4}", "it is 5", r"<think>hm</think> \boxed{9}", "no idea", r"\boxed{\frac{1}{2}}"]
ANSWERS = ["4", "4", "9", "7", "0.5"]


def start_server(*reward_args: str) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "rewards.serve", "--port", "0"]
    for reward_arg in reward_args:
        args += ["--reward", reward_arg]
    server = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([server.stdout], [], [], 60)
    if not ready:
        server.kill()
        pytest.fail("reward server printed nothing within 60 s")
    line = server.stdout.readline()
    assert line.startswith("serving rewards"), line
    return server, line.split(" on ")[-1].strip()


@pytest.fixture(scope="module")
def server():
    process, url = start_server("math", 'think=format:{"required_tags": ["think"]}')
    yield process, url
    process.kill()
    process.wait(10)


def test_round_trip_matches_the_local_reward_in_chunks(server):
    _, url = server
    remote = get_reward("remote", url=url, reward="math", batch_size=2, timeout_s=30)
    prompts = ["q"] * len(COMPLETIONS)
    assert call_reward(remote, prompts, COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert call_reward(remote, prompts, COMPLETIONS, answer=ANSWERS) == call_reward(
        get_reward("math"), prompts, COMPLETIONS, answer=ANSWERS)


def test_an_alias_with_kwargs_is_served_and_usable_in_a_pipeline(server):
    _, url = server
    pipeline = RewardPipeline.from_dict({"rewards": [
        {"name": "math", "reward": "remote", "weight": 1.0, "kwargs": {"url": url, "reward": "math"}},
        {"name": "think", "reward": "remote", "weight": 0.5, "kwargs": {"url": url, "reward": "think"}},
    ]})
    out = pipeline(["q"] * len(COMPLETIONS), COMPLETIONS, answer=ANSWERS)
    assert out.components["think"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert out.totals == [1.0, 0.0, 1.5, 0.0, 1.0]


def test_server_errors_are_reported_not_retried(server):
    _, url = server
    with pytest.raises(RemoteRewardError, match="answered 404.*'helpful' is not served here"):
        get_reward("remote", url=url, reward="helpful")(["q"], ["a"])
    with pytest.raises(RemoteRewardError, match="answered 500.*column 'answer' has 1 values for 2"):
        get_reward("remote", url=url, reward="math", batch_size=8)(["q", "q"], ["a", "b"], answer=["4"])


def test_a_killed_server_gives_a_clear_error_within_the_timeout():
    process, url = start_server("length")
    remote = get_reward("remote", url=url, reward="length", timeout_s=2.0, retries=2, backoff_s=0.1)
    assert remote(["q"], ["a b"]) == [1.0]
    process.kill()
    process.wait(10)
    started = time.monotonic()
    with pytest.raises(RemoteRewardError, match=rf"reward server {url} .*unreachable after 3 attempts"):
        remote(["q"], ["a b"])
    assert time.monotonic() - started < 3 * 2.0 + 0.3


def test_a_frozen_server_times_out():
    process, url = start_server("length")
    try:
        os.kill(process.pid, signal.SIGSTOP)  # accepts connections (kernel backlog) but never answers
        remote = get_reward("remote", url=url, reward="length", timeout_s=0.5, retries=1, backoff_s=0.1)
        started = time.monotonic()
        with pytest.raises(RemoteRewardError, match="unreachable after 2 attempts of at most 0.5 s"):
            remote(["q"], ["a"])
        assert 1.0 <= time.monotonic() - started < 2 * 0.5 + 0.1 + 1.0
    finally:
        process.kill()
        process.wait(10)


def test_reward_argument_syntax():
    assert parse_reward_arg("math") == ("math", "math", {})
    assert parse_reward_arg('helpful=model:{"path": "/rm"}') == ("helpful", "model", {"path": "/rm"})
    assert parse_reward_arg("pkg.mod:fn") == ("pkg.mod:fn", "pkg.mod:fn", {})  # a dotted path keeps its colon
    assert parse_reward_arg('x=pkg.mod:fn:{"a": 1}') == ("x", "pkg.mod:fn", {"a": 1})
    with pytest.raises(Exception, match="not valid JSON"):
        parse_reward_arg("math:{oops")
