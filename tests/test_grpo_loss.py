"""GRPO's policy-gradient pieces against hand computations from the papers' formulas
(DeepSeekMath GRPO, DAPO, Dr. GRPO) and against float64 autograd of an independent reference."""
import math
import statistics

import pytest
import torch
from conftest import assert_close

from qlora_fast.train.policy_gradient import (
    SequenceLogprobsFunction,
    group_advantages,
    grpo_loss,
    reinforce_loss,
    sequence_logprobs,
)


# ------------------------------------------------------------------------------------------
# Independent float64 reference, written token by token with explicit branches.
# ------------------------------------------------------------------------------------------
def grpo_loss_f64(logprobs, old, adv, mask, ref, beta, eps_low, eps_high, loss_type, max_length=None):
    lp, old, mask = logprobs.double(), old.double(), mask.double()
    adv = adv.double()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(lp)
    ratio = torch.exp(lp - old)
    clipped = torch.where(ratio > 1 + eps_high, torch.full_like(ratio, 1 + eps_high), ratio)
    clipped = torch.where(clipped < 1 - eps_low, torch.full_like(ratio, 1 - eps_low), clipped)
    unclipped_obj, clipped_obj = ratio * adv, clipped * adv
    obj = torch.where(unclipped_obj < clipped_obj, unclipped_obj, clipped_obj)
    per_token = -obj
    if beta > 0:
        r = ref.double()
        per_token = per_token + beta * (torch.exp(r - lp) - (r - lp) - 1)
    if loss_type == "grpo":
        return torch.stack([(per_token[i] * mask[i]).sum() / mask[i].sum() for i in range(lp.shape[0])]).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum()
    return (per_token * mask).sum() / (lp.shape[0] * (max_length or lp.shape[1]))


def random_mask(b, t):
    """Right-padded completion masks with lengths 1..t (every row has a token)."""
    lengths = torch.randint(1, t + 1, (b,))
    return (torch.arange(t)[None, :] < lengths[:, None]).float()


# ------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2, 3.0, 1.0, 2.0, 0.0])
    g = 4
    eps = 1e-4
    groups = [rewards[i : i + g].tolist() for i in range(0, 12, g)]
    expect_group, expect_none = [], []
    for grp in groups:
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
        expect_group += [(x - mean) / (std + eps) for x in grp]
        expect_none += [x - mean for x in grp]
    batch_std = statistics.stdev(rewards.tolist())
    expect_batch = [c / (batch_std + eps) for c in expect_none]
    assert_close(group_advantages(rewards, g), torch.tensor(expect_group), atol=1e-6)
    assert_close(group_advantages(rewards, g, scale="none"), torch.tensor(expect_none), atol=1e-6)
    assert_close(group_advantages(rewards, g, scale="batch"), torch.tensor(expect_batch), atol=1e-6)
    # A group whose rewards are all equal carries no signal: advantages exactly 0.
    assert group_advantages(rewards, g)[4:8].abs().max() == 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_random_matches_float64(seed, scale):
    g = int(torch.randint(2, 7, ()))
    n_groups = int(torch.randint(1, 6, ()))
    rewards = torch.randn(g * n_groups, dtype=torch.float64)
    grouped = rewards.view(n_groups, g)
    centred = grouped - grouped.sum(1, keepdim=True) / g
    if scale == "group":
        std = torch.sqrt((centred**2).sum(1, keepdim=True) / (g - 1))
        expect = centred / (std + 1e-4)
    elif scale == "batch":
        m = rewards.mean()
        expect = centred / (torch.sqrt(((rewards - m) ** 2).sum() / (rewards.numel() - 1)) + 1e-4)
    else:
        expect = centred
    out = group_advantages(rewards, g, scale=scale)
    assert out.dtype == torch.float32
    assert_close(out, expect.reshape(-1), atol=1e-5, rtol=1e-5)
    # Each group's advantages sum to zero (the group mean is the baseline).
    assert_close(out.view(n_groups, g).sum(1), torch.zeros(n_groups), atol=1e-5)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.ones(0), 2)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 2, scale="bogus")


