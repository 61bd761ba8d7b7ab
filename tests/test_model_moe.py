"""DeepSeekMoE: routing variants, the paper's balance losses, token dropping, routing replay."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.moe import (
    DeepSeekMoE,
    RoutedExperts,
    balance_losses,
    capacity_keep_mask,
    gate_weights,
    limited_topk,
)


def cfg(**kw):
    return DeepseekV2Config.preset("tiny", initializer_range=0.1, **kw)


def test_balance_losses_equal_the_paper_formulas_on_a_hand_computed_case():
    c = cfg(ep_size=2, max_devices_per_token=1, num_experts_per_tok=1, n_routed_experts=4)
    scores = torch.tensor([[[0.5, 0.2, 0.2, 0.1], [0.6, 0.1, 0.1, 0.2]],
                           [[0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]]])  # [B=2, T=2, E=4]
    ids = scores.argmax(-1, keepdim=True)
    valid = torch.tensor([[True, True], [True, False]])  # the last token is padding
    per_seq = balance_losses(scores, ids, valid, c, per_sequence=True)
    # seq 0: f = 4/(1·2)·[2,0,0,0], P = [.55,.15,.15,.15] → expert 2.2; devices {0,1},{2,3}:
    #   f' = [2, 0], P' = [.7, .3] → device 1.4; both tokens go to device 0: f'' = 2/(1·2)·[2,0] → comm 1.4
    # seq 1: one token to expert 3: f = [0,0,0,4], P = [.1,.1,.1,.7] → 2.8; f' = [0,2], P' = [.2,.8] → 1.6;
    #   f'' = 2/(1·1)·[0,1] = [0,2] → 1.6
    assert per_seq["expert"].item() == pytest.approx((2.2 + 2.8) / 2)
    assert per_seq["device"].item() == pytest.approx((1.4 + 1.6) / 2)
    assert per_seq["comm"].item() == pytest.approx((1.4 + 1.6) / 2)
    batch = balance_losses(scores, ids, valid, c, per_sequence=False)
    # three valid tokens: counts [2,0,0,1], P = [1.2,.4,.4,1.0]/3
    assert batch["expert"].item() == pytest.approx(4 / 3 * (2 * 1.2 / 3 + 1.0 / 3))
    assert batch["device"].item() == pytest.approx(4 / 3 * (1.6 / 3) + 2 / 3 * (1.4 / 3))


def test_model_loss_adds_the_weighted_balance_losses_and_they_reach_the_gate():
    torch.manual_seed(0)
    c = cfg(aux_loss_alpha=0.01, device_balance_alpha=0.05, comm_balance_alpha=0.02, ep_size=2,
            max_devices_per_token=1, topk_method="device_limited_greedy")
    lm = DeepseekV2ForCausalLM(c).train()
    ids = torch.randint(3, 512, (2, 16))
    out = lm(ids, labels=ids)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    b = out.balance_losses
    expected = 0.01 * b["expert"] + 0.05 * b["device"] + 0.02 * b["comm"]
    torch.testing.assert_close(out.loss, ce + expected)
    assert all(v > 0 for v in b.values())
    lm.zero_grad()
    out.aux_loss.backward()
    assert lm.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    lm.eval()
    assert lm(ids).balance_losses is None  # training-only


@pytest.mark.parametrize("M", [1, 2])
def test_device_limited_routing_never_exceeds_M_devices(M):
    torch.manual_seed(0)
    c = cfg(n_routed_experts=16, num_experts_per_tok=4, ep_size=4, max_devices_per_token=M,
            topk_method="device_limited_greedy")
    scores = torch.randn(500, 16).softmax(-1)
    ids = limited_topk(scores, 4, *c.routing_groups)
    devices_per_token = torch.tensor([len(set((row // 4).tolist())) for row in ids])
    assert devices_per_token.max() <= M
    free = limited_topk(scores, 4, 1, 1)
    assert max(len(set((row // 4).tolist())) for row in free) > M  # the limit is doing something
    # and within the allowed devices the choice is the top-k
    for row_scores, row in zip(scores[:50], ids[:50]):
        allowed = set((row // 4).tolist())
        mask = torch.tensor([e // 4 in allowed for e in range(16)])
        assert set(row.tolist()) == set(row_scores.masked_fill(~mask, -1).topk(4).indices.tolist())


def test_group_limited_routing_picks_groups_by_their_best_expert():
    scores = torch.tensor([[0.05, 0.30, 0.10, 0.10, 0.20, 0.20, 0.05, 0.00]])
    # groups of 2: best = [0.30, 0.10, 0.20, 0.05]; top-2 groups = {0, 2}; top-2 experts inside: 1, then 4 or 5
    ids = limited_topk(scores, 2, 4, 2)[0].tolist()
    assert ids[0] == 1 and ids[1] in (4, 5)
    # plain greedy would take 1 and one of 4/5 too, so check a case where groups matter:
    scores = torch.tensor([[0.26, 0.0, 0.25, 0.24, 0.25, 0.0, 0.0, 0.0]])
    assert set(limited_topk(scores, 2, 4, 1)[0].tolist()) == {0, 1}  # only group 0 allowed
    assert set(limited_topk(scores, 2, 1, 1)[0].tolist()) == {0, 2} or {0, 4}


def test_token_dropping_drops_exactly_the_lowest_affinity_over_capacity():
    torch.manual_seed(0)
    c = cfg(ep_size=2, capacity_factor=0.6)
    N, K, E = 40, 2, 8
    scores = torch.randn(N, E).softmax(-1)
    ids = limited_topk(scores, K, 1, 1)
    valid = torch.ones(N, dtype=torch.bool)
    keep = capacity_keep_mask(scores, ids, valid, torch.zeros(N, dtype=torch.bool), c)
    cap = math.ceil(0.6 * N * K / 2)
    affinity = scores.gather(1, ids)
    device = ids // 4
    for d in range(2):
        on_d = device == d
        kept, dropped = affinity[on_d & keep], affinity[on_d & ~keep]
        assert kept.numel() == min(cap, int(on_d.sum()))
        if dropped.numel():
            assert kept.min() >= dropped.max()
    assert (~keep).any()


def test_exempt_sequences_are_never_dropped_while_capacity_allows():
    torch.manual_seed(1)
    c = cfg(ep_size=2, capacity_factor=0.6)
    B, T, K, E = 4, 10, 2, 8
    scores = torch.randn(B * T, E).softmax(-1)
    ids = limited_topk(scores, K, 1, 1)
    exempt = torch.zeros(B, dtype=torch.bool)
    exempt[2] = True
    keep = capacity_keep_mask(scores, ids, torch.ones(B * T, dtype=torch.bool), exempt.repeat_interleave(T), c)
    assert keep.view(B, T, K)[2].all()
    assert not keep.all()


def test_dropped_assignments_contribute_nothing():
    torch.manual_seed(0)
    moe = DeepSeekMoE(cfg(capacity_factor=0.25, ep_size=8))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 12, 96)
    valid = torch.ones(2, 12, dtype=torch.bool)
    moe.train()
    out, info = moe(x, valid)
    assert info.kept_NK is not None and (~info.kept_NK).any()
    weights = gate_weights(info.scores_NE, info.expert_ids_NK, moe.config) * info.kept_NK
    manual = moe.shared_experts(x).view(-1, 96).clone()
    for n in range(24):
        for k in range(2):
            e = info.expert_ids_NK[n, k]
            h = F.silu(x.view(-1, 96)[n] @ moe.experts.gate_proj[e].T) * (x.view(-1, 96)[n] @ moe.experts.up_proj[e].T)
            manual[n] += weights[n, k] * (h @ moe.experts.down_proj[e].T)
    torch.testing.assert_close(out.view(-1, 96), manual, atol=1e-5, rtol=1e-5)


def test_vectorised_experts_equal_a_per_token_loop_including_empty_experts():
    torch.manual_seed(0)
    experts = RoutedExperts(6, 16, 8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(9, 16, requires_grad=True)
    ids = torch.randint(0, 3, (9, 2))  # experts 3..5 stay empty
    w = torch.rand(9, 2)
    out = experts(x, ids, w)
    manual = torch.stack([
        sum(w[n, k] * ((F.silu(x[n] @ experts.gate_proj[ids[n, k]].T) * (x[n] @ experts.up_proj[ids[n, k]].T))
                       @ experts.down_proj[ids[n, k]].T) for k in range(2)) for n in range(9)])
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert experts.gate_proj.grad[3:].abs().sum() == 0 and experts.gate_proj.grad[:3].abs().sum() > 0


def test_norm_topk_prob_renormalises_without_the_scaling_factor():
    scores = torch.tensor([[0.5, 0.3, 0.2]])
    ids = torch.tensor([[0, 1]])
    normed = gate_weights(scores, ids, cfg(norm_topk_prob=True, routed_scaling_factor=16.0))
    torch.testing.assert_close(normed, torch.tensor([[0.625, 0.375]]))
    scaled = gate_weights(scores, ids, cfg(routed_scaling_factor=16.0))
    torch.testing.assert_close(scaled, torch.tensor([[8.0, 4.8]]))


def test_routing_replay_uses_the_recorded_experts():
    torch.manual_seed(0)
    lm = DeepseekV2ForCausalLM(cfg()).eval()
    ids = torch.randint(3, 512, (1, 10))
    with torch.no_grad():
        base = lm(ids, output_routing=True)
        same = lm(ids, routing_replay=base.routed_experts)
        torch.testing.assert_close(same.logits, base.logits)
        forced = (base.routed_experts + 1) % 8
        replayed = lm(ids, routing_replay=forced, output_routing=True)
        assert torch.equal(replayed.routed_experts, forced)
        assert (replayed.logits - base.logits).abs().max() > 1e-3
        partial = forced.clone()
        partial[:, :, -1] = -1  # not recorded: the gate decides
        mixed = lm(ids, routing_replay=partial, output_routing=True).routed_experts
        assert torch.equal(mixed[:, :, -1], base.routed_experts[:, :, -1])
        assert torch.equal(mixed[:, :, :-1], forced[:, :, :-1])
