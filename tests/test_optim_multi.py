"""The multi-tensor step (`adam_multi_step_`, what the optimizers call once per device and step)
against the per-tensor ops `adam_step_` / `adam8bit_step_` (themselves tested against torch and the
float64 references in test_optim*): bit for bit, on random, odd-sized, heavy-tailed inputs with
empty and 1-element tensors, every param dtype, both state kinds, slices (pages) and params
without gradients. Also: step counts kept in tensors, old checkpoints with int steps, and the
optimizer's cached plan following param, state and `.data` changes."""
import copy
import io

import pytest
import torch

import qlora_fast
from qlora_fast.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from qlora_fast.reference.optim import dynamic_map

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (numel, dtype, kind (0: fp32 states, 1: 8-bit), group, page slices or None for the whole tensor)
LAYOUT = [
    (0, torch.float32, 0, 0, None),
    (1, torch.bfloat16, 1, 1, None),
    (1, torch.float16, 0, 1, None),
    (37 * 53, torch.float32, 1, 0, [(0, 768), (768, 1536), (1536, 1961)]),
    (259, torch.float16, 1, 1, None),
    (1000, torch.bfloat16, 0, 0, [(0, 512), (512, 1000)]),
    (3 * 5 * 7, torch.float32, 0, 1, None),
    (0, torch.bfloat16, 1, 0, None),
    (4099, torch.bfloat16, 1, 1, None),
]
HYPER = [(1e-2, 0.9, 0.999, 1e-8, 0.01), (3e-3, 0.8, 0.99, 1e-6, 0.1)]


@pytest.fixture(autouse=True)
def _extension():
    qlora_fast.load_extension()


def heavy_tailed(n, dtype):
    """Student-t (1.5 degrees of freedom) values: occasional huge outliers, never all zeros."""
    return torch.distributions.StudentT(1.5).sample((n,)).clamp(-6e4, 6e4).to(dtype)


def fresh_states(n, kind):
    if kind == 0:
        return [torch.randn(n) * 0.1, torch.rand(n) * 0.01]
    blocks = -(-n // 256)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8), torch.randint(1, 256, (n,), dtype=torch.uint8),
            torch.rand(blocks) * 0.1, torch.rand(blocks) * 0.01]


@pytest.mark.parametrize("decoupled", [True, False])
def test_multi_op_equals_per_tensor_ops_bit_for_bit(seed, decoupled):
    ops = torch.ops.qlora_fast
    maps = (dynamic_map(True), dynamic_map(False))
    params = [heavy_tailed(n, dt) for n, dt, *_ in LAYOUT]
    pages = [[(0, n)] if slices is None else slices for n, _, _, _, slices in LAYOUT]
    states = [[fresh_states(e - s, kind) for s, e in pg] for (_, _, kind, _, _), pg in zip(LAYOUT, pages)]
    start_steps = [float(i % 3) for i in range(len(LAYOUT))]
    mine = ([p.clone() for p in params], [[[t.clone() for t in st] for st in pg] for pg in states],
            [torch.tensor(s) for s in start_steps])
    theirs = ([p.clone() for p in params], [[[t.clone() for t in st] for st in pg] for pg in states],
              list(start_steps))
    flat_states, rows = [], []
    for i, ((_, _, kind, group, _), pg) in enumerate(zip(LAYOUT, pages)):
        for (start, end), st in zip(pg, mine[1][i]):
            rows.append((i, group, kind, start, end, len(flat_states)))
            flat_states += st
    entries = torch.tensor(rows, dtype=torch.int64)
    hyper = [x for h in HYPER for x in h]
    for step in range(3):
        grads = [heavy_tailed(n, dt) for n, dt, *_ in LAYOUT]
        grads[2 + step] = None  # a param without a gradient: skipped, its count kept
        flag = ops.adam_multi_step_(mine[0], grads, mine[2], flat_states, entries, hyper, decoupled, *maps, None)
        assert flag is False  # |g| <= 6e4: no second moment overflows
        for i, (n, _, kind, group, _) in enumerate(LAYOUT):
            if grads[i] is None:
                continue
            theirs[2][i] += 1
            for (start, end), st in zip(pages[i], theirs[1][i]):
                args = ([theirs[0][i][start:end]], [grads[i][start:end]], *[[t] for t in st])
                if kind == 0:
                    ops.adam_step_(*args, [int(theirs[2][i])], *HYPER[group], decoupled)
                else:
                    ops.adam8bit_step_(*args, *maps, [int(theirs[2][i])], *HYPER[group], decoupled)
        for i in range(len(LAYOUT)):
            assert torch.equal(mine[0][i], theirs[0][i]), (step, i)
            assert mine[2][i].dtype == torch.float32 and mine[2][i].item() == theirs[2][i]
            for a, b in zip(sum(mine[1][i], []), sum(theirs[1][i], [])):
                assert torch.equal(a, b), (step, i)


