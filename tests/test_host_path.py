"""The eager 4-bit path is thin: no custom-op dispatch, no host sync, no allocation besides the
launcher's output, the weight validated once; torch.compile still traces the custom ops.

The launchers are replaced by fakes that return an output of the right shape, so what runs is
exactly qlora_fast.functional / nn (QLORA_FAST_BACKEND=triton routes CPU tensors there under the
interpreter, as CUDA tensors go by default)."""
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_fast.functional import lora_linear, matmul_4bit, quantize_4bit
from qlora_fast.nn import Linear4bit


class OpLog(TorchDispatchMode):
    """Every op dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.name()))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fake_launchers(monkeypatch):
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    from qlora_fast.kernels import lora, nf4_matmul

    calls = []

    def matmul(x, weight, bias=None, transpose=False):
        calls.append("matmul")
        return x.new_empty(*x.shape[:-1], weight.shape[1] if transpose else weight.shape[0])

    def forward(x, weight, lora_A, lora_B, *rest):
        calls.append(type(weight))
        return x.new_empty(*x.shape[:-1], lora_B.shape[0]), x.new_empty(x.shape[:-1].numel(), lora_A.shape[0])

    monkeypatch.setattr(nf4_matmul, "matmul_validated", matmul)
    monkeypatch.setattr(lora, "lora_forward_validated", forward)
    return calls


def test_eager_decode_step_has_no_dispatch_sync_or_extra_allocation(seed, fake_launchers):
    layer = Linear4bit(96, 40, compute_dtype=torch.bfloat16).to(torch.bfloat16)
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    layer(x)  # first use: validates the state and caches the launcher's weight
    state = layer.quant_state
    with OpLog() as log:
        layer(x)
        matmul_4bit(x, layer.weight, state)
        with torch.no_grad():
            lora_linear(x, layer.weight, torch.randn(4, 96, dtype=torch.bfloat16),
                        torch.randn(40, 4, dtype=torch.bfloat16), 2.0, quant_state=state)
    ops = [op for op in log.ops if op != "aten::randn"]
    assert not [op for op in ops if op.startswith("qlora_fast::")], ops  # no custom-op dispatch in eager
    assert not [op for op in ops if "local_scalar" in op or "is_nonzero" in op or "item" in op], ops  # no sync
    # the fakes' outputs (new_empty) are the only tensors made: no casts, copies or reshapes
    assert all(op == "aten::new_empty" for op in ops), ops
    from qlora_fast.kernels.nf4_matmul import Weight4bit

    assert fake_launchers[-3:] == ["matmul", "matmul", Weight4bit]  # lora_forward gets the cached Weight4bit
    assert state.kernel_weight(layer.weight) is state.kernel_weight(layer.weight)  # built once, cached
    copy = pickle.loads(pickle.dumps(state))  # the cache stays behind (it holds a Triton-side type)
    assert copy._kernel is None and torch.equal(copy.absmax, state.absmax)


def test_eager_path_with_grad_runs_the_launchers_not_the_custom_op(seed, fake_launchers):
    packed, state = quantize_4bit(torch.randn(24, 32))
    x = torch.randn(3, 32, requires_grad=True)
    with OpLog() as log:
        matmul_4bit(x, packed, state).sum().backward()
    assert not [op for op in log.ops if op.startswith("qlora_fast::")], log.ops
    assert len(fake_launchers) == 2  # forward, and backward's transposed product


def test_compiled_graph_holds_the_custom_op(seed, monkeypatch):
    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")
    packed, state = quantize_4bit(torch.randn(24, 32))
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def record(g, _):
            graphs.append(g)
            return make_boxed_func(g)

        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    x = torch.randn(3, 32, requires_grad=True)
    out = torch.compile(lambda x: matmul_4bit(x, packed, state), backend=backend, fullgraph=True)(x)
    out.sum().backward()
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "qlora_fast.matmul_4bit.default" in targets, targets
    assert torch.equal(out, matmul_4bit(x, packed, state))


def test_make_fx_records_the_custom_op_not_the_launcher(seed, monkeypatch):
    # tracing outside torch.compile must not take the eager path: a tracer cannot see a launch
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    packed, state = quantize_4bit(torch.randn(16, 32))
    x = torch.randn(2, 32)
    graph = make_fx(lambda x: matmul_4bit(x, packed, state))(x)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert targets == ["qlora_fast.matmul_4bit.default"], targets
    assert torch.equal(graph(x), matmul_4bit(x, packed, state))


def test_launchers_trust_the_cached_weight_and_reuse_its_launch_plan(seed, monkeypatch):
    # the real launchers, with only the Triton kernel replaced: the module path's Weight4bit is
    # validated once and each call shape planned once; the public launcher checks every call
    from qlora_fast.kernels import nf4_matmul

    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")
    packed, state = quantize_4bit(torch.randn(40, 96))
    monkeypatch.setenv("QLORA_FAST_BACKEND", "triton")
    launches, checks = [], []

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((grid, meta))

    check = nf4_matmul.check_quantized
    monkeypatch.setattr(nf4_matmul, "_skinny_matmul_kernel", NoLaunch())
    monkeypatch.setattr(nf4_matmul, "check_quantized", lambda *args: checks.append(1) or check(*args))
    x = torch.randn(1, 96)
    for _ in range(3):
        matmul_4bit(x, packed, state)
    with OpLog() as log:
        matmul_4bit(x, packed, state)
    assert log.ops == ["aten::new_empty"], log.ops  # the output, nothing else
    x_grad = x.clone().requires_grad_()
    a, b = torch.randn(4, 96, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    for _ in range(2):
        matmul_4bit(x_grad, packed, state).sum().backward()
        lora_linear(x_grad, packed, a, b, 2.0, quant_state=state).sum().backward()
    assert len(checks) == 1 and len(launches) == 4 + 2 * 4, (len(checks), len(launches))
    assert launches[0][0] is launches[3][0] and launches[0][1] == launches[3][1]  # one plan, reused
    assert launches[4][1]["TRANSPOSE"] is False and launches[5][1]["TRANSPOSE"] is True
    with pytest.raises(ValueError, match="packed"):
        nf4_matmul.nf4_matmul(x, packed[:-1], state.absmax, state.code, (40, 96), state.blocksize,
                              state.nested_absmax, state.nested_code, state.offset)
    assert len(checks) == 2
