"""Matmul with a 4-bit (NF4 or FP4, bitsandbytes layout) weight: out = x @ W^T (+ bias).

Algorithm. The weight W (N, K) is stored flattened row-major, two 4-bit codes per byte (the
first element in the high nibble), one absmax per `blocksize` consecutive elements, and with
double quantization that absmax is itself a uint8 code into a 256-entry signed dynamic map,
scaled by one fp32 `nested_absmax` per 256 absmax values plus an fp32 `offset`:
    W[n, k] = code[nibble(n*K + k)] * (code8[absmax[(n*K+k) // bs]] * nested_absmax[.. // 256] + offset)
`_dequantize_4bit_tile` decodes any 2-D tile of W straight from those tensors in registers.

Two paths:
- `skinny` (M <= 16, decoding): `_nf4_matmul_kernel` tiles (M, N) and streams K; each step
  decodes a (BLOCK_K, BLOCK_N) tile of W in registers and feeds it to tl.dot, so the bf16 weight
  is never written anywhere. For x @ W^T with an even row length the packed bytes are loaded
  contiguously along rows and their two nibbles interleaved (`_dequantize_4bit_rows`); otherwise
  (odd rows, or dY @ W in backward) each element gathers its byte. Memory traffic is the packed weight (N*K/2 bytes) plus the uint8
  absmax (N*K/bs bytes) plus x and out: 14336x4096 reads ~30 MB, 0.010 ms at 3 TB/s. To fill the
  GPU when N/BLOCK_N programs are too few, K is split (SPLIT_K) into fp32 partial sums that a
  tiny torch sum reduces (deterministic, no atomics).
- `dequant` (M > 16): `_dequantize_4bit_kernel` writes W once into a reused workspace in the
  compute dtype and the vendor GEMM (cuBLAS) does the rest. Why not a fused dequant-GEMM here:
  at M = 4096, N = 14336, K = 4096 the GEMM is 481 GFLOP, ~0.6-0.7 ms on an H100, while the
  dequantization moves 30 MB in and 117 MB out, ~0.05 ms at 3 TB/s; a fused Triton GEMM saves
  that 0.05 ms only if it runs within ~7% of cuBLAS, which a Triton GEMM with a decode in its
  inner loop does not reliably do. The workspace keeps the extra memory to one weight's worth
  per (device, dtype), reused by every layer. This choice is reasoned from bandwidth and FLOP
  figures; it is NOT measured (no GPU was available when it was written): bench/gpu_lora.py
  times both (`method="fused"` vs `method="dequant"`) so the threshold can be set by measurement.

`_dequantize_4bit_operand` (either decode, as a tl.dot operand) is reused by kernels/lora.py for
the fused LoRA GEMM with an NF4 base.
This module imports torch and triton only.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .utils import INTERPRET

# Below or at this many rows the fused (decode-in-registers) kernel is used by `method="auto"`.
SKINNY_MAX_M = 16

_workspaces: dict = {}


class Weight4bit(NamedTuple):
    """A 4-bit weight of `shape` (out, in) in bitsandbytes' layout, as plain tensors.

    `nested_absmax`, `nested_code` and `offset` are None without double quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple
    blocksize: int
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_blocksize: int = 256

    def check(self) -> bool:
        """Validate the tensors; returns whether the weight is double-quantized."""
        return check_quantized(self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code,
                               self.offset, self.shape, self.blocksize)

    def pointer_args(self) -> tuple:
        """The six tensor arguments `_dequantize_4bit_tile` takes, in order."""
        return _quant_args(self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset)


@triton.jit
def _block_scale(
    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
):
    """fp32 absmax of the quantization blocks `block` (any shape), decoding the double-quantized
    absmax when NESTED; 0 where masked."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize_4bit_tile(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    flat, mask,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
):
    """fp32 values of the weight elements at flat indices `flat` (any shape); 0 where masked."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, flat // BLOCKSIZE, mask,
                         NESTED, NESTED_BLOCKSIZE)
    return value * scale


