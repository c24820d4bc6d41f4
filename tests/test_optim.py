"""qlora_fast.optim: Adam/AdamW with fp32 and 8-bit blockwise states, paged and unpaged, on the
CPU (C++ extension). Oracles: torch.optim.AdamW/Adam, the plain-PyTorch reference in
qlora_fast.reference.optim, and bitsandbytes (dynamic map, blockwise quantization, AdamW8bit)."""
import copy
import io

import pytest
import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_fast.optim import Adam, AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PageManager, paging_stats
from qlora_fast.optim.paging import StepStats
from qlora_fast.reference.optim import (
    adam8bit_step_ref,
    adam_step_ref,
    dequantize_blockwise_ref,
    dynamic_map,
    quantize_blockwise_ref,
)


def bitsandbytes():
    """The 8-bit oracle (a test extra, always present in CI); only its tests skip without it."""
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is the 8-bit oracle (test extra)")

SHAPES = [(37, 53), (1000,), (3, 5, 7), (1,), (259,)]  # odd sizes, partial last 256-blocks


def make_params(dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float32).to(dtype)) for s in shapes]


def groups_of(params):
    """Three param groups with different hyper-parameters."""
    return [
        {"params": params[:2]},
        {"params": params[2:4], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
        {"params": params[4:], "lr": 2e-2, "eps": 1e-6, "weight_decay": 0.1},
    ]


def run_steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def random_grads(params, steps):
    return [[torch.randn(p.shape).to(p.dtype) for p in params] for _ in range(steps)]


# ---- the extension and the 8-bit code ----------------------------------------------------
@pytest.fixture(autouse=True)
def ops_registered():
    """Tests that call torch.ops.qlora_fast directly need the library loaded, whichever test runs first."""
    import qlora_fast

    qlora_fast.load_extension()


def test_extension_loads_and_registers_ops():
    import qlora_fast

    module = qlora_fast.load_extension()
    assert module is qlora_fast.load_extension()
    assert hasattr(torch.ops.qlora_fast, "adam_step_") and hasattr(torch.ops.qlora_fast, "adam8bit_step_")
    # The loaded library was built from the sources in this checkout (a stale one is skipped).
    from qlora_fast import _extension

    if _extension.CSRC.is_dir():
        assert module.source_hash == _extension.source_hash()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only build")
def test_cuda_params_with_cpu_only_build_get_a_clear_error():
    from qlora_fast.optim.adam import _ops

    assert _ops(torch.device("cpu")) is torch.ops.qlora_fast
    with pytest.raises(RuntimeError, match="without its CUDA kernels"):
        _ops(torch.device("cuda"))


def test_jit_build_names_missing_sources(monkeypatch, tmp_path):
    from qlora_fast import _extension

    monkeypatch.setattr(_extension, "CSRC", tmp_path)
    with pytest.raises(ImportError, match="C\\+\\+ sources"):
        _extension._jit_build(ImportError("no _C"))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    bnbF = bitsandbytes().functional
    assert torch.equal(dynamic_map(signed), bnbF.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_quantization_is_nearest_code(seed, signed):
    bnbF = bitsandbytes().functional
    code = dynamic_map(signed)
    x = torch.randn(256 * 37 + 101) * torch.rand(1).item() * 10
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise_ref(x, code)
    assert_close(absmax, torch.cat([x[: 256 * 37].view(37, 256).abs().amax(1), x[256 * 37:].abs().amax().view(1)]))
    # Against bitsandbytes: same absmax, and our code is never further from the value than its
    # (its CPU search is approximate in a few places), up to 2 ulps at a near-tie: the code is
    # picked against fp32 midpoints, whose rounding may move a tie by an ulp (seed 4116863960).
    bq, bstate = bnbF.quantize_blockwise(x, code=code, blocksize=256)
    assert_close(absmax, bstate.absmax)
    scaled = (x / absmax.repeat_interleave(256)[: x.numel()]).clamp(-1, 1)
    ours = (scaled - code[codes.long()]).abs()
    theirs = (scaled - code[bq.reshape(-1).long()]).abs()
    assert (ours <= theirs + 2.4e-7).all()
    assert (codes != bq.reshape(-1)).float().mean() < 0.01
    # Brute force nearest (ties to the lower code), up to the fp32 rounding of this test's own
    # scaling, which may round a near-tie the other way (|scaled| <= 1: 2 ulps are 2.4e-7).
    brute = (scaled[:, None] - code[None, :]).abs().argmin(dim=1)
    assert_close(ours, (scaled - code[brute]).abs(), atol=2.4e-7)
    scale = absmax.repeat_interleave(256)[: x.numel()]
    assert_close(dequantize_blockwise_ref(codes, absmax, code), code[codes.long()] * scale)
    assert_close(bnbF.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=256), code[codes.long()] * scale)


def test_blockwise_scalings_differ_only_in_the_partial_last_block(seed):
    """The one codec's two scalings (reference/blockwise.py): bitsandbytes' op and the optimizer
    kernels' reciprocal agree on every full block; the partial last block may round one code apart."""
    x = torch.randn(256 * 5 + 37) * torch.rand(1).item() * 10
    full = 256 * 5
    ops_q, ops_absmax = quantize_blockwise_ref(x, dynamic_map(True), scaling="bitsandbytes")
    kernel_q, kernel_absmax = quantize_blockwise_ref(x, dynamic_map(True), scaling="reciprocal")
    assert torch.equal(ops_q[:full], kernel_q[:full]) and torch.equal(ops_absmax, kernel_absmax)
    assert (ops_q[full:].int() - kernel_q[full:].int()).abs().max() <= 1
    with pytest.raises(ValueError, match="scaling"):
        quantize_blockwise_ref(x, scaling="bnb")


# ---- fp32 states: follow torch -------------------------------------------------------------

@pytest.mark.parametrize("cls,torch_cls", [(AdamW, torch.optim.AdamW), (Adam, torch.optim.Adam)])
def test_32bit_follows_torch_over_100_steps(seed, cls, torch_cls):
    params = make_params()
    peer = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 100)
    kw = {"weight_decay": 0.05} if cls is Adam else {}
    opt = cls(groups_of(params), lr=1e-2, **kw)
    ref = torch_cls(groups_of(peer), lr=1e-2, foreach=False, **kw)
    run_steps(opt, params, grads)
    run_steps(ref, peer, grads)
    for p, q in zip(params, peer):
        # Same op order as torch; differences come from torch's vectorised (FMA) CPU kernels:
        # a few fp32 ulps per step, accumulated over 100 steps.
        assert_close(p, q, atol=2e-6, rtol=2e-6)
        assert_close(
            opt.state[p]["pages"][0].tensors["exp_avg"], ref.state[q]["exp_avg"].view(-1), atol=1e-6, rtol=1e-5
        )
        assert_close(
            opt.state[p]["pages"][0].tensors["exp_avg_sq"], ref.state[q]["exp_avg_sq"].view(-1), atol=1e-7, rtol=1e-5
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("paged", [False, True])
def test_low_precision_params_follow_fp32_state_reference(seed, dtype, paged):
    """bf16/fp16 params with fp32 states: compared with the reference that keeps fp32 states
    and rounds the param to its dtype once per step (torch's AdamW would keep bf16 states)."""
    params = make_params(dtype)
    peer = [p.detach().clone() for p in params]
    grads = random_grads(params, 100)
    opt = (PagedAdamW(groups_of(params), lr=1e-2, budget=4096, page_bytes=2048) if paged
           else AdamW(groups_of(params), lr=1e-2))
    states = [(torch.zeros(p.shape), torch.zeros(p.shape)) for p in peer]
    hyper = [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)] * 2 + \
        [dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.0)] * 2 + \
        [dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)]
    run_steps(opt, params, grads)
    for step, step_grads in enumerate(grads, 1):
        for q, g, (m, v), h in zip(peer, step_grads, states, hyper):
            adam_step_ref(q, g, m, v, step, **h)
    ulp = torch.finfo(dtype).eps
    for p, q in zip(params, peer):
        assert p.dtype == dtype
        # fp32 rounding differences can flip a rounding to the param dtype: allow 2 ulps.
        assert_close(p, q, atol=2 * ulp, rtol=2 * ulp)


