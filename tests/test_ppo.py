"""PPO with a critic: GAE and the clipped value loss against float64 loops written from the
papers' formulas (Schulman et al. 2016 GAE, PPO2's value clipping), the trainer end to end, and
GRPO's loss against TRL's formulas as its documentation states them (TRL's own code as a second
oracle when trl is installed)."""
import pytest
import torch
from conftest import assert_close
from helpers import add_adapters, tiny_base, trainable

from qlora_fast.nn import disable_adapter
from qlora_fast.tokenizer import ByteTokenizer
from qlora_fast.train import PPOConfig, PPOTrainer
from qlora_fast.train.policy_gradient import gae_advantages, grpo_loss, value_loss, whiten
from qlora_fast.train.rewards import arithmetic_rewards, load_arithmetic_task


def random_mask(b, t):
    lengths = torch.randint(0, t + 1, (b,))
    lengths[0] = t  # one full row, and possibly empty ones
    return (torch.arange(t)[None, :] < lengths[:, None]).float()


def gae_f64(rewards, values, mask, gamma, lam):
    """GAE token by token in float64: reward on the last real token, V = 0 after the end."""
    b, t = values.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(mask[i].sum())
        running = 0.0
        for k in reversed(range(n)):
            r = float(rewards[i]) if k == n - 1 else 0.0
            v_next = float(values[i, k + 1]) if k + 1 < n else 0.0
            delta = r + gamma * v_next - float(values[i, k])
            running = delta + gamma * lam * running
            adv[i, k] = running
    returns = (adv + values.double()) * mask.double()
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_float64_loop(seed, gamma, lam):
    b, t = int(torch.randint(1, 7, ())), int(torch.randint(1, 11, ()))
    values = torch.randn(b, t) * 2
    rewards = torch.randn(b) + torch.randint(0, 2, (b,)) * 10.0  # heavy-tailed: some large rewards
    mask = random_mask(b, t)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    e_adv, e_ret = gae_f64(rewards, values, mask, gamma, lam)
    assert_close(adv, e_adv, atol=1e-5, rtol=1e-5)
    assert_close(ret, e_ret, atol=1e-5, rtol=1e-5)


