"""Shared test set-up: Triton runs in its CPU interpreter unless a GPU run asks otherwise,
and `assert_close` reports where tensors differ."""
import contextlib
import os

# Must be set before triton is imported anywhere: every kernel runs on the CPU in CI.
# bench/gpu_check.sh sets TRITON_INTERPRET=0 on a GPU machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The one device switch of the kernel tests: QLORA_FAST_TEST_DEVICE (cpu or cuda). The default is the
# CPU under the interpreter, else CUDA. bench/gpu_check.sh runs the same tests with
# QLORA_FAST_TEST_DEVICE=cuda TRITON_INTERPRET=0; `--gpu-rehearsal` runs the gpu-marked tests on the CPU.
INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "on", "yes")
TEST_DEVICE = os.environ.get("QLORA_FAST_TEST_DEVICE") or ("cpu" if INTERPRET else "cuda")
ON_GPU = TEST_DEVICE == "cuda"


def pytest_addoption(parser):
    parser.addoption("--gpu-rehearsal", action="store_true", default=os.environ.get("QLORA_FAST_GPU_REHEARSAL") == "1",
                     help="run the gpu-marked tests on the CPU (tiny shapes, Triton interpreter) to prove their "
                          "imports and fixtures before a GPU window; also QLORA_FAST_GPU_REHEARSAL=1")


def pytest_configure(config):
    if TEST_DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"QLORA_FAST_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
    if ON_GPU and INTERPRET:
        raise pytest.UsageError("QLORA_FAST_TEST_DEVICE=cuda runs the compiled kernels: set TRITON_INTERPRET=0")
    if ON_GPU and not torch.cuda.is_available():
        raise pytest.UsageError("QLORA_FAST_TEST_DEVICE=cuda but torch sees no CUDA device")
    if config.getoption("--gpu-rehearsal") and ON_GPU:
        raise pytest.UsageError("--gpu-rehearsal runs on the CPU: unset QLORA_FAST_TEST_DEVICE=cuda")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu-rehearsal"):
        # a gpu test takes its device from the switch (the `device` or `on_test_device` fixture, or its
        # module imports TEST_DEVICE); one that hard-codes CUDA is only imported and collected here, and says so
        fixed = pytest.mark.skip(reason="hard-codes CUDA: not rehearsable on the CPU (take the `device` fixture)")
        for item in items:
            switched = {"device", "on_test_device"} & set(getattr(item, "fixturenames", ()))
            if "gpu" in item.keywords and not switched and getattr(item.module, "TEST_DEVICE", None) != TEST_DEVICE:
                item.add_marker(fixed)
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (or --gpu-rehearsal to run it on the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device a test puts its tensors on: the one switch above ("cpu" or "cuda")."""
    return torch.device(TEST_DEVICE)


@pytest.fixture
def on_test_device():
    """Make TEST_DEVICE torch's default device for the test, so a kernel test that builds its inputs
    with torch.randn(...) runs unchanged on CUDA (a module opts in with
    `pytestmark = pytest.mark.usefixtures("on_test_device")`). On the CPU it changes nothing."""
    if not ON_GPU:
        yield
        return
    torch.set_default_device(TEST_DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(None)


def sized(cpu, gpu):
    """A test size by device: the GPU case at full scale, the CPU rehearsal at interpreter scale."""
    return gpu if ON_GPU else cpu


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


@pytest.fixture
def one_thread():
    """The tiny models run fastest on one thread, and CI runs two test processes side by side."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def no_dynamo():
    """Run with torch._dynamo disabled: bitsandbytes' pure-PyTorch fallbacks wrap themselves in
    torch.compile, and eager is enough for an oracle."""
    with torch._dynamo.config.patch(disable=True):
        yield
