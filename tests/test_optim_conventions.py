"""qlora_fast.optim against torch.optim's conventions, where a user meets them: groups added or
refused, schedulers that set NumPy or tensor values, copies and pickles, state_dicts taken at one
moment or made by torch.optim.AdamW itself, and NaN gradients. Oracle: torch.optim.AdamW
(foreach=False), and the plain-PyTorch 8-bit reference for the op."""
import copy
import io
import pickle

import numpy as np
import pytest
import torch
from conftest import assert_close

from qlora_fast.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from qlora_fast.reference.optim import adam8bit_step_ref, dynamic_map, quantize_blockwise_ref

CLASSES = [(AdamW, {}), (AdamW8bit, {"min_8bit_size": 0}), (PagedAdamW, {"budget": 4096, "page_bytes": 2048}),
           (PagedAdamW8bit, {"min_8bit_size": 0, "budget": 4096, "page_bytes": 2056})]
IDS = [c.__name__ for c, _ in CLASSES]


@pytest.fixture(autouse=True)
def ops_registered():
    import qlora_fast

    qlora_fast.load_extension()


def params_of(shapes=((37, 11), (300,), (5,))):
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


def twin(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def grads_for(params, steps):
    # heavy-tailed gradients (Student-t, 2 degrees of freedom), fresh each case
    t = torch.distributions.StudentT(2.0)
    return [[t.sample(p.shape) for p in params] for _ in range(steps)]


@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_a_refused_group_leaves_the_optimizer_as_it_was(seed, cls, kw):
    params = params_of()
    opt = cls(params[:2], lr=1e-2, **kw)
    other = torch.nn.Parameter(torch.randn(6))
    bad_groups = [
        {"params": [other], "lr": -1.0},
        {"params": [other], "betas": (0.9, 1.0)},
        {"params": [other], "maximize": True},
        {"params": [other], "amsgrad": True},
        {"params": [torch.nn.Parameter(torch.randn(4, 6).t())]},  # not contiguous
        {"params": [torch.nn.Parameter(torch.randn(3).double())]},
    ]
    for group in bad_groups:
        with pytest.raises((ValueError, TypeError)):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": (p for p in params[2:]), "lr": 3e-3})  # a generator is read once
    assert opt.param_groups[1]["params"] == params[2:]
    # ...and it steps exactly as an optimizer that never saw the refused groups
    peer = twin(params)
    clean = cls([{"params": peer[:2]}, {"params": peer[2:], "lr": 3e-3}], lr=1e-2, **kw)
    for grads in grads_for(params, 3):
        step_with(opt, params, grads)
        step_with(clean, peer, grads)
    for p, q in zip(params, peer):
        assert torch.equal(p, q)


def test_numpy_and_tensor_hyperparameters_follow_torch(seed):
    """A LambdaLR whose factor is a NumPy float, a tensor lr in a group and tensor betas (all
    accepted by torch.optim.AdamW) step exactly as torch does."""
    params = params_of()
    peer = twin(params)

    def groups(ps):
        return [{"params": ps[:1], "lr": torch.tensor(2e-2)},
                {"params": ps[1:], "betas": (torch.tensor(0.8), 0.99)}]

    opt, ref = AdamW(groups(params), lr=1e-2), torch.optim.AdamW(groups(peer), lr=1e-2, foreach=False)
    factor = lambda e: np.float32(0.5) ** e  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, factor)
    for grads in grads_for(params, 4):
        step_with(opt, params, grads)
        step_with(ref, peer, grads)
        sched.step()
        ref_sched.step()
    for p, q in zip(params, peer):
        assert_close(p, q, atol=1e-7, rtol=1e-6)
    for bad in ("0.1", None, True, torch.tensor([1e-3, 2e-3])):
        with pytest.raises(ValueError, match="lr must be a real number"):
            AdamW(params_of(), lr=bad)
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamW8bit(params_of(), min_8bit_size=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_a_copied_optimizer_steps_exactly_as_the_original(seed, cls, kw, how):
    params = params_of()
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], lr=1e-2, **kw)
    grads = grads_for(params, 4)
    for g in grads[:2]:
        step_with(opt, params, g)
    bundle = {"params": params, "opt": opt}
    if how == "deepcopy":
        copied = copy.deepcopy(bundle)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(bundle))
    else:
        buffer = io.BytesIO()
        torch.save(bundle, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    params2, opt2 = copied["params"], copied["opt"]
    assert type(opt2) is cls and opt2.param_groups[1]["params"][0] is params2[2]
    for g in grads[2:]:
        step_with(opt, params, g)
        step_with(opt2, params2, g)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for name, t in a.items():
            assert torch.equal(t, b[name]) if isinstance(t, torch.Tensor) else t == b[name]


@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_state_dict_is_one_moment_and_resumes(seed, cls, kw):
    """A state_dict taken and then outlived by a step still pairs one step count with that
    step's moments (unpaged: live, as torch's; paged: a copy); resuming from it with the
    parameters of that moment continues exactly as the original."""
    params = params_of()
    opt = cls(params, lr=1e-2, **kw)
    grads = grads_for(params, 5)
    history = []
    for g in grads[:2]:
        step_with(opt, params, g)
        history.append([p.detach().clone() for p in params])
    opt.state[params[2]]  # noqa: B018  reading a state creates an empty entry (a defaultdict)
    sd = opt.state_dict()
    step_with(opt, params, grads[2])
    history.append([p.detach().clone() for p in params])
    k = int(next(iter(sd["state"].values()))["step"])
    assert k in (2, 3) and all(int(s["step"]) == k for s in sd["state"].values())
    resumed = [torch.nn.Parameter(t.clone()) for t in history[k - 1]]
    opt2 = cls(resumed, lr=1e-2, **kw)
    opt2.load_state_dict(copy.deepcopy(sd))
    for g in grads[k:]:
        step_with(opt2, resumed, g)
    for g in grads[3:]:
        step_with(opt, params, g)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", CLASSES, ids=IDS)
def test_resume_from_a_torch_adamw_state_dict(seed, cls, kw, dtype):
    """Switching to qlora_fast's optimizers on resume: torch.optim.AdamW's own state_dict loads
    (fp32 moments as they are, 8-bit ones quantized from them) and training goes on as torch's."""
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in ((37, 11), (300,))]
    ref = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    grads = [[g.to(dtype) for g in gs] for gs in grads_for(params, 5)]
    for g in grads[:3]:
        step_with(ref, params, g)
    ours = twin(params)
    opt = cls(ours, lr=1e-2, **kw)
    opt.load_state_dict(ref.state_dict())
    assert all(int(s["step"]) == 3 for s in opt.state_dict()["state"].values())
    if "8bit" in cls.__name__:
        saved = opt.state_dict()["state"][1]
        want, want_absmax = quantize_blockwise_ref(ref.state[params[1]]["exp_avg"].float(), dynamic_map(True),
                                                   scaling="reciprocal")
        assert torch.equal(saved["exp_avg_codes"], want) and torch.equal(saved["exp_avg_absmax"], want_absmax)
    else:
        for i, p in enumerate(params):
            assert torch.equal(opt.state_dict()["state"][i]["exp_avg"], ref.state[p]["exp_avg"].float().reshape(-1))
    for g in grads[3:]:
        step_with(ref, params, g)
        step_with(opt, ours, g)
    # 8-bit states: on average within 1/40 of the two steps' move (fresh zero states would be off
    # by about the whole move), every element within 1/4; bf16 (torch keeps bf16 moments and
    # rounds each operation, ours fp32 math rounded once): two ulps of the parameter
    eight_bit = "8bit" in cls.__name__
    atol = 5e-3 if eight_bit else (1e-7 if dtype == torch.float32 else 1e-3)
    rtol = 1e-6 if dtype == torch.float32 else 1.6e-2
    for p, q in zip(params, ours):
        assert_close(q.float(), p.float(), atol=atol, rtol=rtol)
        if eight_bit:
            assert (q.float() - p.float()).abs().mean() < 5e-4


