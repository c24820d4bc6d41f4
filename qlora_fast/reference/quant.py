"""Reference 4-bit quantization (bitsandbytes-compatible), in plain PyTorch.

This is the CPU path, the test oracle of the Triton kernels in `kernels/nf4.py`, and a benchmark
baseline. Inputs are assumed valid here; `qlora_fast.functional.quant` checks them.

The format (bitsandbytes 0.50.2):
- the flattened tensor is cut into blocks of `blocksize` elements (the last may be partial);
  each block's fp32 absmax is stored; values are scaled into [-1, 1] and each is given the index
  of the nearest 4-bit code (ties go to the lower code);
- two codes per byte, the first element in the high nibble; an odd count is padded with a scaled 0;
- double quantization: `offset = mean(absmax)`; `absmax - offset` is quantized with the 8-bit
  blockwise codec of `reference.blockwise` (blocks of `BLOCKSIZE_8BIT`, signed dynamic map, bitsandbytes'
  scaling), giving uint8 absmax and fp32 nested absmax.

Two details of bitsandbytes are kept on purpose so that bytes match: full blocks are scaled with
`x * (1 / absmax)` but the partial last block with `x / absmax`; the stored absmax of a full block
is the raw max while that of the partial last block is clamped to at least 1e-38.
"""
import torch

from .blockwise import (
    BLOCKSIZE_8BIT,
    dequantize_blockwise_ref,
    dynamic_map_signed,
    nearest_code,
    quantize_blockwise_ref,
    scale_blocks,
    scale_by_block,
)

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "dynamic_map_signed",
    "code_for",
    "quantize_4bit_ref",
    "dequantize_4bit_ref",
    "dequantize_4bit_code_ref",
    "quantize_blockwise_ref",
    "dequantize_blockwise_ref",
    "quantize_absmax_ref",
    "dequantize_absmax_ref",
]

# NormalFloat4 (QLoRA): quantiles of N(0, 1) rescaled to [-1, 1], index 7 is exactly zero.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) listed in bit-pattern order, divided by its
# largest magnitude (12) in fp32 exactly as bitsandbytes builds it.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / 12.0

NESTED_BLOCKSIZE = BLOCKSIZE_8BIT  # the double quantization's name for the codec's block size


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-entry fp32 code table of `quant_type` ("nf4" or "fp4")."""
    return {"nf4": NF4_CODE, "fp4": FP4_CODE}[quant_type]


def quantize_4bit_ref(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Blockwise 4-bit quantization of a float tensor of any shape.

    Returns (packed uint8 of shape (ceil(n / 2), 1), absmax fp32 of shape (ceil(n / blocksize),)).
    """
    flat = x.reshape(-1).float()
    absmax, scaled = scale_blocks(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = nearest_code(scaled, code_for(quant_type)).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.unsqueeze(1), absmax


def dequantize_4bit_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of `quantize_4bit_ref`: `code[nibble] * absmax[block]` in fp32, cast to `out_dtype`.

    `absmax` is the fp32 per-block absmax (already decoded if it was double-quantized).
    """
    return dequantize_4bit_code_ref(packed, absmax, code_for(quant_type), shape, blocksize, out_dtype)


def dequantize_4bit_code_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape,
    blocksize: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`dequantize_4bit_ref` with the 16-entry code table given as a tensor instead of by name."""
    n = 1
    for s in shape:
        n *= int(s)
    code = code.to(packed.device).float()
    # one lookup per byte: a 256-entry table of (high nibble, low nibble) code pairs
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)
    values = pairs.index_select(0, packed.reshape(-1).int()).reshape(-1)[:n]
    return scale_by_block(values, absmax.float(), blocksize).to(out_dtype).reshape(shape)


def quantize_absmax_ref(absmax: torch.Tensor):
    """Double quantization of fp32 absmax: returns (uint8 codes, nested fp32 absmax, fp32 offset).

    `offset` is a 0-dim tensor, the mean of `absmax`.
    """
    offset = absmax.mean()
    q, nested_absmax = quantize_blockwise_ref(absmax - offset)
    return q, nested_absmax, offset


def dequantize_absmax_ref(
    q: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor, nested_code: torch.Tensor = None
) -> torch.Tensor:
    """fp32 absmax from its double quantization: `code8[q] * nested_absmax[q_block] + offset`."""
    return dequantize_blockwise_ref(q, nested_absmax, nested_code) + offset