# ------------------------------------------------------------------------------------------
# grpo_loss by hand
# ------------------------------------------------------------------------------------------
def _hand_case():
    """Two sequences of three tokens; ratios chosen to hit each clipping branch.

    Row 0, A=+1: ratios 1.5 (clip active: 1.2 counts), 0.5 (inactive: 0.5 < 0.8), 1.0.
    Row 1, A=-1: ratios 0.5 (clip active: -0.8 < -0.5), 1.5 (inactive: -1.5 < -1.2), padding.
    """
    ratios = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.3, -2.0]], dtype=torch.float64)
    logprobs = old + torch.log(ratios)
    ref = torch.tensor([[-1.2, -2.5, -0.4], [-0.6, -1.0, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    surrogate_loss = [[-1.2, -0.5, -1.0], [0.8, 1.5, None]]  # -min(r A, clip(r) A), by hand
    return logprobs, old, ref, mask, adv, surrogate_loss


def _k3(ref, lp):
    d = ref - lp
    return math.exp(d) - d - 1


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_by_hand(loss_type, beta):
    logprobs, old, ref, mask, adv, sl = _hand_case()
    per_tok = [[None] * 3 for _ in range(2)]
    for i in range(2):
        for t in range(3):
            if sl[i][t] is not None:
                per_tok[i][t] = sl[i][t] + beta * _k3(ref[i, t].item(), logprobs[i, t].item())
    if loss_type == "grpo":
        expect = ((per_tok[0][0] + per_tok[0][1] + per_tok[0][2]) / 3 + (per_tok[1][0] + per_tok[1][1]) / 2) / 2
    elif loss_type == "dapo":
        expect = (per_tok[0][0] + per_tok[0][1] + per_tok[0][2] + per_tok[1][0] + per_tok[1][1]) / 5
    else:  # Dr. GRPO: a constant B * max_length
        expect = (per_tok[0][0] + per_tok[0][1] + per_tok[0][2] + per_tok[1][0] + per_tok[1][1]) / (2 * 8)
    loss, stats = grpo_loss(
        logprobs, old, adv, mask, ref_logprobs=ref, beta=beta, eps_low=0.2, loss_type=loss_type, max_length=8
    )
    assert loss.item() == pytest.approx(expect, abs=1e-12)
    # Clip active on 2 of the 5 real tokens (row 0 token 0, row 1 token 0).
    assert stats.clip_fraction == pytest.approx(2 / 5)
    kl_tokens = [_k3(ref[i, t].item(), logprobs[i, t].item()) for i, t in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]]
    assert stats.kl == pytest.approx(sum(kl_tokens) / 5, abs=1e-12)
    assert stats.ratio_max == pytest.approx(1.5) and stats.ratio_min == pytest.approx(0.5)


def test_clip_higher_by_hand():
    """eps_high=0.6 lets the ratio-1.5, A>0 token through unclipped (DAPO's clip-higher)."""
    logprobs, old, ref, mask, adv, _ = _hand_case()
    loss, stats = grpo_loss(logprobs, old, adv, mask, eps_low=0.2, eps_high=0.6, loss_type="dapo")
    assert loss.item() == pytest.approx((-1.5 - 0.5 - 1.0 + 0.8 + 1.5) / 5, abs=1e-12)
    assert stats.clip_fraction == pytest.approx(1 / 5)


def test_clipped_tokens_have_zero_gradient():
    logprobs, old, _, mask, adv, _ = _hand_case()
    logprobs = logprobs.clone().requires_grad_(True)
    loss, _ = grpo_loss(logprobs, old, adv, mask, eps_low=0.2, loss_type="dapo")
    loss.backward()
    g = logprobs.grad
    assert g[0, 0] == 0 and g[1, 0] == 0 and g[1, 2] == 0  # clipped, clipped, padding
    # Unclipped: d(-r A)/d logp = -r A / n_tokens.
    assert g[0, 1].item() == pytest.approx(-0.5 / 5) and g[1, 1].item() == pytest.approx(1.5 / 5)


# ------------------------------------------------------------------------------------------
# grpo_loss against float64 autograd, random inputs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_high,token_adv", [(0.0, None, False), (0.1, 0.28, False), (0.05, None, True)])
def test_grpo_loss_and_grad_match_float64(seed, dtype, loss_type, beta, eps_high, token_adv):
    b, t = int(torch.randint(1, 7, ())), int(torch.randint(1, 13, ()))
    old = -torch.rand(b, t, dtype=torch.float64) * 3
    logprobs = (old + torch.randn(b, t, dtype=torch.float64) * 0.3).to(dtype).requires_grad_(True)
    ref = old + torch.randn(b, t, dtype=torch.float64) * 0.3
    adv = torch.randn(b, t) if token_adv else torch.randn(b)
    mask = random_mask(b, t)
    lp64 = logprobs.detach().double().requires_grad_(True)
    expect = grpo_loss_f64(lp64, old, adv, mask, ref, beta, 0.2, eps_high or 0.2, loss_type, max_length=t + 3)
    expect.backward()
    loss, _ = grpo_loss(
        logprobs, old.to(dtype), adv.to(dtype), mask.to(dtype), ref_logprobs=ref.to(dtype), beta=beta,
        eps_low=0.2, eps_high=eps_high, loss_type=loss_type, max_length=t + 3,
    )
    loss.backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(loss, expect, atol=tol, rtol=tol)
    assert_close(logprobs.grad, lp64.grad, atol=tol, rtol=tol)


def test_grpo_loss_gradcheck(seed):
    b, t = 3, 5
    old = -torch.rand(b, t, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(b, t, dtype=torch.float64)
    # Keep ratios away from the clip edges, where the loss has kinks.
    lp = (old + 0.05 * torch.randn(b, t, dtype=torch.float64)).requires_grad_(True)
    adv, mask = torch.randn(b, dtype=torch.float64), random_mask(b, t).double()
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        torch.autograd.gradcheck(
            lambda x: grpo_loss(x, old, adv, mask, ref_logprobs=ref, beta=0.3, loss_type=loss_type)[0], (lp,)
        )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_normalizer_makes_microbatches_sum_to_the_batch(seed, loss_type):
    b, t = 6, 7
    old = -torch.rand(b, t)
    lp = old + 0.3 * torch.randn(b, t)
    adv, mask = torch.randn(b), random_mask(b, t)
    full, _ = grpo_loss(lp, old, adv, mask, loss_type=loss_type, max_length=t)
    norm = {"grpo": b, "dapo": mask.sum(), "dr_grpo": b * t}[loss_type]
    parts = sum(
        grpo_loss(lp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], loss_type=loss_type, normalizer=norm)[
            0
        ]
        for i in range(0, b, 2)
    )
    assert_close(parts, full, atol=1e-6, rtol=1e-6)


def test_first_step_ratio_one_kl_zero(seed):
    """Sampling policy == policy == reference: ratio exactly 1, KL exactly 0, nothing clipped,
    and the gradient is the plain policy gradient -A / n per token."""
    b, t = 4, 9
    lp = (-torch.rand(b, t) * 4).requires_grad_(True)
    adv, mask = torch.randn(b), random_mask(b, t)
    loss, stats = grpo_loss(lp, lp.detach(), adv, mask, ref_logprobs=lp.detach(), beta=0.1, loss_type="dapo")
    assert stats.ratio_mean == 1.0 and stats.ratio_min == 1.0 and stats.ratio_max == 1.0
    assert stats.kl == 0.0 and stats.clip_fraction == 0.0
    loss.backward()
    assert_close(lp.grad, -adv[:, None] * mask / mask.sum(), atol=1e-7)


def test_grpo_loss_errors():
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, lp, torch.zeros(2), mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, lp, torch.zeros(2), mask, beta=0.1)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(lp, lp, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, lp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(lp, torch.zeros(2, 2), torch.zeros(2), mask)
    with pytest.raises(ValueError, match="eps_low"):
        grpo_loss(lp, lp, torch.zeros(2), mask, eps_low=-0.1)


# ------------------------------------------------------------------------------------------
# REINFORCE with baseline
# ------------------------------------------------------------------------------------------
def test_reinforce_loss_by_hand_and_grad(seed):
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = torch.tensor([1.0, 0.0])
    # Baseline = batch mean 0.5: -((0.5)(-6) + (-0.5)(-0.75)) / 2
    loss = reinforce_loss(lp, rewards, mask)
    assert loss.item() == pytest.approx(-(0.5 * -6.0 + -0.5 * -0.75) / 2)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-0.25, -0.25, -0.25], [0.25, 0.25, 0.0]]))
    assert reinforce_loss(lp, rewards, mask, baseline=0.0).item() == pytest.approx(3.0)
    per_seq = torch.tensor([2.0, -1.0])
    assert reinforce_loss(lp, rewards, mask, baseline=per_seq).item() == pytest.approx(-((-1) * -6.0 + 1 * -0.75) / 2)
    with pytest.raises(ValueError, match="rewards"):
        reinforce_loss(lp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="NaN"):
        reinforce_loss(lp, torch.tensor([1.0, float("nan")]), mask)