def test_torch_state_of_the_wrong_size_is_refused(seed):
    params = params_of()
    ref = torch.optim.AdamW(params)
    step_with(ref, params, grads_for(params, 1)[0])
    sd = ref.state_dict()
    sd["state"][1]["exp_avg"] = sd["state"][1]["exp_avg"][:-1]
    opt = AdamW(twin(params))
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(sd)
    assert not opt.state_dict()["state"]


@pytest.mark.parametrize("cls,kw", CLASSES[1::2], ids=IDS[1::2])
def test_nan_gradient_in_8bit_states_raises(seed, cls, kw):
    """A NaN gradient used to vanish into finite 8-bit garbage (std::max drops NaN); now its
    block's absmax is NaN as in the reference and the step raises like an overflow does."""
    params = params_of(((700,),))
    opt = cls(params, **kw)
    g = torch.randn(700)
    g[311] = float("nan")
    params[0].grad = g
    with pytest.raises(FloatingPointError, match="NaN"):
        opt.step()


def test_nan_gradient_op_matches_reference(seed):
    n = 600
    p, g = torch.randn(n), torch.randn(n)
    g[[5, 300]] = float("nan")
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    blocks = -(-n // 256)
    states = [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks),
              torch.zeros(blocks)]
    ref_states = [t.clone() for t in states]
    ref_p = p.clone()
    torch.ops.qlora_fast.adam8bit_step_([p], [g], *[[t] for t in states], signed, unsigned, [1],
                                        1e-3, 0.9, 0.999, 1e-8, 0.01, True)
    adam8bit_step_ref(ref_p, g, *ref_states, 1, 1e-3, (0.9, 0.999), 1e-8, 0.01, True)
    for ours, ref in zip(states[2:], ref_states[2:]):
        assert torch.equal(ours.isnan(), ref.isnan()) and ours[:2].isnan().all() and not ours[2].isnan()
        assert torch.equal(ours[2], ref[2])