# ---- 8-bit states -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_8bit_op_matches_reference(seed, dtype):
    """One step of the C++ 8-bit op on random quantized states against the PyTorch reference."""
    n = 256 * 9 + 77
    p = torch.randn(n).to(dtype)
    g = torch.randn(n).to(dtype)
    m_codes, m_absmax = quantize_blockwise_ref(torch.randn(n) * 0.1, dynamic_map(True))
    v_codes, v_absmax = quantize_blockwise_ref(torch.rand(n) * 0.01, dynamic_map(False))
    ref = [t.clone() for t in (p, m_codes, v_codes, m_absmax, v_absmax)]
    torch.ops.qlora_fast.adam8bit_step_([p], [g], [m_codes], [v_codes], [m_absmax], [v_absmax],
                                        dynamic_map(True), dynamic_map(False), [7], 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
    adam8bit_step_ref(ref[0], g, *ref[1:], step=7, lr=1e-2, weight_decay=0.01)
    ulp = torch.finfo(dtype).eps
    assert_close(p, ref[0], atol=ulp, rtol=ulp)
    assert_close(m_absmax, ref[3], rtol=1e-6)
    assert_close(v_absmax, ref[4], rtol=1e-6)
    # Codes: identical except where fp32 rounding lands a value on a midpoint (off by one).
    for ours, theirs in ((m_codes, ref[1]), (v_codes, ref[2])):
        diff = (ours.int() - theirs.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_8bit_tracks_32bit_and_bitsandbytes(seed):
    """Stated tolerance: after 100 steps the 8-bit trajectory stays within 5% (relative, in
    norm, of how far the 32-bit run moved) of the 32-bit one, as close as bitsandbytes'
    AdamW8bit gets, and within 2% of bitsandbytes' own 8-bit trajectory."""
    bnb = bitsandbytes()
    shapes = [(300, 70), (5130,)]
    params = make_params(shapes=shapes)
    start = [p.detach().clone() for p in params]
    p32 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    pbnb = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 100)
    run_steps(AdamW8bit(params, lr=1e-2, min_8bit_size=0), params, grads)
    run_steps(AdamW(p32, lr=1e-2), p32, grads)
    run_steps(bnb.optim.AdamW8bit(pbnb, lr=1e-2, min_8bit_size=0), pbnb, grads)
    for p, q, b, s in zip(params, p32, pbnb, start):
        moved = (q - s).norm()
        ours = ((p - q).norm() / moved).item()
        theirs = ((b - q).norm() / moved).item()
        assert ours < 0.05 and ours < 1.5 * theirs, (ours, theirs)
        assert ((p - b).norm() / moved).item() < 0.02


def test_8bit_small_params_keep_fp32_states(seed):
    params = make_params(shapes=[(10, 10), (5000,)])
    opt = AdamW8bit(params, min_8bit_size=4096)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[params[0]]["kind"] == "32bit" and opt.state[params[1]]["kind"] == "8bit"
    assert opt.state[params[1]]["pages"][0].tensors["exp_avg_codes"].dtype == torch.uint8


@pytest.mark.slow
def test_8bit_trains_small_model_to_same_loss(seed):
    x = torch.randn(128, 16)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        y = teacher(x)
    student = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    losses = {}
    for name, make in [
        ("32bit", lambda ps: AdamW(ps, lr=1e-2)),
        ("8bit", lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=0)),
        ("paged8bit", lambda ps: PagedAdamW8bit(ps, lr=1e-2, min_8bit_size=0, budget=2080, page_bytes=2080)),
    ]:
        model = copy.deepcopy(student)
        opt = make(model.parameters())
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    initial = torch.nn.functional.mse_loss(student(x), y).item()
    assert losses["32bit"] < 0.2 * initial
    for name in ("8bit", "paged8bit"):
        assert abs(losses[name] - losses["32bit"]) < 0.15 * losses["32bit"] + 1e-4, losses


