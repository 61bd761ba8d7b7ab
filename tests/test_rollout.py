"""rollout/: the config, the native engine, weight sync helpers (LoRA merge) and the server client's
failure behaviour. vLLM itself: test_rollout_vllm.py (colocated) and test_rollout_server.py."""

from __future__ import annotations

import dataclasses
import http.server
import socket
import threading
import time

import pytest
import torch
from test_rollout_common import (
    assert_well_formed,
    make_checkpoint,
    max_logprob_error,
    perturb_,
)

from model import DeepseekV2ForCausalLM
from rollout import (
    PromptTooLongError,
    RolloutConfig,
    RolloutConfigError,
    RolloutServerError,
    SamplingConfig,
    build_engine,
    policy_state_dict,
)
from rollout.engine import RolloutGroup


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    return build_engine(RolloutConfig(backend="native", model=str(checkpoint), dtype="float32", max_model_len=256,
                                      max_num_seqs=6, return_routed_experts=True))


# ---------------------------------------------------------------------------- config
def test_config_unknown_and_ill_typed_keys_name_themselves(tmp_path):
    with pytest.raises(RolloutConfigError, match=r"recipe\.yaml: unknown key 'max_len'"):
        RolloutConfig.from_dict({"backend": "native", "max_len": 10}, source="recipe.yaml")
    with pytest.raises(RolloutConfigError, match=r"'max_model_len' of RolloutConfig is '2k'"):
        RolloutConfig.from_dict({"max_model_len": "2k"})
    with pytest.raises(RolloutConfigError, match="backend"):
        RolloutConfig.from_dict({"backend": "sglang"})
    with pytest.raises(RolloutConfigError, match="gpu_memory_utilization"):
        RolloutConfig(gpu_memory_utilization=1.5)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("rollout:\n  backend: native\n  dtype: float32\n  max_model_len: 512\n  vllm_kwargs: {swap_space: 1}\n")
    config = RolloutConfig.from_yaml(recipe)
    assert (config.backend, config.dtype, config.max_model_len, config.vllm_kwargs) == ("native", "float32", 512,
                                                                                         {"swap_space": 1})
    recipe.write_text("rollout:\n  backend: native\n  temprature: 0.7\n")
    with pytest.raises(RolloutConfigError, match=f"{recipe}: unknown key 'temprature'"):
        RolloutConfig.from_yaml(recipe)


# ---------------------------------------------------------------------------- native engine
def test_native_groups_shape_and_logprobs_match_recomputation(engine):
    prompts = [[1, 5, 6, 7], [1, 9], [1, 20, 21, 22, 23, 24, 25]]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3)
    groups = engine.generate_groups(prompts, group_size=4, sampling=sampling)
    assert_well_formed(groups, 3, 4, 12, stop_ids={2})
    assert [g.prompt_ids for g in groups] == prompts
    # 12 sequences in batches of max_num_seqs=6 with different seeds: the group's samples differ
    assert len({tuple(c.token_ids) for c in groups[0].completions}) > 1
    assert max_logprob_error(engine.model, groups) < 1e-4


def test_native_top_k_logprobs_are_the_truncated_distribution(engine):
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5, seed=1)
    groups = engine.generate_groups([[1, 5, 6, 7]], group_size=3, sampling=sampling)
    assert max_logprob_error(engine.model, groups, temperature=0.7, top_k=5) < 1e-4
    # and they are not the untruncated ones (the check above can tell the two apart)
    assert max_logprob_error(engine.model, groups, temperature=0.7) > 1e-2


def test_native_routed_experts_match_a_teacher_forced_pass(engine):
    group = engine.generate_groups([[1, 5, 6, 7]], group_size=2, sampling=SamplingConfig(max_new_tokens=6, seed=0))[0]
    cfg = engine.model.config
    for c in group.completions:
        ids = group.prompt_ids + c.token_ids
        assert c.routed_experts.shape == (len(ids) - 1, 2, cfg.num_experts_per_tok)
        with torch.no_grad():
            out = engine.model(input_ids=torch.tensor([ids[:-1]]), output_routing=True)
        expected_TLK = out.routed_experts[:, 0].permute(1, 0, 2)
        assert torch.equal(c.routed_experts.sort(-1).values, expected_TLK.sort(-1).values)