def test_multi_op_checks_everything_before_changing_anything(seed):
    ops = torch.ops.qlora_fast
    maps = (dynamic_map(True), dynamic_map(False))
    params = [torch.randn(10), torch.randn(300)]
    states = fresh_states(10, 0) + fresh_states(300, 1)
    steps = [torch.tensor(1.0), torch.tensor(1.0)]
    entries = torch.tensor([[0, 0, 0, 0, 10, 0], [1, 0, 1, 0, 300, 2]])
    before = [t.clone() for t in params + states + steps]
    hyper = list(HYPER[0])

    def unchanged():
        return all(torch.equal(a, b) for a, b in zip(params + states + steps, before))

    with pytest.raises(TypeError, match="does not match its parameter"):  # the second grad is bad
        ops.adam_multi_step_(params, [torch.randn(10), torch.randn(299)], steps, states, entries, hyper, True,
                             *maps, None)
    assert unchanged()
    with pytest.raises(RuntimeError, match="out of params"):
        ops.adam_multi_step_(params, [torch.randn(10), torch.randn(300)], steps, states,
                             torch.tensor([[0, 0, 0, 0, 11, 0]]), hyper, True, *maps, None)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        ops.adam_multi_step_(params, [torch.randn(10), torch.randn(300)], steps, states,
                             torch.tensor([[1, 0, 1, 5, 300, 2]]), hyper, True, *maps, None)
    with pytest.raises(RuntimeError, match="step count"):
        ops.adam_multi_step_(params, [torch.randn(10), torch.randn(300)], [torch.tensor(1), steps[1]], states,
                             entries, hyper, True, *maps, None)
    assert unchanged()


def per_tensor_twin(opt_params, opt, eight_bit_min):
    """Clones of the params with hand-kept states, stepped with the per-tensor ops."""
    twin = [p.detach().clone() for p in opt_params]
    group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
    states = [fresh_zero(p.numel(), p.numel() >= eight_bit_min) for p in opt_params]
    return twin, [group_of[id(p)] for p in opt_params], states, [0] * len(opt_params)