# ---- paging -------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,unpaged_cls", [(PagedAdamW, AdamW), (PagedAdamW8bit, AdamW8bit)])
def test_paged_equals_unpaged_with_a_quarter_resident(seed, cls, unpaged_cls):
    params = make_params(shapes=[(37, 53), (1000,), (3000,), (259,), (700,)])
    peer = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = {"min_8bit_size": 0} if unpaged_cls is AdamW8bit else {}
    page_bytes = 2048
    total = sum(p.numel() for p in params) * (8 if unpaged_cls is AdamW else 2.04)
    paged = cls(groups_of(params), lr=1e-2, budget=max(page_bytes, int(total / 4)), page_bytes=page_bytes, **kw)
    ref = unpaged_cls(groups_of(peer), lr=1e-2, **kw)
    grads = random_grads(params, 30)
    run_steps(paged, params, grads)
    run_steps(ref, peer, grads)
    for p, q in zip(params, peer):
        assert torch.equal(p, q)
    stats = paged.paging_stats()["cpu"]
    assert stats["pages_host"] > 0 and stats["resident_bytes"] <= stats["budget_bytes"]
    assert stats["last_step"]["h2d_bytes"] == stats["last_step"]["d2h_bytes"] > 0
    assert paging_stats(paged) == paged.paging_stats()


