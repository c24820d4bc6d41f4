"""8-bit AdamW under outlier and heavy-tailed gradients (issue 18 section 1).

Oracles: fp32 torch.optim.AdamW (where the block-mates of an outlier should go) and bitsandbytes'
CPU AdamW8bit on the same gradients (the deviation we must not exceed). Before the fix a positive
second moment below half the unsigned map's smallest code was stored as 0, and the block-mates
of a 1000x outlier drifted ~1 (Cauchy or sparse gradients: 10..10^6) from fp32 AdamW in 30 steps.
"""
import pytest
import torch

from qlora_fast.optim import AdamW8bit, PagedAdamW8bit
from qlora_fast.reference.optim import adam8bit_step_ref, dynamic_map

N = 4096 + 256 + 77  # >= bitsandbytes' min_8bit_size (4096), so both keep 8-bit states; a partial last block
STEPS = 30
LR = 1e-3


def gradients(kind: str, ratio: float, steps: int = STEPS, n: int = N):
    """`steps` gradients of `kind`, with 3 outliers per 256-block `ratio` times the typical size,
    and the mask of the block-mates (the non-outlier elements)."""
    blocks = -(-n // 256)
    outliers = torch.stack([torch.randperm(min(256, n - 256 * b))[:3] + 256 * b for b in range(blocks)]).flatten()
    mates = torch.ones(n, dtype=torch.bool)
    mates[outliers] = False
    fixed = torch.randn(n)
    grads = []
    for _ in range(steps):
        if kind == "student_t":
            g = torch.distributions.StudentT(2.0).sample((n,))
        elif kind == "cauchy":
            g = torch.distributions.Cauchy(0.0, 1.0).sample((n,))
        elif kind == "fixed":
            g = fixed.clone()
        else:
            g = torch.randn(n)
        if kind == "sparse":
            g[torch.rand(n) < 0.7] = 0.0
        sign = torch.where(torch.rand(outliers.numel()) < 0.5, -1.0, 1.0)
        g[outliers] = ratio * sign * (1 + torch.rand(outliers.numel()))
        grads.append(g)
    return grads, mates


def train(make_opt, p0, grads):
    p = torch.nn.Parameter(p0.clone())
    opt = make_opt([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("kind", ["normal", "fixed", "student_t", "cauchy", "sparse"])
@pytest.mark.parametrize("ratio", [10.0, 1e2, 1e3, 1e4])
def test_block_mates_of_outliers_follow_fp32_no_worse_than_bitsandbytes(seed, kind, ratio):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the 8-bit oracle (test extra)")
    grads, mates = gradients(kind, ratio)
    p0 = torch.randn(N)
    hyper = dict(lr=LR, weight_decay=0.0)
    fp32 = train(lambda ps: torch.optim.AdamW(ps, **hyper), p0, grads)
    ours = train(lambda ps: AdamW8bit(ps, **hyper), p0, grads)
    theirs = train(lambda ps: bnb.optim.AdamW8bit(ps, **hyper), p0, grads)
    ours_dev = (ours - fp32)[mates].abs()
    theirs_dev = (theirs - fp32)[mates].abs()
    fp32_moved = (fp32 - p0)[mates].abs().max().item()  # Adam moves an element at most ~lr per step
    # Typical block-mates no further from fp32 than bitsandbytes' (the mean; worst seen 1.01x), and
    # no block-mate drifting away (the max; before the fix it drifted ~1, 30x fp32's whole move).
    # The max is one element of ~4400 whose second moment sits at the bottom of the 8-bit map,
    # where codes are coarse: either rounding can lose on it (fresh CI seeds 2402010561, Student-t
    # 100x: 1.16x bnb's + 1e-3; 1628484346, fixed 100x: 1.11x fp32's move, bnb 0.93x; bnb alone
    # reaches 1.04x fp32's move on other seeds). 1,000 random cases pass these bounds.
    assert ours_dev.mean() <= 1.1 * theirs_dev.mean() + 1e-5, (ours_dev.mean(), theirs_dev.mean())
    assert ours_dev.max() <= 1.5 * theirs_dev.max() + 1e-3, (ours_dev.max(), theirs_dev.max())
    assert ours_dev.max() <= 1.25 * fp32_moved + 1e-3, (ours_dev.max(), fp32_moved)


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
def test_paged_and_unpaged_8bit_stay_bounded_under_cauchy_outliers(seed, cls):
    grads, mates = gradients("cauchy", 1e4, steps=20)
    p0 = torch.randn(N)
    kwargs = dict(budget=0.5, page_bytes=8 * 1024) if cls is PagedAdamW8bit else {}
    fp32 = train(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.01), p0, grads)
    ours = train(lambda ps: cls(ps, lr=LR, weight_decay=0.01, **kwargs), p0, grads)
    assert (ours - fp32)[mates].abs().max().item() <= 1.1 * (fp32 - p0)[mates].abs().max().item() + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_matches_reference_and_keeps_small_second_moments(seed, dtype):
    """The C++ op follows the reference on outlier gradients, and no positive second
    moment is stored as code 0 (the root cause of the drift), while exact zeros stay zero."""
    import qlora_fast

    qlora_fast.load_extension()
    n = 3 * 256 + 45
    p = torch.randn(n).to(dtype)
    p_ref = p.clone()
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    zero_code = int((signed == 0).nonzero()[0])
    blocks = -(-n // 256)
    ours = [torch.full((n,), zero_code, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
            torch.zeros(blocks), torch.zeros(blocks)]
    ref = [t.clone() for t in ours]
    zero = torch.zeros(n, dtype=torch.bool)
    zero[torch.randperm(n)[:50]] = True
    for step in range(1, 6):
        g = torch.randn(n)
        g[torch.randperm(n)[: n // 100]] *= 1e4
        g[zero] = 0.0
        g = g.to(dtype)
        torch.ops.qlora_fast.adam8bit_step_([p], [g], *[[t] for t in ours], signed, unsigned, [step],
                                            LR, 0.9, 0.999, 1e-8, 0.01, True)
        adam8bit_step_ref(p_ref, g, *ref, step, lr=LR, weight_decay=0.01)
        # As test_optim's single-step check: fp32 rounding may differ by an ulp (and then land
        # a value on the other side of a midpoint); continue both from the op's states.
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(p, p_ref, atol=ulp, rtol=ulp)
        for a, b in zip(ours[2:], ref[2:]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        for a, b in zip(ours[:2], ref[:2]):
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2
        p_ref.copy_(p)
        for a, b in zip(ours, ref):
            b.copy_(a)
    v_codes = ours[1]
    assert (v_codes[~zero] > 0).all()
    assert (v_codes[zero] == 0).all()


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
def test_overflowing_gradient_is_reported_naming_the_parameter(seed, cls):
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(64, 80))]
    # Paged: a budget of two pages, so the bad page may be streamed through a staging slot.
    kwargs = dict(page_bytes=2056, budget=2 * 2056) if cls is PagedAdamW8bit else {}
    opt = cls([{"params": params[:1]}, {"params": params[1:]}], min_8bit_size=256, **kwargs)
    for p in params:
        # large, but the second moment after two steps, ~2 (1 - beta2) g^2, still fits in float32 even
        # at a 6-sigma element (at 1e20 a 4.2-sigma one overflowed at the second step: ~1% of seeds)
        p.grad = torch.randn_like(p) * 1e19
    opt.step()
    params[1].grad[63, 79] = 1e21  # in the last page (streamed when paged)
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(64, 80\)"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checked_cpu_op_matches_the_plain_op_and_flags_overflow(seed, dtype):
    """`adam8bit_step_checked_` (the optimizer's CPU path) updates exactly as `adam8bit_step_`
    and returns True only when a new block absmax is not finite."""
    import qlora_fast

    qlora_fast.load_extension()
    ops = torch.ops.qlora_fast
    maps = (dynamic_map(True), dynamic_map(False))
    sizes = [3 * 256 + 45, 1, 256, 77]

    def fresh():
        torch.manual_seed(seed)
        ps = [torch.randn(n).to(dtype) for n in sizes]
        states = [
            [torch.zeros(n, dtype=torch.uint8) for n in sizes],
            [torch.zeros(n, dtype=torch.uint8) for n in sizes],
            [torch.zeros(-(-n // 256)) for n in sizes],
            [torch.zeros(-(-n // 256)) for n in sizes],
        ]
        return ps, states

    grads = [torch.distributions.StudentT(1.5).sample((n,)).to(dtype) for n in sizes]
    (pa, sa), (pb, sb) = fresh(), fresh()
    for step in (1, 2, 3):
        ops.adam8bit_step_(pa, grads, *sa, *maps, [step, step, step + 4, step], LR, 0.9, 0.999, 1e-8, 0.01, True)
        flag = ops.adam8bit_step_checked_(pb, grads, *sb, *maps, [step, step, step + 4, step], LR, 0.9, 0.999,
                                          1e-8, 0.01, True)
        assert flag is False
        for a, b in zip(pa + sum(sa, []), pb + sum(sb, [])):
            assert torch.equal(a, b)
    big = [g.clone() for g in grads]
    big[2][100] = float("inf") if dtype != torch.float32 else 1e21  # overflows (1 - beta2) * g * g
    assert ops.adam8bit_step_checked_(pb, big, *sb, *maps, [4] * 4, LR, 0.9, 0.999, 1e-8, 0.01, True) is True
    assert not torch.isfinite(sb[3][2]).all()
