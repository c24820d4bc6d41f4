"""Reference 4-bit matmul and LoRA math in plain PyTorch.

The CPU path of `qlora_fast.functional.lora_linear` / `matmul_4bit`, the oracle of the kernels in
kernels/nf4_matmul.py and kernels/lora.py, and a benchmark baseline. Every function works in the
dtype it is given (float64 included, for gradcheck).
"""
from typing import Optional

import torch

from .blockwise import BLOCKSIZE_8BIT, dequantize_blockwise_ref
from .quant import dequantize_4bit_code_ref

__all__ = [
    "dequantize_weight_4bit_ref",
    "matmul_4bit_ref",
    "lora_forward_ref",
    "lora_backward_ref",
    "lora_linear_ref",
]


def dequantize_weight_4bit_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape,
                               blocksize: int, nested_absmax: Optional[torch.Tensor] = None,
                               nested_code: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                               nested_blocksize: int = BLOCKSIZE_8BIT,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) = `shape` weight from bitsandbytes-layout 4-bit tensors, in `dtype`.

    packed: uint8, first element in the high nibble; absmax: fp32 per block, or uint8 codes into
    `nested_code` scaled by `nested_absmax` (one per `nested_blocksize` absmax) plus `offset`.
    Values are computed in fp32 as bitsandbytes does, then cast.
    """
    absmax = absmax.reshape(-1)
    if nested_absmax is not None:
        absmax = dequantize_blockwise_ref(absmax, nested_absmax.float(), nested_code.float(), nested_blocksize)
        absmax = absmax + offset.float()
    return dequantize_4bit_code_ref(packed, absmax, code, (int(shape[0]), int(shape[1])), blocksize, dtype)


def matmul_4bit_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    transpose: bool = False) -> torch.Tensor:
    """x @ weight^T + bias (or x @ weight when `transpose`), weight already dequantized."""
    if transpose:
        out = x @ weight
        return out if bias is None else out + bias
    return torch.nn.functional.linear(x, weight, bias)


def lora_forward_ref(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scale: float, bias: Optional[torch.Tensor] = None,
                     x_adapter: Optional[torch.Tensor] = None):
    """(y, xa): y = x W^T + scale * xa B^T + bias with xa = x_adapter A^T (x_adapter defaults to x).

    x (..., in); weight (out, in); lora_A (r, in); lora_B (out, r). xa is (M, r), M = rows of x.
    """
    in_features = weight.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    xa = (x2 if x_adapter is None else x_adapter.reshape(-1, in_features)) @ lora_A.t()
    y = torch.nn.functional.linear(x2, weight, bias) + scale * (xa @ lora_B.t())
    return y.reshape(*lead, weight.shape[0]), xa


def lora_backward_ref(grad_out: torch.Tensor, x_adapter: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor,
                      lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                      dropout_mask: Optional[torch.Tensor] = None, need_grad_input: bool = True):
    """(grad_x or None, grad_A, grad_B) of `lora_forward_ref` with x_adapter = x * dropout_mask.

    grad_x = dY W + scale ((dY B) A) * mask; grad_A = scale (dY B)^T x_adapter; grad_B = scale dY^T xa.
    """
    out_features, in_features = weight.shape
    lead = grad_out.shape[:-1]
    dy = grad_out.reshape(-1, out_features)
    dyb = dy @ lora_B
    grad_A = scale * (dyb.t() @ x_adapter.reshape(-1, in_features))
    grad_B = scale * (dy.t() @ xa)
    grad_x = None
    if need_grad_input:
        low_rank = dyb @ lora_A
        if dropout_mask is not None:
            low_rank = low_rank * dropout_mask.reshape(-1, in_features)
        grad_x = (dy @ weight + scale * low_rank).reshape(*lead, in_features)
    return grad_x, grad_A, grad_B


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scale: float, bias: Optional[torch.Tensor] = None,
                    dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LoRA as PEFT writes it, differentiable by autograd: x W^T + bias + scale ((x * mask) A^T) B^T."""
    x_adapter = x if dropout_mask is None else x * dropout_mask
    base = torch.nn.functional.linear(x, weight, bias)
    return base + scale * torch.nn.functional.linear(torch.nn.functional.linear(x_adapter, lora_A), lora_B)