def test_budget_changes_evict_least_recently_used_and_promote_back(seed):
    params = make_params(shapes=[(2048,), (2048,), (2048,)])
    page_bytes = 8 * 1024  # 1024 elements of fp32 state: two pages per param
    opt = PagedAdamW(params, lr=1e-2, budget=10**9, page_bytes=page_bytes)
    manager = opt._manager(torch.device("cpu"))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert manager.host_bytes() == 0 and manager.resident_bytes() == 6 * page_bytes
    # params[0] is not updated this step, so its pages become the least recently used.
    params[0].grad = None
    opt.step()
    manager.budget = 4 * page_bytes
    opt.step()
    pages0 = opt.state[params[0]]["pages"]
    assert all(not pg.on_device for pg in pages0)
    assert manager.resident_bytes() == 4 * page_bytes
    last = manager.stats()["last_step"]
    assert last["d2h_bytes"] == 2 * page_bytes + last["h2d_bytes"]  # 2 evicted, the rest streamed
    manager.budget = 10**9
    opt.step()
    assert manager.host_bytes() == 0 and manager.stats()["staging_bytes"] == 0


@settings(max_examples=12, deadline=None)
@given(
    budgets=st.lists(st.integers(min_value=1, max_value=12), min_size=4, max_size=8),
    with_grad=st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=8, max_size=8),
    eight_bit=st.booleans(),
)
def test_paged_equals_unpaged_under_changing_budgets(budgets, with_grad, eight_bit):
    """Any sequence of budgets (in pages) and of params skipped per step: same trajectory as
    unpaged, resident bytes within the budget, and every state byte either resident or on the host."""
    torch.manual_seed(len(budgets) * 31 + sum(map(sum, with_grad)))
    params = make_params(shapes=[(700,), (1500,), (33, 17)])
    peer = [torch.nn.Parameter(p.detach().clone()) for p in params]
    page_bytes = 2080  # 256 elements of fp32 state, 1024 of 8-bit state
    kw = {"min_8bit_size": 0} if eight_bit else {}
    paged = (PagedAdamW8bit if eight_bit else PagedAdamW)(
        params, lr=1e-2, budget=page_bytes, page_bytes=page_bytes, **kw
    )
    ref = (AdamW8bit if eight_bit else AdamW)(peer, lr=1e-2, **kw)
    manager = paged._manager(torch.device("cpu"))
    for step, mask in enumerate(with_grad):
        manager.budget = budgets[step % len(budgets)] * page_bytes
        for p, q, on in zip(params, peer, mask):
            g = torch.randn(p.shape) if on else None
            p.grad, q.grad = g, (None if g is None else g.clone())
        paged.step()
        ref.step()
        assert manager.resident_bytes() <= manager.budget
        total = sum(pg.nbytes for s in paged.state.values() for pg in s["pages"])
        assert manager.resident_bytes() + manager.host_bytes() == total
    for p, q in zip(params, peer):
        assert torch.equal(p, q)


