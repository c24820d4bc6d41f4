"""Shared test set-up: Triton runs in its CPU interpreter unless a GPU run asks otherwise,
and `assert_close` reports where tensors differ."""
import contextlib
import os

# Must be set before triton is imported anywhere: every kernel runs on the CPU in CI.
# bench/gpu_check.sh sets TRITON_INTERPRET=0 on a GPU machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 0.0, rtol: float = 0.0, msg: str = ""):
    """Fail with how many elements differ and the worst one; NaN anywhere is a failure."""
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{msg} actual has {int(torch.isnan(a).sum())} NaN"
    assert not torch.isnan(e).any(), f"{msg} expected has {int(torch.isnan(e).sum())} NaN"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index((err * bad).flatten().argmax(), err.shape)) if err.dim() else ()
        worst = err.max().item()
        raise AssertionError(
            f"{msg} {int(bad.sum())}/{err.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"worst {worst:.3e} at {idx}: actual {a[idx].item()!r} expected {e[idx].item()!r}"
        )


@pytest.fixture
def seed():
    """A fresh seed each run (printed on failure via the test id's output) so inputs vary."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture
def reference_backend(monkeypatch):
    """Dispatch to the plain-PyTorch reference path (a module opts in with
    `pytestmark = pytest.mark.usefixtures("reference_backend")`)."""
    monkeypatch.setenv("QLORA_FAST_BACKEND", "reference")


@contextlib.contextmanager
def no_dynamo():
    """Run with torch._dynamo disabled: bitsandbytes' pure-PyTorch fallbacks wrap themselves in
    torch.compile, and eager is enough for an oracle."""
    with torch._dynamo.config.patch(disable=True):
        yield