def test_native_stop_tokens_and_length(engine):
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    free = engine.generate_groups([[1, 5, 6, 7]], 1, greedy)[0].completions[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10  # (eos is not the greedy path here)
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    stopped = engine.generate_groups([[1, 5, 6, 7]], 2, dataclasses.replace(greedy, stop_token_ids=(stop,)))[0]
    for c in stopped.completions:
        assert c.token_ids == free.token_ids[:first + 1] and c.finish_reason == "stop"


def test_too_long_prompt_errors_or_truncates(checkpoint, engine):
    long_prompt = list(range(3, 250))
    with pytest.raises(PromptTooLongError, match=r"prompt 1 has 247 tokens.*max_model_len=256"):
        engine.generate_groups([[1, 2, 3], long_prompt], 1, SamplingConfig(max_new_tokens=16))
    truncating = build_engine(RolloutConfig(backend="native", model=str(checkpoint), dtype="float32",
                                            max_model_len=256, prompt_truncation="left"), model=engine.model)
    group = truncating.generate_groups([long_prompt], 1, SamplingConfig(max_new_tokens=16, temperature=0))[0]
    assert group.prompt_ids == long_prompt[-240:]


def test_text_and_chat_prompts_use_the_checkpoint_tokenizer(engine):
    tok = engine.tokenizer
    assert tok is not None
    groups = engine.generate_groups(["The sum of 3 and 4 is", [{"role": "user", "content": "What is 2 times 3?"}]],
                                    2, SamplingConfig(max_new_tokens=6, seed=0))
    assert groups[0].prompt_ids == tok("The sum of 3 and 4 is", add_special_tokens=False)["input_ids"]
    assert groups[0].prompt_text == "The sum of 3 and 4 is"
    assert groups[1].prompt_ids[0] == tok.bos_token_id and groups[1].prompt_text.endswith("<|assistant|>")
    for c in groups[1].completions:
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_native_update_weights_changes_the_sampled_distribution(checkpoint, engine):
    policy = DeepseekV2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    private = build_engine(RolloutConfig(backend="native", model=str(checkpoint), dtype="float32", max_model_len=256))
    sampling = SamplingConfig(max_new_tokens=8, seed=2)
    for step in range(2):
        perturb_(policy, seed=10 + step)
        private.update_weights(policy.state_dict())
        groups = private.generate_groups([[1, 5, 6, 7]], 2, sampling)
        assert max_logprob_error(policy, groups) < 1e-4
    assert private.weights_version == 2
    with pytest.raises(KeyError, match="not_a_param"):
        private.update_weights({"not_a_param": torch.zeros(1)})


# ---------------------------------------------------------------------------- weights helpers
def test_policy_state_dict_merges_lora_without_touching_the_peft_model(checkpoint):
    from peft import LoraConfig, get_peft_model

    base = DeepseekV2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    expected_keys = set(base.state_dict())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "kv_b_proj"],
                                                 init_lora_weights=False))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    merged = policy_state_dict(peft_model)
    assert set(merged) == expected_keys
    fresh = DeepseekV2ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - peft_logits).abs().max() > 1e-3  # the adapters matter
        fresh.load_state_dict(merged)
        torch.testing.assert_close(fresh(input_ids=ids).logits, peft_logits, atol=1e-5, rtol=1e-5)
        # the PEFT model is still unmerged and unchanged
        torch.testing.assert_close(peft_model(input_ids=ids).logits, peft_logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="LoRA weight"):
        policy_state_dict(peft_model.state_dict())


def test_rollout_group_round_trips_through_json(engine):
    group = engine.generate_groups([[1, 5, 6]], 2, SamplingConfig(max_new_tokens=4, seed=0))[0]
    again = RolloutGroup.from_dict(group.to_dict())
    assert again.prompt_ids == group.prompt_ids
    for a, b in zip(again.completions, group.completions):
        assert (a.token_ids, a.logprobs, a.finish_reason, a.text) == (b.token_ids, b.logprobs, b.finish_reason, b.text)
        assert torch.equal(a.routed_experts, b.routed_experts)


# ---------------------------------------------------------------------------- client failure behaviour
class _HangingHandler(http.server.BaseHTTPRequestHandler):
    """Answers /health, then never answers anything else (a wedged server)."""

    def do_GET(self):
        body = b'{"status": "ok", "backend": "vllm", "weights_version": 0, "max_model_len": 256}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.server.release.wait(timeout=30)

    def log_message(self, *args):
        pass


def test_client_fails_within_its_timeout_on_a_hung_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingHandler)
    server.daemon_threads = True
    server.release = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = build_engine(RolloutConfig(backend="vllm_server", server_url=url, request_timeout_s=2.0,
                                            max_retries=3, retry_backoff_s=0.1, startup_timeout_s=5))
        start = time.monotonic()
        with pytest.raises(RolloutServerError, match=r"/generate_groups failed after 1 attempt.*no answer in time"):
            client.generate_groups([[1, 2, 3]], 2, SamplingConfig(max_new_tokens=4))
        assert 1.9 < time.monotonic() - start < 4.0
        client.close()
    finally:
        server.release.set()
        server.shutdown()


def test_client_fails_fast_without_a_server():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match=f"127.0.0.1:{port} not healthy within 2s"):
        build_engine(RolloutConfig(backend="vllm_server", server_url=f"http://127.0.0.1:{port}", startup_timeout_s=2))
    assert time.monotonic() - start < 4.0