def test_page_manager_bookkeeping():
    manager = PageManager(torch.device("cpu"), budget=3000, min_budget_bytes=1000)
    pages = [manager.add(0, 250, {"x": torch.zeros(250)}) for _ in range(4)]  # 1000 bytes each
    assert [pg.on_device for pg in pages] == [True, True, True, False]
    for i in (3, 1, 0, 2):
        manager.touch(pages[i])
    manager.budget = 2000
    stats = StepStats()
    manager.plan(stats)
    assert [pg.on_device for pg in pages] == [True, False, True, False]  # kept the two most recent
    assert stats.d2h_bytes == 1000 and stats.h2d_bytes == 0
    manager.budget = 3500
    manager.plan(stats)
    assert [pg.on_device for pg in pages] == [True, True, True, False]  # most recent host page back
    seen = []
    manager.stream([pages[3]], lambda pg, t: (seen.append(pg), t["x"].add_(1)), stats)
    assert seen == [pages[3]] and torch.equal(pages[3].tensors["x"], torch.ones(250))


@pytest.mark.parametrize("cls,numel", [(PagedAdamW8bit, 2048 * 2048), (PagedAdamW8bit, 5 * 256 + 3),
                                       (PagedAdamW, 3 * 1024 + 256), (PagedAdamW, 1)])