# ------------------------------------------------------------------------------------------
# Chunked sequence log-probs
# ------------------------------------------------------------------------------------------
def logprobs_f64(hidden, weight, bias, targets, temperature):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)])
def test_sequence_logprobs_matches_float64(seed, dtype, chunk_size, with_bias, temperature):
    b, t, h, v = int(torch.randint(1, 4, ())), int(torch.randint(1, 12, ())), 13, 37
    hidden = torch.randn(b, t, h).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h) / h**0.5).to(dtype).requires_grad_(True)
    bias = torch.randn(v).to(dtype).requires_grad_(True) if with_bias else None
    targets = torch.randint(0, v, (b, t))
    upstream = torch.randn(b, t, dtype=torch.float64)
    leaves64 = [x.detach().double().requires_grad_(True) for x in (hidden, weight) + ((bias,) if with_bias else ())]
    expect = logprobs_f64(leaves64[0], leaves64[1], leaves64[2] if with_bias else None, targets, temperature)
    (expect * upstream).sum().backward()

    out = sequence_logprobs(hidden, weight, targets, bias=bias, chunk_size=chunk_size, temperature=temperature)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == (b, t)
    (out * upstream.float()).sum().backward()
    # fp32 math inside, so only the inputs' own rounding (already in the f64 inputs) and fp32
    # accumulation separate us from float64; gradients are rounded once to the input dtype.
    assert_close(out, expect, atol=2e-5, rtol=2e-5)
    grad_tol = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    for mine, ref in zip(leaves, leaves64):
        assert mine.grad.dtype == dtype
        assert_close(mine.grad, ref.grad, atol=grad_tol, rtol=grad_tol)