def fresh_zero(n, eight_bit):
    if not eight_bit:
        return [torch.zeros(n), torch.zeros(n)]
    return [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(-(-n // 256)), torch.zeros(-(-n // 256))]


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit, PagedAdamW8bit])
def test_optimizer_equals_per_tensor_ops_with_mixed_dtypes(seed, cls):
    """The cached multi-tensor step of the optimizers against the per-tensor ops, bit for bit:
    mixed param dtypes, fp32 and 8-bit states in one optimizer, an empty and a 1-element param,
    a param whose gradient comes and goes, a param group added mid-run and a `.data` swap."""
    ops = torch.ops.qlora_fast
    maps = (dynamic_map(True), dynamic_map(False))
    shapes = [(0,), (1,), (37, 53), (259,), (3, 5, 7), (1000,), (4099,)]
    params = [torch.nn.Parameter(heavy_tailed(torch.Size(s).numel(), DTYPES[i % 3]).reshape(s))
              for i, s in enumerate(shapes)]
    kw = {"min_8bit_size": 256} if "8bit" in cls.__name__ else {}
    if cls is PagedAdamW8bit:
        kw.update(budget=8192, page_bytes=2056)  # pages of 1024 elements, some streamed
    opt = cls([{"params": params[:3]}, {"params": params[3:5], "lr": 3e-3, "betas": (0.8, 0.99)}], lr=1e-2, **kw)
    eight_min = kw.get("min_8bit_size", 1 << 62)
    twin, groups, states, steps = per_tensor_twin(params[:5], opt, eight_min)
    for step in range(4):
        if step == 2:  # a new group: the plan is rebuilt
            opt.add_param_group({"params": params[5:], "weight_decay": 0.1})
            more = per_tensor_twin(params[5:], opt, eight_min)
            twin += more[0]
            groups += more[1]
            states += more[2]
            steps += more[3]
        if step == 3:  # `.data` replaced (new storage): the held plan must follow it
            params[2].data = params[2].data.clone()
        grads = [heavy_tailed(p.numel(), p.dtype).reshape(p.shape) for p in twin]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 3 and step == 1) else g.clone()
        opt.step()
        for i, g in enumerate(grads):
            if params[i].grad is None:
                continue
            steps[i] += 1
            h = opt.param_groups[groups[i]]
            hyper = (h["lr"], *h["betas"], h["eps"], h["weight_decay"], True)
            args = ([twin[i].view(-1)], [g.view(-1)], *[[t] for t in states[i]])
            if len(states[i]) == 2:
                ops.adam_step_(*args, [steps[i]], *hyper)
            else:
                ops.adam8bit_step_(*args, *maps, [steps[i]], *hyper)
        for i, p in enumerate(twin):
            assert torch.equal(params[i].detach(), p), (step, i)
            state = opt.state[params[i]]
            assert isinstance(state["step"], torch.Tensor) and state["step"].item() == steps[i]
    sd = opt.state_dict()["state"]
    for k, st in sd.items():
        names = ["exp_avg", "exp_avg_sq"] if len(states[k]) == 2 else \
            ["exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"]
        for name, t in zip(names, states[k]):
            assert torch.equal(st[name], t), (k, name)


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit, PagedAdamW])
def test_step_counts_are_tensors_and_int_step_checkpoints_still_load(seed, cls):
    kw = {"min_8bit_size": 0} if "8bit" in cls.__name__ else {}
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(300,), (7, 11)]]
    opt = cls(params, lr=1e-2, **kw)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    steps = [sd["state"][k]["step"] for k in sorted(sd["state"])]
    assert all(isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.item() == 3 for s in steps)
    opt.step()
    # Unpaged, a state_dict holds the live tensors as torch's does (the count moves on with the
    # moments); paged, a copy of both (joined on the host).
    moved = 3 if cls.__name__.startswith("Paged") else 4
    assert all(s.item() == moved for s in steps) and opt.state[params[0]]["step"].item() == 4
    # An old checkpoint (int steps) and the new one load to the same optimizer state.
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    new_sd = torch.load(buffer)
    old_sd = copy.deepcopy(new_sd)
    for st in old_sd["state"].values():
        st["step"] = int(st["step"])
    runs = []
    for loaded in (new_sd, old_sd):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        o = cls(ps, lr=1e-2, **kw)
        o.load_state_dict(loaded)
        torch.manual_seed(seed)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn_like(p)
            o.step()
        runs.append((ps, o.state_dict()))
    (pa, sa), (pb, sb) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    for k in sa["state"]:
        assert sa["state"][k]["step"].item() == sb["state"][k]["step"].item() == moved + 2
        for name, t in sa["state"][k].items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, sb["state"][k][name])
    # Loading a state_dict twice does not share one step tensor between two optimizers.
    o1, o2 = cls([torch.nn.Parameter(torch.randn(300))], **kw), cls([torch.nn.Parameter(torch.randn(300))], **kw)
    one = {"state": {0: sd["state"][0]}, "param_groups": [{**sd["param_groups"][0], "params": [0]}]}
    o1.load_state_dict(one)
    o2.load_state_dict(one)
    o1.param_groups[0]["params"][0].grad = torch.randn(300)
    o1.step()
    assert next(iter(o1.state.values()))["step"].item() == moved + 1
    assert next(iter(o2.state.values()))["step"].item() == moved


def test_bad_gradient_in_a_later_group_changes_nothing(seed):
    params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(5, 6))]
    opt = AdamW8bit([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], min_8bit_size=0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    params[0].grad = torch.randn(40)
    params[1].grad = torch.randn(5, 6).to_sparse()  # torch refuses wrong shapes or dtypes on assignment
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    after = opt.state_dict()
    for k, st in before["state"].items():
        for name, v in st.items():
            now = after["state"][k][name]
            assert torch.equal(v, now) if isinstance(v, torch.Tensor) else v == now