def test_pages_of_a_parameter_are_equal_sized(cls, numel):
    """Issue 13: a 2048x2048 parameter used to split into one full page and a sliver."""
    p = torch.nn.Parameter(torch.zeros(numel))
    page_bytes = (8 << 20) if numel > 10**6 else 2 * 1024
    opt = cls([p], budget=1.0, page_bytes=page_bytes)
    kind = opt._kind(p)
    ranges = opt._page_ranges(p, kind)
    sizes = [end - start for start, end in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(sz % 256 == 0 for sz in sizes[:-1]) and max(sizes) <= max(opt._page_elements[kind], 1)
    assert max(sizes) - min(sizes) < 256  # equal up to the partial last block
    if numel == 2048 * 2048:
        assert sizes == [numel // 2, numel // 2]


def test_fractional_budget_counts_memory_the_allocator_caches(monkeypatch):
    """The CUDA budget counts memory torch's caching allocator holds but does not use (the
    driver reports it as used); checked with the CUDA queries stubbed (no GPU here)."""
    from qlora_fast.optim import paging

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3500)
    assert paging._available_bytes(torch.device("cuda")) == 1000 + 1500
    manager = PageManager(torch.device("cuda"), budget=0.5)
    assert manager.budget_bytes() == 1250


# ---- state_dict ---------------------------------------------------------------------------

@pytest.mark.parametrize("first,second", [
    (AdamW, AdamW), (AdamW8bit, AdamW8bit), (PagedAdamW, PagedAdamW), (PagedAdamW8bit, PagedAdamW8bit),
    (PagedAdamW, AdamW), (AdamW8bit, PagedAdamW8bit),
])
def test_state_dict_round_trip_resumes_identically(seed, first, second):
    def make(cls, params):
        kw = {"min_8bit_size": 0} if "8bit" in cls.__name__ else {}
        if cls.__name__.startswith("Paged"):
            kw.update(budget=8192, page_bytes=4096)
        return cls(groups_of(params), lr=1e-2, **kw)

    params = make_params(torch.bfloat16)
    opt = make(first, params)
    grads = random_grads(params, 6)
    run_steps(opt, params, grads[:5])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    run_steps(opt, params, grads[5:])

    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu")
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = make(second, resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[1]["lr"] == 3e-3 and opt2.param_groups[2]["weight_decay"] == 0.1
    run_steps(opt2, resumed, grads[5:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    sd1, sd2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in sd1:
        assert sd1[k]["step"] == sd2[k]["step"] == 6
        for name, t in sd1[k].items():
            if isinstance(t, torch.Tensor):
                assert t.dtype in (torch.float32, torch.uint8) and torch.equal(t, sd2[k][name])


def test_load_state_dict_rejects_other_state_kind(seed):
    params = make_params(shapes=[(300,)])
    opt = AdamW(params)
    params[0].grad = torch.randn(300)
    opt.step()
    with pytest.raises(ValueError, match="8bit"):
        AdamW8bit(params, min_8bit_size=0).load_state_dict(opt.state_dict())


def _corruptions(sd):
    """(description, bad copy of `sd`): each must be rejected before anything is loaded."""
    last = max(sd["state"])
    names = [k for k, v in sd["state"][last].items() if isinstance(v, torch.Tensor) and k != "step"]  # state arrays

    def with_state(**changes):
        bad = copy.deepcopy(sd)
        bad["state"][last].update(changes)
        for k, v in list(changes.items()):
            if v is None:
                del bad["state"][last][k]
        return bad

    first = names[0]
    out = [
        ("truncated", with_state(**{first: sd["state"][last][first][:-1]})),
        ("missing", with_state(**{names[-1]: None})),
        ("dtype", with_state(**{first: sd["state"][last][first].double()})),
        ("kind", with_state(kind="8bit" if sd["state"][last]["kind"] == "32bit" else "32bit")),
        ("step", with_state(step=-3)),
        ("infinite step", with_state(step=float("inf"))),
        ("not a dict", {"state": sd["state"]}),
    ]
    negative = [k for k in names if k != "exp_avg" and sd["state"][last][k].is_floating_point()]
    out.append(("negative " + negative[0], with_state(**{negative[0]: -sd["state"][last][negative[0]].abs() - 1})))
    for key, value in (("lr", None), ("amsgrad", True), ("maximize", True)):
        bad = copy.deepcopy(sd)
        bad["param_groups"][0][key] = value
        if value is None:
            del bad["param_groups"][0][key]
        out.append((f"group {key}={value}", bad))
    nan = copy.deepcopy(sd)
    floats = [k for k in names if sd["state"][last][k].is_floating_point()]
    nan["state"][last][floats[0]].view(-1)[0] = float("nan")
    out.append(("non-finite", nan))
    groups = copy.deepcopy(sd)
    groups["param_groups"][-1]["params"] = groups["param_groups"][-1]["params"][:-1]
    out.append(("group size", groups))
    return out


@pytest.mark.parametrize("cls,kwargs", [(AdamW, {}), (AdamW8bit, {"min_8bit_size": 0}),
                                        (PagedAdamW8bit, {"min_8bit_size": 0, "budget": 4096, "page_bytes": 2056})])
def test_failed_load_state_dict_leaves_live_state_unchanged(seed, cls, kwargs):
    """Issue 18 section 5: a bad state_dict used to wipe the live state before raising."""
    params = make_params(shapes=[(300,), (40, 30), (1000,)])
    opt = cls([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], **kwargs)
    run_steps(opt, params, random_grads(params, 2))
    before = opt.state_dict()
    snapshot = copy.deepcopy(before)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = cls([{"params": twin_params[:1]}, {"params": twin_params[1:], "lr": 3e-3}], **kwargs)
    twin.load_state_dict(copy.deepcopy(before))
    for what, bad in _corruptions(before):
        with pytest.raises((ValueError, TypeError)):
            opt.load_state_dict(bad)
        after = opt.state_dict()
        assert after["param_groups"] == snapshot["param_groups"], what
        for k, state in snapshot["state"].items():
            for name, v in state.items():
                assert (torch.equal(v, after["state"][k][name]) if isinstance(v, torch.Tensor)
                        else v == after["state"][k][name]), (what, name)
    # ...and it still trains exactly as an optimizer that never saw the bad loads.
    grads = random_grads(params, 2)
    run_steps(opt, params, grads)
    run_steps(twin, twin_params, grads)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


# ---- torch.optim conventions ------------------------------------------------------------------

def test_lr_scheduler_closure_and_zero_grad(seed):
    params = make_params(shapes=[(40, 3), (17,)])
    peer = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = AdamW(params, lr=0.1), torch.optim.AdamW(peer, lr=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda e: 0.5 ** e)
    target = [torch.randn(p.shape) for p in params]

    def closure_for(ps, o):
        def closure():
            o.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(ps, target))
            loss.backward()
            return loss
        return closure

    for _ in range(10):
        loss = opt.step(closure_for(params, opt))
        ref_loss = ref.step(closure_for(peer, ref))
        assert torch.is_tensor(loss) and abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        sched.step()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 10)
    for p, q in zip(params, peer):
        assert_close(p, q, atol=1e-6, rtol=1e-6)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_params_without_grad_are_skipped(seed):
    params = make_params(shapes=[(5,), (6,)])
    before = params[1].detach().clone()
    opt = AdamW(params)
    params[0].grad = torch.randn(5)
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1e-3}, "lr"), ({"betas": (1.0, 0.999)}, "betas\\[0\\]"), ({"betas": (0.9, -0.1)}, "betas\\[1\\]"),
    ({"eps": -1.0}, "eps"), ({"weight_decay": -0.1}, "weight_decay"), ({"betas": (0.9,)}, "pair"),
    ({"eps": float("inf")}, "eps must be a finite"), ({"weight_decay": float("inf")}, "weight_decay must be a finite"),
])
def test_bad_hyperparameters(kwargs, match):
    for cls in (AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit):
        with pytest.raises(ValueError, match=match):
            cls(make_params(shapes=[(3,)]), **kwargs)