@triton.jit
def _dequantize_4bit_rows(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    offs_n, n_mask, k0, k_end, ROW: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 tile W[offs_n, k0:k0+BLOCK_K] as (BLOCK_N, BLOCK_K) for a row-major W with an even
    row length (so rows start on a byte and k0, k_end are even): each byte is loaded once,
    contiguously along the row, and its two nibbles are interleaved back into place."""
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask = n_mask[:, None] & (offs_b * 2 < k_end)[None, :]
    byte_idx = offs_n[:, None] * (ROW // 2) + offs_b[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
    # both nibbles of a byte share a block (blocksize is even): one scale per byte
    block = (byte_idx * 2) // BLOCKSIZE
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask, NESTED, NESTED_BLOCKSIZE)
    high = tl.load(code_ptr + (byte >> 4), mask=mask, other=0.0) * scale
    low = tl.load(code_ptr + (byte & 15), mask=mask, other=0.0) * scale
    return tl.interleave(high, low)


@triton.jit
def _dequantize_4bit_operand(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    offs_k, k_mask, offs_n, n_mask, k0, k_end, stride_wk, stride_wn, ROW_PAIRS: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 (BLOCK_K, BLOCK_N) right-hand tl.dot operand Wop[offs_k, offs_n], Wop[k, n] being the
    weight element at flat index k * stride_wk + n * stride_wn; 0 where masked. ROW_PAIRS: 0, or
    the (even) row length when Wop = W^T is read along W's rows (`_dequantize_4bit_rows`, whole
    bytes loaded contiguously) instead of one gathered byte per element."""
    if ROW_PAIRS:
        w = tl.trans(_dequantize_4bit_rows(
            packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
            offs_n, n_mask, k0, k_end, ROW_PAIRS, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, BLOCK_K,
        ))
    else:
        w = _dequantize_4bit_tile(
            packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
            offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, k_mask[:, None] & n_mask[None, :],
            BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
        )
    return w


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < numel
    w = _dequantize_4bit_tile(
        packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
        flat, mask, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
    )
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    bias_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ROW_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[s, m, n] = sum over this split's k of x[m, k] * W[n, k] (+ bias in split 0).

    W[n, k] sits at flat index n * stride_wn + k * stride_wk of the quantized tensor, so the
    same kernel computes x @ W^T (stride_wn=K, stride_wk=1) and dY @ W (strides swapped).
    ROW_PAIRS: 0, or K when W is read along its (even-length) rows: then whole bytes are loaded
    contiguously (`_dequantize_4bit_rows`) instead of one gathered byte per element.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        # Upcast right after the load: bf16 arithmetic is broken in Triton's interpreter.
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        ).to(tl.float32)
        w = _dequantize_4bit_operand(
            packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
            offs_k, k_mask, offs_n, n_mask, k0, k_end, stride_wk, stride_wn, ROW_PAIRS,
            BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, BLOCK_K,
        )
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def dot_dtype(dtype: torch.dtype):
    """(tl operand dtype, input_precision) for tl.dot on activations of `dtype`.

    bf16 operands are what the GPU's tensor cores want, but the interpreter multiplies bf16's raw
    bits, so there bf16 is fed to the dot as fp32. fp32 uses exact ("ieee") products, like
    torch.matmul's default; 16-bit operands keep tl.dot's default (None).
    """
    if dtype == torch.float16:
        return tl.float16, None
    if dtype == torch.bfloat16:
        return (tl.float32, "ieee") if INTERPRET else (tl.bfloat16, None)
    if dtype == torch.float32:
        return tl.float32, "ieee"
    raise TypeError(f"activations must be float16, bfloat16 or float32, got {dtype}")


