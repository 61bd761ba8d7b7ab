"""GRPO loss and advantages against values computed by hand from DESIGN.md §3, element by element.

The expected numbers are built with plain Python loops over the formula (no shared code with
alignment/grpo/loss.py), for every aggregation, clip setting, ratio level and KL on/off.
"""

import math

import pytest
import torch

from alignment.grpo import (
    ConstantNorm,
    GRPOConfig,
    GRPOLoss,
    LossNormalizer,
    SequenceMean,
    TokenMean,
    group_advantages,
    overlong_soft_penalty,
    zero_variance_groups,
)

# Two sequences, lengths 3 and 2 (the second right-padded).
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]
OLD = [[-1.1, -0.9, -1.5], [-0.2, -1.25, 0.0]]
REF = [[-1.3, -0.4, -1.8], [-0.5, -1.0, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.5, -0.7]


def _tensors():
    return (torch.tensor(LOGP, dtype=torch.float64), torch.tensor(OLD, dtype=torch.float64),
            torch.tensor(REF, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64),
            torch.tensor(ADV, dtype=torch.float64))


def _by_hand(aggregation, eps_low, eps_high, beta, ratio_level="token", max_tokens=4):
    per_token = []  # [(seq, loss)]
    for i in range(2):
        n = sum(MASK[i])
        seq_log_ratio = sum(LOGP[i][t] - OLD[i][t] for t in range(n)) / n
        for t in range(n):
            r = math.exp(LOGP[i][t] - OLD[i][t]) if ratio_level == "token" else math.exp(seq_log_ratio)
            lo = 1 - eps_low if eps_low is not None else -math.inf
            hi = 1 + eps_high if eps_high is not None else math.inf
            clipped = min(max(r, lo), hi)
            s = min(r * ADV[i], clipped * ADV[i])
            d = REF[i][t] - LOGP[i][t]
            kl = math.exp(d) - d - 1
            per_token.append((i, -s + beta * kl))
    if aggregation == "sequence_mean":
        return sum(sum(v for j, v in per_token if j == i) / sum(MASK[i]) for i in range(2)) / 2
    if aggregation == "token_mean":
        return sum(v for _, v in per_token) / len(per_token)
    return sum(v for _, v in per_token) / (2 * max_tokens)


AGGREGATIONS = {"sequence_mean": SequenceMean(), "token_mean": TokenMean(), "constant": ConstantNorm(4)}


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.1, 0.28), (None, None), (0.05, 0.05)])
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_loss_matches_hand_computation(aggregation, clip, beta, ratio_level):
    logp, old, ref, mask, adv = _tensors()
    loss_fn = GRPOLoss(clip[0], clip[1], beta, AGGREGATIONS[aggregation], ratio_level)
    loss, metrics = loss_fn(logp, old, adv, mask, ref_logp_BT=ref if beta > 0 else None)
    expected = _by_hand(aggregation, clip[0], clip[1], beta, ratio_level)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert ("kl" in metrics) == (beta > 0)
    assert metrics["tokens"] == 5


def test_padding_values_do_not_matter():
    logp, old, ref, mask, adv = _tensors()
    logp2 = logp.clone()
    logp2[1, 2] = 123.0  # a padded position
    a, _ = GRPOLoss(0.2, 0.2, 0.1)(logp, old, adv, mask, ref_logp_BT=ref)
    b, _ = GRPOLoss(0.2, 0.2, 0.1)(logp2, old, adv, mask, ref_logp_BT=ref)
    assert a.item() == b.item()


def test_clip_fraction_counts_only_active_clips():
    logp, old, ref, mask, adv = _tensors()
    _, metrics = GRPOLoss(0.2, 0.2, 0.0)(logp, old, adv, mask)
    # Seq 0 (A>0): ratios e^0.1, e^0.4 (>1.2: clipped), e^-0.5. Seq 1 (A<0): e^-0.1, e^0.05: none below 0.8.
    assert metrics["clip/high_fraction"] == pytest.approx(1 / 5)
    assert metrics["clip/low_fraction"] == 0.0


