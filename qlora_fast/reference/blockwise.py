"""The 8-bit blockwise codec, in plain PyTorch: the dynamic map, quantize/dequantize and the block
size, in one place for both of its users. A file of its own rather than a part of `quant.py`, so
that the optimizer's reference does not depend on the 4-bit weight format (`quant.py` imports it,
and reuses its blockwise scaling and nearest-code search for the 4-bit codes).

- Double quantization (`reference.quant`): the fp32 absmax of 4-bit weights, minus their mean, is
  coded with the signed map in blocks of `BLOCKSIZE_8BIT` (bitsandbytes' nested blocks).
- The 8-bit optimizers (`reference.optim`, the oracle of `qlora_fast._C`): Adam's first moment is
  coded with the signed map, the second with the unsigned one, per block of `BLOCKSIZE_8BIT`.

Both code a value as the nearest entry of a sorted 256-value map (ties to the lower entry) after
scaling its block into [-1, 1] by the block's absmax. They differ only in how the scale is taken,
and each must match its own peer byte for byte, so `quantize_blockwise_ref` has one `scaling`
switch rather than two codecs:

- "bitsandbytes" (the default): bitsandbytes' `quantize_blockwise` op, whose bytes the stored
  double-quantized absmax must equal: full blocks times `1 / max(absmax, 1e-38)`, the partial last
  block divided by `max(absmax, 1e-38)`, and that last absmax stored clamped.
- "reciprocal": the optimizer kernels (csrc/adamw_cpu.cpp, csrc/adamw.cu): every block, the
  partial last one too, times `1 / absmax` (0 for an all-zero block), absmax stored as it is.

For a block with absmax >= 1e-38 the two differ only in the partial last block, by at most one
fp32 rounding of the scaled value.
"""
import torch

__all__ = [
    "BLOCKSIZE_8BIT",
    "dynamic_map",
    "dynamic_map_signed",
    "quantize_blockwise_ref",
    "dequantize_blockwise_ref",
]

# Elements per block (one fp32 absmax each): bitsandbytes always double-quantizes in blocks of 256
# and its 8-bit optimizers keep states in blocks of 256. The kernels (kernels/nf4.py, which may not
# import qlora_fast, and csrc/adam_common.h) repeat it; tests check they agree.
BLOCKSIZE_8BIT = 256


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-value dynamic 8-bit code (sorted fp32): a sign bit when `signed`, a run of zero
    bits giving the decimal exponent (10^-6 .. 10^0), and the remaining bits a linear fraction in
    (0.1, 1) at its midpoints; plus 0 and 1. Same values as bitsandbytes' `create_dynamic_map`."""
    exponent_bits = 7
    values = []
    for i in range(exponent_bits):
        # With a sign bit, exponent i leaves i bits of fraction; without, i + 1.
        n_fraction = 2 ** (i + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += (scale * means).tolist()  # scaled in fp32, as bitsandbytes rounds them
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values in [-0.993, 1.0]): the code
    of the double-quantized absmax and of the optimizers' first moment, `dynamic_map(True)`."""
    return dynamic_map(True)


_SIGNED_MAP = dynamic_map_signed()
_SCALINGS = ("bitsandbytes", "reciprocal")


def _bucket_tables(code: torch.Tensor):
    """Midpoints between sorted code values and the map from sorted position to code index.

    Among equal code values (FP4's +0 and -0) the lower index comes first, as in bitsandbytes.
    """
    order = torch.sort(code, stable=True).indices
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (int32) for values in [-1, 1]; a value exactly between two
    goes to the lower. `code` may be unsorted (FP4's bit-pattern order)."""
    midpoints, order = _bucket_tables(code.to(scaled.device))
    bucket = torch.bucketize(scaled, midpoints, out_int32=True)
    if torch.equal(order, torch.arange(order.numel(), device=order.device)):
        return bucket  # a sorted table (NF4, the dynamic maps): the bucket is the index
    return order.to(torch.int32).index_select(0, bucket.reshape(-1)).reshape(bucket.shape)


def scale_blocks(flat: torch.Tensor, blocksize: int, scaling: str = "bitsandbytes"):
    """(fp32 absmax per block, the values scaled into [-1, 1]) of a flat fp32 tensor, the last
    block possibly partial; `scaling` as in the module docstring."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if scaling == "reciprocal":
        inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    else:
        inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = torch.clamp(blocks * inv.unsqueeze(1), -1, 1).reshape(-1)
    if rem:
        tail = flat[full:]
        last_absmax = tail.abs().max()
        if scaling == "reciprocal":
            tail = tail * torch.where(last_absmax > 0, 1.0 / last_absmax, torch.zeros_like(last_absmax))
        else:
            last_absmax = last_absmax.clamp(min=1e-38)
            tail = tail / last_absmax
        absmax = torch.cat([absmax, last_absmax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(tail, -1, 1)])
    return absmax, scaled


def scale_by_block(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * absmax[i // blocksize] (flat)."""
    n = values.numel()
    full = n - n % blocksize
    head = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    if full == n:
        return head
    return torch.cat([head, values[full:] * absmax[full // blocksize]])


def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor = None, blocksize: int = BLOCKSIZE_8BIT, *,
                           scaling: str = "bitsandbytes", positive_nonzero: bool = False):
    """8-bit blockwise quantization of a float tensor of any shape, to the exact nearest code.

    Returns (uint8 codes of x's shape, fp32 absmax of shape (ceil(n / blocksize),)). `code`: a
    sorted 256-value map, by default the signed dynamic map. `scaling`: "bitsandbytes" or
    "reciprocal" (module docstring). `positive_nonzero` (for the unsigned map, code[0] = 0): a
    positive value that rounds to code 0 takes code 1 instead (see `optim.adam8bit_step_ref`).
    """
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")
    code = _SIGNED_MAP if code is None else code
    absmax, scaled = scale_blocks(x.detach().reshape(-1).float(), blocksize, scaling)
    q = nearest_code(scaled, code)
    if positive_nonzero:
        q = torch.where((q == 0) & (scaled > 0), torch.ones_like(q), q)
    return q.to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise_ref(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor = None, blocksize: int = BLOCKSIZE_8BIT
) -> torch.Tensor:
    """Inverse of `quantize_blockwise_ref`: `code[q] * absmax[block]`, of q's shape (fp32 for the
    fp32 maps and absmax)."""
    code = (_SIGNED_MAP if code is None else code).to(q.device)
    return scale_by_block(code.index_select(0, q.reshape(-1).int()), absmax, blocksize).reshape(q.shape)