def check_quantized(packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize):
    """Validate the 4-bit weight tensors (bitsandbytes layout); raise ValueError/TypeError naming the bad one."""
    if len(shape) != 2:
        raise ValueError(f"shape must be (out_features, in_features), got {tuple(shape)}")
    numel = int(shape[0]) * int(shape[1])
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed must hold ceil({numel}/2) = {(numel + 1) // 2} bytes, got {packed.numel()}")
    if numel >= 2**31:
        raise ValueError(f"weights with 2**31 or more elements are not supported, got {numel}")
    if blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a positive power of two, got {blocksize}")
    n_blocks = -(-numel // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax must have {n_blocks} values (one per block of {blocksize}), got {absmax.numel()}")
    if code.numel() != 16 or code.dtype != torch.float32:
        raise ValueError(f"code must be a float32 table of 16 values, got {code.dtype} {tuple(code.shape)}")
    nested = nested_absmax is not None
    if nested:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"absmax must be uint8 with double quantization, got {absmax.dtype}")
        if nested_code is None or offset is None:
            raise ValueError("double quantization needs nested_code and offset as well as nested_absmax")
        if nested_code.numel() != 256 or nested_absmax.dtype != torch.float32:
            raise ValueError("nested_code must have 256 values and nested_absmax must be float32")
    elif absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
    return nested


def _quant_args(packed, absmax, code, nested_absmax, nested_code, offset):
    nested = nested_absmax is not None
    # Unused pointer slots get a valid tensor (never read: NESTED is a constexpr).
    return (
        packed, absmax, code.contiguous(),
        nested_absmax if nested else absmax,
        nested_code.contiguous() if nested else code,
        offset.reshape(1).float() if nested else code,
    )


def dequantize_4bit_into(packed, absmax, code, shape, blocksize, nested_absmax=None, nested_code=None,
                         offset=None, nested_blocksize=256, dtype=torch.bfloat16, out=None):
    """Dequantize a 4-bit weight of `shape` into `out` (or a new tensor) of `dtype`; returns it."""
    nested = check_quantized(packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize)
    numel = int(shape[0]) * int(shape[1])
    if out is None:
        out = torch.empty(tuple(shape), device=packed.device, dtype=dtype)
    block = 1024
    _dequantize_4bit_kernel[(triton.cdiv(numel, block),)](
        *_quant_args(packed, absmax, code, nested_absmax, nested_code, offset), out, numel,
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize, BLOCK=block,
    )
    return out


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused flat buffer of at least `numel` elements per (device, dtype) (grown, never shrunk).

    Callers must finish with it before the next call: it is overwritten by the next layer.
    """
    key = (torch.device(device), dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf[:numel]


def dequantize_to_workspace(packed, absmax, code, shape, blocksize, nested_absmax=None, nested_code=None,
                            offset=None, nested_blocksize=256, dtype=torch.bfloat16):
    """The weight of `shape`, dequantized into the shared workspace (valid until the next call)."""
    numel = int(shape[0]) * int(shape[1])
    buf = workspace(numel, dtype, packed.device).view(tuple(shape))
    return dequantize_4bit_into(packed, absmax, code, shape, blocksize, nested_absmax, nested_code,
                                offset, nested_blocksize, dtype, out=buf)


def row_pairs(in_features: int, blocksize: int, transpose: bool) -> int:
    """The ROW_PAIRS constexpr: in_features when W is read along even-length rows, else 0."""
    return in_features if not transpose and in_features % 2 == 0 and blocksize % 2 == 0 else 0


def split_k_launch(M, N, K, device, dtype):
    """Tiles and split-K partition of an (M, K) x (K, N) product, shared by the 4-bit and LoRA
    matmul kernels: (block_m, block_n, block_k, k_per_split, out), where `out` is the (split, M,
    N) buffer the programs write (in `dtype` when unsplit, fp32 partial sums otherwise;
    `reduce_splits` finishes it)."""
    block_m = 16 if M <= SKINNY_MAX_M else 64
    block_n = 64 if N >= 64 else max(16, triton.next_power_of_2(N))
    block_k = 128 if K >= 128 else max(16, triton.next_power_of_2(K))
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    # Few rows: aim for a few hundred programs so a GPU's ~130 SMs are busy; each split keeps
    # >= 4 K-steps. Many rows (a forced fused call) fill the GPU without splitting.
    split = 1
    if not INTERPRET and M <= SKINNY_MAX_M:
        while programs * split * 2 <= 512 and K // (split * 2) >= 4 * block_k:
            split *= 2
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    out = torch.empty((split, M, N), device=device, dtype=dtype if split == 1 else torch.float32)
    return block_m, block_n, block_k, k_per_split, out


def reduce_splits(out, dtype):
    """The (M, N) result of a `split_k_launch` buffer."""
    return out[0] if out.shape[0] == 1 else out.sum(0).to(dtype)


def nf4_matmul(x, packed, absmax, code, shape, blocksize, nested_absmax=None, nested_code=None,
               offset=None, nested_blocksize=256, bias=None, transpose=False, method="auto"):
    """x @ W^T + bias (or x @ W when `transpose`) with W (out, in) = `shape` stored 4-bit.

    x: (..., in) (or (..., out) when `transpose`) in float16, bfloat16 or float32; returns
    (..., out) (or (..., in)) in x's dtype. `method`: "fused" (decode in registers, no weight
    written), "dequant" (workspace + vendor GEMM) or "auto" (fused for M <= SKINNY_MAX_M rows).
    Raises ValueError/TypeError for mismatched shapes or dtypes.
    """
    nested = check_quantized(packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize)
    out_features, in_features = int(shape[0]), int(shape[1])
    k_dim, n_dim = (out_features, in_features) if transpose else (in_features, out_features)
    if x.shape[-1] != k_dim:
        raise ValueError(f"x must have last dimension {k_dim}, got shape {tuple(x.shape)}")
    dot_dt, precision = dot_dtype(x.dtype)
    if bias is not None and (bias.shape != (n_dim,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({n_dim},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if method not in ("auto", "fused", "dequant"):
        raise ValueError(f"method must be 'auto', 'fused' or 'dequant', got {method!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_dim)
    M = x2.shape[0]
    if method == "dequant" or (method == "auto" and M > SKINNY_MAX_M):
        w = dequantize_to_workspace(packed, absmax, code, shape, blocksize, nested_absmax, nested_code,
                                    offset, nested_blocksize, x.dtype)
        if transpose:
            out = x2 @ w if bias is None else torch.addmm(bias, x2, w)
        else:
            out = torch.nn.functional.linear(x2, w, bias)
        return out.reshape(*lead, n_dim)

    block_m, block_n, block_k, k_per_split, out = split_k_launch(M, n_dim, k_dim, x.device, x.dtype)
    stride_wn, stride_wk = (1, in_features) if transpose else (in_features, 1)
    grid = (triton.cdiv(n_dim, block_n), triton.cdiv(M, block_m), out.shape[0])
    _nf4_matmul_kernel[grid](
        x2, *_quant_args(packed, absmax, code, nested_absmax, nested_code, offset),
        bias if bias is not None else x2, out,
        M, n_dim, k_dim, k_per_split,
        x2.stride(0), x2.stride(1), stride_wn, stride_wk, out.stride(0), out.stride(1), out.stride(2),
        BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dt, INPUT_PRECISION=precision,
        ROW_PAIRS=row_pairs(in_features, blocksize, transpose),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return reduce_splits(out, x.dtype).reshape(*lead, n_dim)