def test_gae_special_cases():
    """lam = 1, gamma = 1: A_t = R - V_t (Monte-Carlo return minus the baseline); lam = 0:
    one-step TD errors."""
    values = torch.tensor([[0.5, 0.2, -1.0], [0.3, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([2.0, -1.0], dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert adv.tolist() == [[1.5, 1.8, 3.0], [-1.3, 0.0, 0.0]]
    assert ret.tolist() == [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]]
    adv, _ = gae_advantages(rewards, values, mask, 1.0, 0.0)
    assert_close(adv, torch.tensor([[-0.3, -1.2, 3.0], [-1.3, 0.0, 0.0]], dtype=torch.float64), atol=1e-12)


def test_value_loss_by_hand_and_whiten(seed):
    old = torch.tensor([0.0, 0.0, 1.0, 1.0])
    new = torch.tensor([0.5, -0.1, 2.0, 0.9])
    ret = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # Clip 0.2: clipped values 0.2, -0.1, 1.2, 0.9; loss 0.5 max(unclipped^2, clipped^2).
    expect = 0.5 * torch.tensor([max(0.25, 0.64), max(1.21, 1.21), max(4.0, 1.44), max(0.81, 0.81)])
    assert_close(value_loss(new, old, ret, clip=0.2), expect, atol=1e-6)
    assert_close(value_loss(new, old, ret, clip=None), 0.5 * (new - ret) ** 2, atol=0)
    x, mask = torch.randn(3, 5) * 4 + 2, random_mask(3, 5)
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert abs(float(real.mean())) < 1e-5 and (float(real.std()) == pytest.approx(1.0, abs=1e-4) or real.numel() < 2)
    assert (w[~mask.bool()] == 0).all()
    with pytest.raises(ValueError, match="gamma"):
        gae_advantages(torch.zeros(1), torch.zeros(1, 2), torch.ones(1, 2), gamma=1.5)
    with pytest.raises(ValueError, match="rewards"):
        gae_advantages(torch.zeros(2), torch.zeros(1, 2), torch.ones(1, 2))


# ------------------------------------------------------------------------------------------
# GRPO's loss == TRL's
# ------------------------------------------------------------------------------------------
def trl_loss_from_docs(lp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_completion_length):
    """TRL's GRPOTrainer loss as its documentation writes it (docs: "GRPO Trainer", "Loss types"):
    coef_1 = exp(logp - old_logp), coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high),
    per_token_loss = -min(coef_1 * A, coef_2 * A) + beta * (exp(ref - logp) - (ref - logp) - 1);
    "grpo": mean over each sequence's tokens, then over sequences; "dapo": sum over all tokens /
    number of active tokens; "dr_grpo": sum / (batch size * max_completion_length)."""
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    if beta != 0.0:
        per_token = per_token + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl_formulas(seed, loss_type, beta):
    b, t = 5, 9
    old = -torch.rand(b, t, dtype=torch.float64) * 3
    lp = (old + torch.randn(b, t, dtype=torch.float64)).requires_grad_(True)  # ratios far outside the clip
    ref = old + torch.randn(b, t, dtype=torch.float64) * 0.3
    adv = torch.randn(b, dtype=torch.float64)
    # at least half of each completion: a handful of tokens could leave the clip inactive by chance
    mask = (torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (b,))[:, None]).double()
    eps_low, eps_high = 0.2, 0.28
    expect = trl_loss_from_docs(lp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, t + 2)
    (g_expect,) = torch.autograd.grad(expect, lp)
    loss, stats = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, beta=beta, eps_low=eps_low, eps_high=eps_high,
                            loss_type=loss_type, max_length=t + 2)
    (g,) = torch.autograd.grad(loss, lp)
    assert stats.clip_fraction > 0.1  # the clip is active on a good share of the tokens
    assert_close(loss, expect, atol=1e-12, rtol=1e-12)
    assert_close(g, g_expect, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------
def make_ppo(model=None, seed=0, **overrides):
    fns, weights = arithmetic_rewards()
    options = dict(steps=3, prompts_per_step=8, max_new_tokens=4, lr=3e-2, value_lr=3e-2, beta=0.04,
                   reward_weights=weights, progress=False, seed=seed, optimizer="torch_adamw")
    options.update(overrides)
    model = model if model is not None else add_adapters(tiny_base(seed))
    return PPOTrainer(model, ByteTokenizer(), fns, load_arithmetic_task("train"), PPOConfig(**options))


def test_ppo_trains_policy_and_critic_and_leaves_the_reference(one_thread):
    base = tiny_base(2)
    probe = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = base(input_ids=probe).logits.clone()
    trainer = make_ppo(add_adapters(base), seed=2, num_iterations=2, grad_accum_steps=2)
    start = trainable(trainer.model)
    history = trainer.train()
    assert len(history) == 3 and all(h["value_loss"] == h["value_loss"] for h in history)
    assert trainer.value_head.weight.abs().sum() > 0  # the critic learned from zero
    assert any(not torch.equal(p, start[n]) for n, p in trainable(trainer.model).items())
    assert history[-1]["kl"] > 0.0
    with torch.no_grad(), disable_adapter(trainer.model):
        assert torch.equal(trainer.model(input_ids=probe).logits, reference)


def test_ppo_resume_restores_the_critic(one_thread, tmp_path):
    straight = make_ppo(seed=4, steps=2)
    straight.train()
    first = make_ppo(seed=4, steps=1, output_dir=str(tmp_path), save_every=1)
    first.train()
    resumed = make_ppo(seed=4, steps=2, output_dir=str(tmp_path))
    resumed.train(resume_from_checkpoint="latest")
    assert torch.equal(resumed.value_head.weight, straight.value_head.weight)
    s, r = trainable(straight.model), trainable(resumed.model)
    assert all(torch.equal(s[n], r[n]) for n in s)


def test_ppo_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        PPOConfig(gamma=2.0)
    with pytest.raises(ValueError, match="vf_coef"):
        PPOConfig(vf_coef=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        PPOConfig(group_size=0)
    from qlora_fast.train import GRPOConfig

    with pytest.raises(TypeError, match="PPOConfig"):
        PPOTrainer(add_adapters(tiny_base(0)), ByteTokenizer(), arithmetic_rewards()[0], load_arithmetic_task("train"),
                   GRPOConfig())


def test_ppo_checkpoint_whose_value_head_does_not_fit_changes_nothing(one_thread, tmp_path):
    """A value head of another shape is refused with ValueError before the policy, optimizer or
    critic are restored (it was loaded last, after them)."""
    import copy

    saver = make_ppo(seed=5, steps=2, output_dir=str(tmp_path), save_every=1)
    saver.train_step()
    saver.step = 1
    path = saver.save_checkpoint()
    state = torch.load(path, weights_only=True)
    w = state["extra"]["value_head"]["weight"]
    state["extra"]["value_head"]["weight"] = torch.randn(w.shape[0], w.shape[1] + 1)
    torch.save(state, path)

    trainer = make_ppo(seed=5, steps=2, output_dir=str(tmp_path))
    trainer.train_step()
    params, head = trainable(trainer.model), copy.deepcopy(trainer.value_head.state_dict())
    optim = copy.deepcopy(trainer.optimizer.state_dict())
    with pytest.raises(ValueError, match="value head does not fit"):
        trainer.load_checkpoint(path)
    assert all(torch.equal(params[n], p) for n, p in trainable(trainer.model).items())
    assert all(torch.equal(head[k], v) for k, v in trainer.value_head.state_dict().items())
    after = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(v, after[k][name]) for k, s in optim["state"].items() for name, v in s.items()
               if isinstance(v, torch.Tensor))