def test_importance_weight_scales_the_surrogate_only():
    logp, old, ref, mask, adv = _tensors()
    w = torch.full_like(logp, 0.5)
    plain, _ = GRPOLoss(None, None, 0.0, TokenMean())(logp, old, adv, mask)
    weighted, metrics = GRPOLoss(None, None, 0.0, TokenMean())(logp, old, adv, mask, is_weight_BT=w)
    assert weighted.item() == pytest.approx(0.5 * plain.item(), abs=1e-12)
    assert metrics["tis/weight_mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_micro_batches_and_processes_sum_to_the_big_batch(aggregation):
    """Splitting the batch into micro-batches (and 'processes' whose grads are averaged) with the global
    normaliser gives the one-batch loss and gradient."""
    torch.manual_seed(0)
    B, T = 6, 5
    logp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = (logp.detach() + 0.1 * torch.randn(B, T, dtype=torch.float64))
    mask = (torch.rand(B, T) > 0.3).double()
    mask[:, 0] = 1
    adv = torch.randn(B, dtype=torch.float64)
    loss_fn = GRPOLoss(0.2, 0.28, 0.0, AGGREGATIONS[aggregation])
    full, _ = loss_fn(logp, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, logp)
    world = 2
    norm = LossNormalizer(num_sequences=B, num_tokens=float(mask.sum()), world_size=world)
    total, grad = 0.0, torch.zeros_like(logp)
    for rank in range(world):  # each process sees 3 sequences in micro-batches of 2 and 1
        rows = range(rank * 3, rank * 3 + 3)
        for micro in ([rows[0], rows[1]], [rows[2]]):
            part, _ = loss_fn(logp[micro], old[micro], adv[micro], mask[micro], norm)
            (g,) = torch.autograd.grad(part, logp)
            grad += g / world  # DDP averages over processes
            total += part.item() / world
    assert total == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(grad, g_full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "constant"])
def test_on_policy_gradient_is_reinforce_with_group_baseline(aggregation):
    """μ = 1 (old = current, detached), no clipping active: ∇loss = −Σ_i A_i Σ_t ∇logp_it · weight_i, the
    REINFORCE estimator with the group mean as baseline (weight = the aggregation's normaliser)."""
    torch.manual_seed(1)
    N, G, T, V, D = 2, 4, 5, 7, 3
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    h = torch.randn(N * G, T, D, dtype=torch.float64)
    tokens = torch.randint(0, V, (N * G, T))
    lengths = torch.tensor([5, 3, 4, 1, 2, 5, 5, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.9, 0.4, 0.4]], dtype=torch.float64)

    def logp_fn():
        return torch.log_softmax(h @ W.T, -1).gather(-1, tokens[..., None])[..., 0]

    adv = group_advantages(rewards, "group").flatten()
    loss_fn = GRPOLoss(0.2, 0.2, 0.0, AGGREGATIONS[aggregation] if aggregation != "constant" else ConstantNorm(T))
    logp = logp_fn()
    loss, metrics = loss_fn(logp, logp.detach(), adv, mask)
    assert metrics["clip/fraction"] == 0.0
    (g_loss,) = torch.autograd.grad(loss, W)

    # REINFORCE with the group baseline, written out: (r − mean_group) / std_group = A, per sequence.
    baseline = rewards.mean(1, keepdim=True)
    scale = rewards.std(1, keepdim=True, unbiased=False) + 1e-4
    A = ((rewards - baseline) / scale).flatten()
    logp = logp_fn()
    seq_logp = (logp * mask).sum(1)
    if aggregation == "sequence_mean":
        surrogate = (A * seq_logp / lengths).sum() / (N * G)
    elif aggregation == "token_mean":
        surrogate = (A * seq_logp).sum() / lengths.sum()
    else:
        surrogate = (A * seq_logp).sum() / (N * G * T)
    (g_reinforce,) = torch.autograd.grad(-surrogate, W)
    torch.testing.assert_close(g_loss, g_reinforce, rtol=1e-10, atol=1e-12)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    # group 0: mean .5, population std .5 -> ±1 ; group 1: mean 2, std sqrt(.5)
    a = group_advantages(r, "group", eps=0.0)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    s = math.sqrt(0.5)
    torch.testing.assert_close(a[1], torch.tensor([1 / s, -1 / s, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(r, "none"), torch.tensor([[.5, -.5, -.5, .5], [1., -1., 0., 0.]]))
    flat = r.flatten()
    batch_std = math.sqrt(sum((x - flat.mean().item()) ** 2 for x in flat.tolist()) / 8)
    torch.testing.assert_close(group_advantages(r, "batch", eps=0.0),
                               torch.tensor([[.5, -.5, -.5, .5], [1., -1., 0., 0.]]) / batch_std)
    # a zero-variance group gets 0, not nan
    assert group_advantages(torch.ones(1, 4)).abs().max() == 0


def test_zero_variance_and_overlong_penalty():
    assert zero_variance_groups(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])).tolist() == [True, False, True]
    pen = overlong_soft_penalty(torch.tensor([10, 12, 14, 16, 20]), max_new_tokens=16, cache=4)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0], dtype=torch.float64))


def test_config_rejects_unknown_and_illtyped_keys():
    from model.typed_config import ConfigError

    with pytest.raises(ConfigError, match="clip_eps"):
        GRPOConfig.from_dict({"clip_eps": 0.2}, "r.yaml")
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig.from_dict({"group_size": "8"}, "r.yaml")
    assert GRPOConfig.from_dict({"group_size": 4, "tis_cap": 2}).tis_cap == 2