def test_bad_group_and_scheduler_lr():
    p = make_params(shapes=[(3,)])
    opt = AdamW(p)
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": make_params(shapes=[(2,)]), "betas": (0.9, 1.5)})
    opt.param_groups[0]["lr"] = -1.0
    p[0].grad = torch.randn(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step()


def test_sparse_and_complex_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    p = torch.nn.Parameter(torch.randn(3))
    opt = AdamW([p])
    p.grad_dtype = None  # torch otherwise refuses a complex gradient on a real tensor
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        opt.step()


def test_budget_smaller_than_a_page_rejected():
    with pytest.raises(ValueError, match="smaller than one page"):
        PagedAdamW(make_params(shapes=[(3,)]), budget=1000, page_bytes=4096)
    with pytest.raises(ValueError, match="\\(0, 1\\]"):
        PagedAdamW8bit(make_params(shapes=[(3,)]), budget=1.5)
    with pytest.raises(ValueError, match="page_bytes"):
        PagedAdamW(make_params(shapes=[(3,)]), page_bytes=100)


def test_op_checks_its_arguments():
    p, g = torch.randn(10), torch.randn(10, dtype=torch.float64)
    m, v = torch.zeros(10), torch.zeros(10)
    with pytest.raises(RuntimeError, match="grads\\[0\\]: dtype"):
        torch.ops.qlora_fast.adam_step_([p], [g], [m], [v], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(RuntimeError, match="exp_avgs\\[0\\]: expected 10 elements"):
        torch.ops.qlora_fast.adam_step_([p], [p.clone()], [torch.zeros(9)], [v], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
