"""qlora_fast.optim on a CUDA device: the CUDA kernels against the C++ CPU ops, paged (budget
holding a quarter of the states) against unpaged, and state_dict moving between CPU and GPU.

Every test runs twice: on "cuda" (gpu-marked, skipped without a GPU) and as a CPU rehearsal with
the device swapped for the CPU (CPU op against itself, paging on the CPU), so imports, fixtures
and the extension loading are proven in CI before a GPU window. The CUDA runs are unverified
here: written on a machine without a GPU."""
import copy

import pytest
import torch
from conftest import TEST_DEVICE, assert_close

import qlora_fast
from qlora_fast.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from qlora_fast.reference.optim import dynamic_map, quantize_blockwise_ref

SHAPES = [(257, 131), (4099,), (1,), (3, 1000), (65536 + 13,)]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The device under test; loads the extension itself (the ops are called directly below). The
    gpu-marked case takes conftest's one switch: CUDA in the GPU check, the CPU in its rehearsal."""
    qlora_fast.load_extension()
    return torch.device(TEST_DEVICE if request.param == "cuda" else "cpu")


def make_params(dtype, device):
    return [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in SHAPES]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_32bit_op_matches_cpu_op(seed, dtype, device):
    params = [torch.randn(s).to(dtype) for s in SHAPES]
    grads = [torch.randn(s).to(dtype) for s in SHAPES]
    m = [torch.randn(s).reshape(-1) * 0.1 for s in SHAPES]
    v = [torch.rand(s).reshape(-1) * 0.01 for s in SHAPES]
    cuda = [[t.clone().to(device) for t in ts] for ts in (params, grads, m, v)]
    steps = [3] * len(SHAPES)
    torch.ops.qlora_fast.adam_step_(params, grads, m, v, steps, 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
    torch.ops.qlora_fast.adam_step_(*cuda, steps, 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
    ulp = torch.finfo(dtype).eps
    for ours, theirs in zip(cuda[0], params):
        assert_close(ours.cpu(), theirs, atol=ulp, rtol=ulp)  # built with -fmad=false: equal expected, 1 ulp allowed
    for ours, theirs in zip(cuda[2] + cuda[3], m + v):
        assert_close(ours.cpu(), theirs, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_8bit_op_matches_cpu_op(seed, dtype, device):
    n = 256 * 300 + 17
    p, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    mq, ma = quantize_blockwise_ref(torch.randn(n) * 0.1, dynamic_map(True))
    vq, va = quantize_blockwise_ref(torch.rand(n) * 0.01, dynamic_map(False))
    cpu = [p, g, mq, vq, ma, va]
    gpu = [t.clone().to(device) for t in cpu]
    maps = (dynamic_map(True), dynamic_map(False))
    args = ([5], 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
    torch.ops.qlora_fast.adam8bit_step_(*([t] for t in cpu), *maps, *args)
    torch.ops.qlora_fast.adam8bit_step_(*([t] for t in gpu), *(x.to(device) for x in maps), *args)
    ulp = torch.finfo(dtype).eps
    assert_close(gpu[0].cpu(), cpu[0], atol=ulp, rtol=ulp)
    assert_close(gpu[4].cpu(), cpu[4], rtol=1e-6)
    assert_close(gpu[5].cpu(), cpu[5], rtol=1e-6)
    for ours, theirs in ((gpu[2], cpu[2]), (gpu[3], cpu[3])):
        diff = (ours.cpu().int() - theirs.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_cuda_multi_op_matches_cpu_op(seed, device):
    """The optimizers' one-call step (`adam_multi_step_`: a pinned table, one copy, one launch per
    state kind and dtype on CUDA) against the CPU op: mixed dtypes, empty and 1-element params, a
    param split into pages, a param without a gradient, two groups; then the overflow flag."""
    ops = torch.ops.qlora_fast
    # (numel, dtype, kind, group, pages)
    layout = [(0, torch.float32, 0, 0, [(0, 0)]), (1, torch.bfloat16, 1, 1, [(0, 1)]),
              (4099, torch.float16, 1, 0, [(0, 2048), (2048, 4099)]), (65536 + 13, torch.float32, 0, 1, [(0, 65549)]),
              (257 * 131, torch.bfloat16, 1, 1, [(0, 257 * 131)]), (1000, torch.float16, 0, 0, [(0, 1000)])]
    maps = (dynamic_map(True), dynamic_map(False))
    params = [torch.randn(n).to(dt) for n, dt, *_ in layout]
    states, rows = [], []
    for i, (_, _, kind, group, pages) in enumerate(layout):
        for start, end in pages:
            rows.append((i, group, kind, start, end, len(states)))
            n = end - start
            if kind == 0:
                states += [torch.randn(n) * 0.1, torch.rand(n) * 0.01]
            else:
                (mq, ma), (vq, va) = (quantize_blockwise_ref(torch.randn(n) * 0.1, maps[0]),
                                      quantize_blockwise_ref(torch.rand(n) * 0.01, maps[1]))
                states += [mq, vq, ma, va]
    entries = torch.tensor(rows, dtype=torch.int64)
    hyper = [1e-2, 0.9, 0.999, 1e-8, 0.01, 3e-3, 0.8, 0.99, 1e-6, 0.1]
    cpu = [params, [torch.tensor(2.0) for _ in params], states]
    dev = [[t.clone().to(device) for t in params], [torch.tensor(2.0) for _ in params],
           [t.clone().to(device) for t in states]]
    flag = torch.zeros(1, dtype=torch.int32, device=device) if device.type == "cuda" else None
    for step in range(2):
        grads = [torch.randn(n).to(dt) for n, dt, *_ in layout]
        grads[3 + step] = None
        assert ops.adam_multi_step_(cpu[0], grads, cpu[1], cpu[2], entries, hyper, True, *maps, None) is False
        ops.adam_multi_step_(dev[0], [None if g is None else g.to(device) for g in grads], dev[1], dev[2], entries,
                             hyper, True, *(m.to(device) for m in maps), flag)
    assert [s.item() for s in dev[1]] == [s.item() for s in cpu[1]] == [4, 4, 4, 3, 3, 4]
    for ours, theirs in zip(dev[0], cpu[0]):
        ulp = torch.finfo(theirs.dtype).eps
        assert_close(ours.cpu(), theirs, atol=ulp, rtol=ulp)  # built with -fmad=false: equal expected, 1 ulp allowed
    for ours, theirs in zip(dev[2], cpu[2]):
        if theirs.dtype == torch.uint8:
            diff = (ours.cpu().int() - theirs.int()).abs()
            assert diff.numel() == 0 or (diff.max() <= 1 and (diff > 0).float().mean() < 1e-2)
        else:
            assert_close(ours.cpu(), theirs, atol=1e-7, rtol=1e-5)
    if flag is not None:
        assert flag.item() == 0
        grads = [torch.randn(n).to(dt).to(device) for n, dt, *_ in layout]
        grads[2][5] = float("inf")  # overflows the second moment of an 8-bit fp16 param
        ops.adam_multi_step_(dev[0], grads, dev[1], dev[2], entries, hyper, True, *(m.to(device) for m in maps), flag)
        assert flag.item() == 1


@pytest.mark.parametrize("paged_cls,cls", [(PagedAdamW, AdamW), (PagedAdamW8bit, AdamW8bit)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_quarter_budget_equals_unpaged(seed, paged_cls, cls, dtype, device, monkeypatch):
    params = make_params(dtype, device)
    peer = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = {"min_8bit_size": 0} if cls is AdamW8bit else {}
    reference = cls(peer, lr=1e-2, **kw)
    grads = [[torch.randn_like(p) for p in params] for _ in range(10)]
    run(reference, peer, grads[:1])
    state_bytes = sum(t.numel() * t.element_size() for s in reference.state.values()
                      for pg in s["pages"] for t in pg.tensors.values())
    page_bytes = 64 * 1024
    paged = paged_cls(params, lr=1e-2, budget=max(page_bytes, state_bytes // 4), page_bytes=page_bytes, **kw)
    run(paged, params, grads[:1])
    run(reference, peer, grads[1:])
    syncs = []  # issue 13: a paged step orders its copies with events, never a device sync
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(a))
    run(paged, params, grads[1:])
    monkeypatch.undo()
    assert syncs == []
    for p, q in zip(params, peer):
        assert torch.equal(p, q)
    stats = paged.paging_stats()[str(params[0].device)]
    assert stats["host_bytes"] > 0 and stats["resident_bytes"] <= stats["budget_bytes"]
    assert stats["last_step"]["h2d_bytes"] > 0


def test_fractional_budget_and_state_dict_across_devices(seed, device):
    params = make_params(torch.float32, "cpu")
    gpu_params = [torch.nn.Parameter(p.detach().clone().to(device)) for p in params]
    cpu_opt = AdamW8bit(params, lr=1e-2, min_8bit_size=0)
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    run(cpu_opt, params, grads[:3])
    gpu_opt = PagedAdamW8bit(gpu_params, lr=1e-2, min_8bit_size=0, budget=0.5)
    gpu_opt.load_state_dict(copy.deepcopy(cpu_opt.state_dict()))
    for p, q in zip(params, gpu_params):
        q.data.copy_(p.data)
    run(cpu_opt, params, grads[3:])
    run(gpu_opt, gpu_params, [[g.to(device) for g in gs] for gs in grads[3:]])
    for p, q in zip(params, gpu_params):
        assert_close(q.detach().cpu(), p.detach(), atol=1e-6, rtol=1e-6)
    back = AdamW8bit(params, lr=1e-2, min_8bit_size=0)
    back.load_state_dict(gpu_opt.state_dict())
    for s in back.state.values():
        assert all(t.device.type == "cpu" for pg in s["pages"] for t in pg.tensors.values())
