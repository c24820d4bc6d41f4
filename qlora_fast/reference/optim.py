"""Plain-PyTorch Adam/AdamW updates with fp32 or 8-bit blockwise states: the test oracle and
benchmark baseline for the `qlora_fast._C` optimizer ops (same math, same rounding points).

8-bit states follow bitsandbytes' blockwise 8-bit optimizers: the codec of `reference.blockwise`
(blocks of `BLOCKSIZE_8BIT` elements, one fp32 absmax per block, the kernels' "reciprocal" scaling),
the first moment coded with the signed dynamic map and the second with the unsigned one,
requantized to the nearest code after each update, except that a positive second moment never
takes code 0 (see `adam8bit_step_ref`).
"""
import math

from .blockwise import BLOCKSIZE_8BIT, dequantize_blockwise_ref, dynamic_map, quantize_blockwise_ref

QUANT_BLOCK = BLOCKSIZE_8BIT  # the optimizer's name for the codec's block size

__all__ = [
    "QUANT_BLOCK",
    "dynamic_map",
    "quantize_blockwise_ref",
    "dequantize_blockwise_ref",
    "adam_step_ref",
    "adam8bit_step_ref",
]


def _adam_math(p32, g32, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """In-place fp32 update of p32, m, v, in torch.optim.AdamW's (single-tensor) op order."""
    if decoupled:
        p32.mul_(1 - lr * weight_decay)
    else:
        g32 = g32.add(p32, alpha=weight_decay)
    m.lerp_(g32, 1 - beta1)
    v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p32.addcdiv_(m, denom, value=-step_size)


def adam_step_ref(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                  weight_decay=0.0, decoupled=True):
    """One Adam (decoupled=False) or AdamW step on one tensor, in place. `exp_avg`/`exp_avg_sq`
    are fp32; the param (fp32, bf16 or fp16) is updated in fp32 and rounded back once."""
    p32 = param.detach().float()
    _adam_math(p32, grad.float(), exp_avg, exp_avg_sq, step, lr, betas[0], betas[1], eps, weight_decay, decoupled)
    param.detach().copy_(p32)


def adam8bit_step_ref(param, grad, m_codes, v_codes, m_absmax, v_absmax, step, lr=1e-3,
                      betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True,
                      signed_map=None, unsigned_map=None):
    """One step with 8-bit blockwise states, in place: dequantize, update as `adam_step_ref`,
    requantize each block with its new absmax.

    The second moment is requantized with `positive_nonzero`: under nearest rounding every v
    below half the map's smallest positive code (~1.6e-7 of the block's absmax: a gradient
    ~2500x smaller than the block's largest) became exactly 0, and the next step divided the
    remembered m by sqrt((1-beta2) g^2) + eps (by eps where g = 0) instead of by its history, so
    the block-mates of an outlier drifted without bound. Rounding such v up only shortens their
    steps."""
    signed_map = dynamic_map(True) if signed_map is None else signed_map
    unsigned_map = dynamic_map(False) if unsigned_map is None else unsigned_map
    m = dequantize_blockwise_ref(m_codes.reshape(-1), m_absmax, signed_map)
    v = dequantize_blockwise_ref(v_codes.reshape(-1), v_absmax, unsigned_map)
    p32 = param.detach().float().reshape(-1)
    _adam_math(p32, grad.float().reshape(-1), m, v, step, lr, betas[0], betas[1], eps, weight_decay, decoupled)
    param.detach().copy_(p32.view_as(param))
    mq, ma = quantize_blockwise_ref(m, signed_map, scaling="reciprocal")
    vq, va = quantize_blockwise_ref(v, unsigned_map, scaling="reciprocal", positive_nonzero=True)
    m_codes.copy_(mq.view_as(m_codes))
    v_codes.copy_(vq.view_as(v_codes))
    m_absmax.copy_(ma)
    v_absmax.copy_(va)