def test_chunked_and_unchunked_agree(seed):
    """The issue's promise: chunking changes peak memory, not the numbers (loss and grads)."""
    hidden = torch.randn(3, 17, 24, requires_grad=True)
    weight = torch.randn(53, 24, requires_grad=True)
    targets = torch.randint(0, 53, (3, 17))
    mask, adv = random_mask(3, 17), torch.randn(3)
    shift = 0.1 * torch.randn(3, 17)
    results = []
    for chunk in (3, 10_000):
        hidden.grad = weight.grad = None
        out = sequence_logprobs(hidden, weight, targets, chunk_size=chunk)
        loss, _ = grpo_loss(out, out.detach() + shift, adv, mask, loss_type="grpo")
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    (l1, h1, w1), (l2, h2, w2) = results
    assert_close(l1, l2, atol=1e-6, rtol=1e-6)
    assert_close(h1, h2, atol=1e-6, rtol=1e-5)
    assert_close(w1, w2, atol=1e-6, rtol=1e-5)


def test_sequence_logprobs_gradcheck(seed):
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (10,))
    torch.autograd.gradcheck(
        lambda h, w, b: SequenceLogprobsFunction.apply(h.reshape(-1, 6), w, b, targets, 3, 0.9), (hidden, weight, bias)
    )


def test_sequence_logprobs_never_saves_logits():
    """What autograd keeps for backward: the inputs and one float per token, no (tokens x V)."""
    n, h, v = 64, 16, 1000
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    chunked = saved_bytes(lambda: sequence_logprobs(hidden, weight, targets, chunk_size=8))
    inputs = hidden.numel() * 4 + weight.numel() * 4 + targets.numel() * 8
    assert chunked <= inputs + n * 4
    plain = saved_bytes(lambda: torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]))
    assert plain >= n * v * 4  # the unchunked path stores the full logits


def test_sequence_logprobs_errors():
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="weight"):
        sequence_logprobs(h, torch.randn(5, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        sequence_logprobs(h, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        sequence_logprobs(h, w, torch.full((2, 3), 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs(h, w, torch.zeros(2, 3, dtype=torch.long), chunk_size=0)
    with pytest.raises(TypeError, match="hidden"):
        sequence_logprobs(torch.zeros(2, 3, 4, dtype=torch.long), w, torch.zeros(2, 3, dtype=torch.long))
