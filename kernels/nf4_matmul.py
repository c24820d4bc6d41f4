"""Matmul with a 4-bit (NF4 or FP4, bitsandbytes layout) weight: out = x @ W^T (+ bias), or dY @ W.

Algorithm. The weight W (N, K) is stored flattened row-major, two 4-bit codes per byte (the
first element in the high nibble), one absmax per `blocksize` consecutive elements, and with
double quantization that absmax is itself a uint8 code into a 256-entry signed dynamic map,
scaled by one fp32 `nested_absmax` per `nested_blocksize` absmax values plus an fp32 `offset`:
    W[n, k] = code[nibble(n*K + k)] * (code8[absmax[(n*K+k) // bs]] * nested_absmax[.. // nbs] + offset)
The one decoder of that format is kernels/nf4.py's (`_block_scale`, `_code_lanes`,
`_decode_pairs`): the same code and the same roundings here and in the dequantize kernel, so the
fused paths decode bit for bit what bitsandbytes does (tests/test_decode_kernels.py).

Two paths:
- `skinny` (M <= 16, decoding; also the fused LoRA of kernels/lora.py): `_skinny_matmul_kernel`
  reads W along its rows in (64, 64) tiles, 16 packed bytes per thread per step in one vector
  load (`ld.global.v4`) when in_features % 32 == 0, one block scale per 32 elements, the 4-bit
  code fetched by a warp shuffle from a register table (no memory access per nibble), and feeds
  the decoded tile to tl.dot; the bf16 weight is never written anywhere. The forward (x @ W^T)
  owns output rows of W and streams K; the transposed product (dY @ W, backward) owns columns
  and streams N, reading the same row-major chunks. num_stages=1: nothing is worth staging in
  shared memory (the tile goes through it once, as the tl.dot operand: 12-16 KB per block).
  Memory traffic is the packed weight (N*K/2 bytes) plus the absmax (N*K/bs bytes) plus x and
  out: 14336x4096 reads ~30 MB, ~0.010 ms at 3 TB/s. When the output tiles are too few to fill
  the GPU, the reduction is split over program axis 2; the fp32 partials go to a reused
  workspace and the last split of each tile to arrive (a per-tile counter, atomically
  incremented, reset by that program) sums them in split order (deterministic), applies the
  epilogue and stores the output: one launch, no per-call allocation but the output (CUDA-graph
  capturable once the workspace exists). An odd in_features (rows not starting on a byte) takes
  the `dequant` path instead.
- `dequant` (M > 16): kernels/nf4.py's dequantize kernel writes W once into a reused workspace in
  the compute dtype and the vendor GEMM (cuBLAS) does the rest. Why not a fused dequant-GEMM here:
  at M = 4096, N = 14336, K = 4096 the GEMM is 481 GFLOP, ~0.6-0.7 ms on an H100, while the
  dequantization moves 30 MB in and 117 MB out, ~0.05 ms at 3 TB/s; a fused Triton GEMM saves
  that 0.05 ms only if it runs within ~7% of cuBLAS, which a Triton GEMM with a decode in its
  inner loop does not reliably do. The workspace keeps the extra memory to one weight's worth
  per (device, dtype), reused by every layer.

What is measured and what is not: instruction counts, vector widths, registers and shared memory
come from compiling for sm_80/sm_90 on the CPU (bench/aot_compile.py); every speed figure and
the tile/split choices (`skinny_config`, SKINNY_MAX_M) are estimates: nothing here has run on a
GPU yet. bench/gpu_matmul.py times fused vs dequant so the threshold can be set by measurement.
This module imports torch and triton only.

Workspaces: the reused buffers (dequantized weight, split-K partials and counters) live in a
module-level dict per (device, dtype, kind) and are never shrunk; `release_workspaces()` drops
them (memory measurements that must not count them, or after the last 4-bit layer is gone).

Diagnostic switch, read once at import (to narrow a kernel failure down on a GPU):
- QLORA_FAST_SPLIT_K=n (a positive integer): the skinny kernel's planner uses n splits of the
  reduction whenever a caller does not force a count (`split_k=None`), instead of choosing one;
  QLORA_FAST_SPLIT_K=1 turns split-K off (no partials, no counters, no atomics). Unset or empty:
  automatic. An explicit `split_k` argument still wins. See also QLORA_FAST_NO_SHFL in kernels/nf4.py.
"""
import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import nf4 as _nf4
from .nf4 import NESTED_BLOCKSIZE, _block_scale, _code_lanes, _decode_pairs
from .utils import INTERPRET, on_device_of

# Below or at this many rows the fused (decode-in-registers) kernel is used by `method="auto"`.
SKINNY_MAX_M = 16

_workspaces: dict = {}


def _env_split_k():
    value = os.environ.get("QLORA_FAST_SPLIT_K", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"QLORA_FAST_SPLIT_K must be a positive integer (1: no split-K), got {value!r}")
    return n


# QLORA_FAST_SPLIT_K (module docstring): the split count the planner uses when no caller forces one.
FORCE_SPLIT_K = _env_split_k()


class _Weight4bitFields(NamedTuple):
    """The fields of `Weight4bit` (a NamedTuple cannot hold the launch cache; its subclass can)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple
    blocksize: int
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def check(self) -> bool:
        """Validate the tensors; returns whether the weight is double-quantized."""
        return check_quantized(self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code,
                               self.offset, self.shape, self.blocksize)

    def pointer_args(self) -> tuple:
        """The six 4-bit tensor arguments of `_skinny_matmul_kernel` (packed .. offset), in order."""
        return _quant_args(self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset)


class Launch4bit(NamedTuple):
    """What every launch on one `Weight4bit` reuses: its (out, in) `shape` as ints, the six
    `pointers` (packed .. offset), `row_bytes`, whether the fused kernels can read it (`fused`:
    rows start on a byte), its kernel `constexprs`, and `plans`: per call shape, the grid, split
    and constexprs of `_skinny_matmul_kernel` (see `skinny_launch`)."""

    shape: tuple
    pointers: tuple
    row_bytes: int
    fused: bool
    constexprs: dict
    plans: dict


class Weight4bit(_Weight4bitFields):
    """A 4-bit weight of `shape` (out, in) in bitsandbytes' layout, as plain tensors.

    `nested_absmax`, `nested_code` and `offset` are None without double quantization. A tuple in
    field order (it unpacks into `nf4_matmul`'s arguments). `launch_args` validates it once and
    keeps what every launch reuses: a weight built once (QuantState.kernel_weight) is checked once.
    """

    def launch_args(self) -> Launch4bit:
        """The weight, validated on the first call (ValueError/TypeError naming the bad field), as
        the launch arguments that do not change between calls; cached on this object after."""
        try:
            return self._launch
        except AttributeError:
            pass
        nested = self.check()
        out_features, in_features = int(self.shape[0]), int(self.shape[1])
        constexprs = dict(WEIGHT_4BIT=True, BLOCKSIZE=self.blocksize, NESTED=nested,
                          NESTED_BLOCKSIZE=self.nested_blocksize,
                          CHUNK_SCALE=in_features % 32 == 0 and self.blocksize >= 32)
        self._launch = Launch4bit((out_features, in_features), self.pointer_args(), in_features // 2,
                                  bool(row_pairs(in_features, self.blocksize)), constexprs, {})
        return self._launch

    def __getstate__(self):
        return None  # copies and pickles leave the cache behind (it holds workspace views)


@triton.jit
def _decode_rows(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table,
    rows, row_ok, k0, K, row_bytes,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, CHUNK_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CB: tl.constexpr,
):
    """fp32 W[rows, k0:k0+BLOCK_C] as (BLOCK_R, BLOCK_C) of a row-major 4-bit W with an even row
    length K (rows start on a byte), in chunks of CB bytes per thread (one vector load each).
    CHUNK_SCALE: K % (2 CB) == 0, so a chunk never straddles a quantization block or a row end:
    one block scale per chunk and a per-chunk mask (vector loads stay whole). Otherwise one scale
    and mask per byte. Entries outside the weight are finite garbage: callers zero the other operand."""
    CPR: tl.constexpr = BLOCK_C // (2 * CB)
    kc = k0 + tl.arange(0, CPR) * (2 * CB)  # first element of each chunk
    byte = rows[:, None, None] * row_bytes + (kc // 2)[None, :, None] + tl.arange(0, CB)[None, None, :]
    if CHUNK_SCALE:
        ok = row_ok[:, None] & (kc < K)[None, :]
        b = tl.load(packed_ptr + byte, mask=ok[:, :, None], other=0).to(tl.int32)
        block = (rows[:, None] * K + kc[None, :]) // BLOCKSIZE
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, ok,
                             NESTED, NESTED_BLOCKSIZE)[:, :, None]
    else:
        kk = kc[None, :, None] + 2 * tl.arange(0, CB)[None, None, :]
        ok = row_ok[:, None, None] & (kk < K)
        b = tl.load(packed_ptr + byte, mask=ok, other=0).to(tl.int32)
        scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                             (rows[:, None, None] * K + kk) // BLOCKSIZE, ok, NESTED, NESTED_BLOCKSIZE)
    high, low = _decode_pairs(b, table, code_ptr)
    return tl.reshape(tl.join(high * scale, low * scale), (BLOCK_R, BLOCK_C))


@triton.jit
def _weight_tile(
    w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table,
    rows, row_ok, k0, K, row_bytes, stride_wn, stride_wk,
    WEIGHT_4BIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    CHUNK_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CB: tl.constexpr,
):
    """fp32 (BLOCK_R, BLOCK_C) tile W[rows, k0:k0+BLOCK_C] of W (N, K): decoded from 4 bits, or
    loaded from a dense W at w_ptr + n * stride_wn + k * stride_wk (0 outside)."""
    if WEIGHT_4BIT:
        w = _decode_rows(w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table,
                         rows, row_ok, k0, K, row_bytes, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, CHUNK_SCALE,
                         BLOCK_R, BLOCK_C, CB)
    else:
        cols = k0 + tl.arange(0, BLOCK_C)
        # upcast right after the load: bf16 arithmetic is broken in Triton's interpreter
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=row_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    return w


@triton.jit
def _skinny_matmul_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    lo_ptr, hi_ptr, mask_ptr, bias_ptr, out_ptr, partial_ptr, lock_ptr,
    M, N, K, L, row_bytes, RED_PER_SPLIT, n_splits, scale,
    stride_am, stride_ak, stride_wn, stride_wk, stride_lm, stride_lr, stride_hr, stride_hp,
    stride_mm, stride_mp, stride_om, stride_op,
    TRANSPOSE: tl.constexpr, WEIGHT_4BIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, CHUNK_SCALE: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, W_LEFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, CB: tl.constexpr,
):
    """out (M, P) = a @ Wop [+ scale * (lo @ hi) * mask] [+ bias] for a weight W (N, K) stored
    row-major (4-bit, `row_bytes` bytes a row, or dense with strides):
      forward (TRANSPOSE=False): a = x (M, K), Wop = W^T, P = N; a program owns BLOCK_R rows of W
        (output columns) and streams K in (BLOCK_R, BLOCK_C) tiles;
      transposed: a = dY (M, N), Wop = W, P = K; a program owns BLOCK_C columns of W and streams N.
    Either way W is read along its rows in whole-byte vector chunks. lo (M, L), hi (L, P), mask (M, P).
    SPLIT: program axis 2 takes RED_PER_SPLIT of the reduced dimension; its fp32 partial goes to
    `partial_ptr`, and the last split of a tile to arrive (counted in lock_ptr, reset to 0 after)
    sums all partials in split order (deterministic), applies the epilogue and stores `out`.
    W_LEFT: the decoded (64-wide) tile is the left tl.dot operand (out^T = Wop^T a^T): with 16-bit
    operands that lowers to wgmma on sm_90 with no warp replicating another's MMA (compiled: ~6 SASS
    instructions per element against ~7.5 the other way round); fp32 (FMA) keeps a @ Wop.
    """
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    red_start = pid_s * RED_PER_SPLIT
    CPR: tl.constexpr = BLOCK_C // (2 * CB)
    table = _code_lanes(code_ptr, tl.zeros((BLOCK_R, CPR, CB), tl.int32))
    if TRANSPOSE:
        P = K
        red_end = tl.minimum(red_start + RED_PER_SPLIT, N)
        offs_p = pid_p * BLOCK_C + tl.arange(0, BLOCK_C)
        if W_LEFT:
            acc_t = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for n0 in range(red_start, red_end, BLOCK_R):
            rows = n0 + tl.arange(0, BLOCK_R)
            row_ok = rows < red_end
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + rows[None, :] * stride_ak,
                        mask=m_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
            w = _weight_tile(w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table,
                             rows, row_ok, pid_p * BLOCK_C, K, row_bytes, stride_wn, stride_wk, WEIGHT_4BIT,
                             BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, CHUNK_SCALE, BLOCK_R, BLOCK_C, CB)
            if W_LEFT:
                acc_t += tl.dot(tl.trans(w).to(DOT_DTYPE), tl.trans(a).to(DOT_DTYPE), input_precision=INPUT_PRECISION)
            else:
                acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
        if W_LEFT:
            acc = tl.trans(acc_t)
    else:
        P = N
        red_end = tl.minimum(red_start + RED_PER_SPLIT, K)
        offs_p = pid_p * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = offs_p < N
        if W_LEFT:
            acc_t = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(red_start, red_end, BLOCK_C):
            cols = k0 + tl.arange(0, BLOCK_C)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + cols[None, :] * stride_ak,
                        mask=m_ok[:, None] & (cols < red_end)[None, :], other=0.0).to(tl.float32)
            w = _weight_tile(w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table,
                             offs_p, row_ok, k0, K, row_bytes, stride_wn, stride_wk, WEIGHT_4BIT,
                             BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, CHUNK_SCALE, BLOCK_R, BLOCK_C, CB)
            if W_LEFT:
                acc_t += tl.dot(w.to(DOT_DTYPE), tl.trans(a).to(DOT_DTYPE), input_precision=INPUT_PRECISION)
            else:
                acc += tl.dot(a.to(DOT_DTYPE), tl.trans(w).to(DOT_DTYPE), input_precision=INPUT_PRECISION)
        if W_LEFT:
            acc = tl.trans(acc_t)
    p_ok = offs_p < P
    out_ok = m_ok[:, None] & p_ok[None, :]
    if SPLIT:
        tile = pid_m * tl.num_programs(0) + pid_p
        part = partial_ptr + offs_m[:, None] * P + offs_p[None, :]
        tl.store(part + pid_s * (M * P), acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        last = count == n_splits - 1
        # (count broadcast as a tensor: the interpreter cannot AND a tensor with a scalar bool)
        out_ok = out_ok & ((tl.zeros(acc.shape, tl.int32) + count) == n_splits - 1)
        acc = tl.zeros_like(acc)
        for s in range(0, n_splits):
            acc += tl.load(part + s * (M * P), mask=out_ok, other=0.0, cache_modifier=".cg")
        tl.store(lock_ptr + tile, 0, mask=last)  # ready for the next launch (and CUDA graph replays)
    if HAS_LORA:
        offs_l = tl.arange(0, BLOCK_L)
        lo = tl.load(lo_ptr + offs_m[:, None] * stride_lm + offs_l[None, :] * stride_lr,
                     mask=m_ok[:, None] & (offs_l < L)[None, :], other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + offs_l[:, None] * stride_hr + offs_p[None, :] * stride_hp,
                     mask=(offs_l < L)[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
        low_rank = tl.dot(lo.to(DOT_DTYPE), hi.to(DOT_DTYPE), input_precision=INPUT_PRECISION) * scale
        if HAS_MASK:
            keep = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_p[None, :] * stride_mp,
                           mask=out_ok, other=0.0).to(tl.float32)
            low_rank = low_rank * keep
        acc += low_rank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op,
             acc.to(out_ptr.dtype.element_ty), mask=out_ok)


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
    # The kernels index flat buffers: strided views are copied (once per Weight4bit, see
    # launch_args). Unused pointer slots get a valid tensor (never read: NESTED is a constexpr).
    return (
        packed.contiguous(), absmax.contiguous(), code.contiguous(),
        nested_absmax.contiguous() if nested else absmax,
        nested_code.contiguous() if nested else code,
        offset.reshape(1).float() if nested else code,
    )


def dequantize_4bit_into(packed, absmax, code, shape, blocksize, nested_absmax=None, nested_code=None,
                         offset=None, nested_blocksize=NESTED_BLOCKSIZE, dtype=torch.bfloat16, out=None):
    """Dequantize a 4-bit weight of `shape` into `out` (or a new tensor) of `dtype`; returns it.
    Launches kernels/nf4.py's dequantize kernel (the library's only one)."""
    check_quantized(packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize)
    numel = int(shape[0]) * int(shape[1])
    if out is None:
        out = torch.empty(tuple(shape), device=packed.device, dtype=dtype)
    _nf4.dequantize_4bit(packed, absmax, code, numel, blocksize, dtype, nested_absmax, nested_code,
                         None if offset is None else offset.reshape(()), nested_blocksize, out=out.view(-1))
    return out


def workspace(numel: int, dtype: torch.dtype, device: torch.device, kind: str = "weight") -> torch.Tensor:
    """A reused flat buffer of at least `numel` elements per (device, dtype, kind) (grown, never
    shrunk). kind "weight": dequantized weights; "splits": split-K partial sums.

    Callers must finish with it before the next call: it is overwritten by the next layer.
    """
    key = (torch.device(device), dtype, kind)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf[:numel]


def release_workspaces(device=None) -> int:
    """Drop the reused buffers of `device` (every device when None): the dequantized-weight
    workspaces, split-K partials and counters, so their memory can go back to the allocator (then
    `torch.cuda.empty_cache()` returns it to the driver). The next call that needs one allocates
    it again. Safe between any two calls: a launch plan cached on a live Weight4bit keeps (and
    keeps using) the buffers it was planned with, so those are freed only with their weights; the
    same holds for a workspace view a caller still holds. Returns the bytes of the buffers dropped
    from the module's table."""
    want = None if device is None else torch.device(device)
    dropped = 0
    for key in list(_workspaces):
        dev = key[0]
        if want is None or (dev.type == want.type and (want.index is None or dev.index == want.index)):
            buf = _workspaces.pop(key)
            dropped += buf.numel() * buf.element_size()
    return dropped


def _split_locks(tiles: int, device) -> torch.Tensor:
    """Per-tile arrival counters of the split-K reduction: zeroed once when (re)allocated; every
    launch leaves them at zero again, so no per-call memset (and CUDA graph replays stay valid)."""
    key = (torch.device(device), torch.int32, "locks")
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        _workspaces[key] = buf
    return buf


def dequantize_to_workspace(packed, absmax, code, shape, blocksize, nested_absmax=None, nested_code=None,
                            offset=None, nested_blocksize=NESTED_BLOCKSIZE, dtype=torch.bfloat16):
    """The weight of `shape`, dequantized into the shared workspace (valid until the next call)."""
    numel = int(shape[0]) * int(shape[1])
    buf = workspace(numel, dtype, packed.device).view(tuple(shape))
    return dequantize_4bit_into(packed, absmax, code, shape, blocksize, nested_absmax, nested_code,
                                offset, nested_blocksize, dtype, out=buf)


def weight_to_workspace(weight: Weight4bit, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_to_workspace` for a Weight4bit, validated once (its `launch_args`), not per call."""
    shape = weight.launch_args().shape
    w = weight
    out = workspace(shape[0] * shape[1], dtype, w.packed.device)
    _nf4.dequantize_4bit(w.packed, w.absmax, w.code, out.numel(), w.blocksize, dtype, w.nested_absmax, w.nested_code,
                         None if w.offset is None else w.offset.reshape(()), w.nested_blocksize, out=out)
    return out.view(shape)


def row_pairs(in_features: int, blocksize: int, transpose: bool = False) -> int:
    """in_features when the fused kernels can read W along its rows in whole bytes (an even row
    length: rows start on a byte; forward and transposed alike), else 0 (the fused 4-bit paths
    then dequantize into the workspace instead)."""
    return in_features if in_features % 2 == 0 and blocksize % 2 == 0 else 0


# Programs a launch aims for before splitting the reduction: ~4 per SM of a 132-SM H100 (an estimate
# of what keeps enough loads in flight; not measured).
_TARGET_PROGRAMS = 512


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Plain integer math and a cache: triton.cdiv / next_power_of_2 cost ~2-3 us each from Python
# (bench/bench_host.py), and a decode step asks the same few shapes again and again.
@functools.lru_cache(maxsize=1024)
def skinny_config(M, P, N, K, transpose, dtype, split_k=None):
    """Tiling of the skinny kernel for out (M, P), W (N, K): (block_r, block_c, split,
    red_per_split, num_warps). A program decodes a (block_r, block_c) tile of W per step: (64, 64)
    for 16-bit activations (16 bytes of packed weight per thread at 4 warps; of the shapes compiled
    for sm_90, 16x256, 32x128, 64x64 and 128x32, it took the fewest instructions per element both
    ways) and (32, 64) at 8 warps for fp32, whose tl.dot runs on FMA units (it spilled at (64, 64),
    and ptxas kept 8 bytes of stack at 4 warps in a split transposed case). Smaller for tiny
    weights. `split_k`: force a number of splits (tests); None takes QLORA_FAST_SPLIT_K when set
    (`FORCE_SPLIT_K`), else splits the reduction so that ~_TARGET_PROGRAMS programs run when the
    output tiles are few (never under the interpreter, where it would only be slower)."""
    block_r = max(16, min(32 if dtype == torch.float32 else 64, _next_pow2(N)))
    block_c = max(32, min(64, _next_pow2(K)))
    out_tile, step, red = (block_c, block_r, N) if transpose else (block_r, block_c, K)
    programs = _cdiv(P, out_tile) * _cdiv(M, 16)
    steps = _cdiv(red, step)
    if split_k is None:
        split_k = FORCE_SPLIT_K
    if split_k is None:
        split_k = 1
        if not INTERPRET:
            while programs * split_k * 2 <= _TARGET_PROGRAMS and steps // (split_k * 2) >= 4:
                split_k *= 2
    split_k = max(1, min(int(split_k), steps))
    red_per_split = _cdiv(steps, split_k) * step
    return block_r, block_c, _cdiv(red, red_per_split), red_per_split, 8 if dtype == torch.float32 else 4


def _plan(device, N, K, constexprs, M, transpose, dtype, split_k, L, has_mask, has_bias):
    """(grid, red_per_split, split, partial, locks, meta) of one `_skinny_matmul_kernel` launch:
    all it needs besides the tensors and their strides. L: the LoRA rank, None without LoRA.
    partial and locks are None without a split (the output stands in; never read)."""
    P = K if transpose else N
    dot_dt, precision = dot_dtype(dtype)
    block_r, block_c, split, red_per_split, warps = skinny_config(M, P, N, K, transpose, dtype, split_k)
    grid = (_cdiv(P, block_c if transpose else block_r), _cdiv(M, 16), split)
    partial = locks = None
    if split > 1:
        partial = workspace(split * M * P, torch.float32, device, "splits")
        locks = _split_locks(grid[0] * grid[1], device)
    meta = dict(TRANSPOSE=transpose, HAS_LORA=L is not None, HAS_MASK=has_mask, HAS_BIAS=has_bias, SPLIT=split > 1,
                DOT_DTYPE=dot_dt, INPUT_PRECISION=precision, W_LEFT=dot_dt != tl.float32,
                BLOCK_M=16, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_L=16 if L is None else max(16, _next_pow2(L)),
                CB=16, num_warps=warps, num_stages=1, **constexprs)
    return grid, red_per_split, split, partial, locks, meta


# Plans kept per Weight4bit: a few call shapes in practice (rows 1..16, forward and transposed).
_MAX_PLANS = 64


def skinny_launch(a, weight, N, K, transpose, lo=None, hi=None, mask=None, bias=None, scale=1.0, split_k=None):
    """out (M, P) = a @ Wop [+ scale * (lo @ hi) * mask] [+ bias] by `_skinny_matmul_kernel`, Wop
    = W^T (P = N) or W when `transpose` (P = K), for W (N, K) a validated Weight4bit with an even K
    or a dense 2-D tensor. One launch (split-K reduced in the kernel); allocates only the output.
    A Weight4bit keeps the launch plan of each call shape (`Launch4bit.plans`): a repeated call
    reads strides, allocates the output and launches, nothing else. Checks nothing."""
    M = a.shape[0]
    L = None if lo is None else lo.shape[1]
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the kernel reads bias[p] at offset p (no stride argument)
    key = (M, transpose, a.dtype, split_k, L, mask is not None, bias is not None)
    if isinstance(weight, Weight4bit):
        launch = weight.launch_args()
        plan = launch.plans.get(key)
        if plan is None:
            if len(launch.plans) >= _MAX_PLANS:
                launch.plans.clear()
            plan = launch.plans[key] = _plan(a.device, N, K, launch.constexprs, *key)
        w_args, row_bytes, stride_wn, stride_wk = launch.pointers, launch.row_bytes, 0, 0
    else:
        plan = None  # a dense W: planned per call, below (no object to keep the plan on)
        w_args = (weight,) * 6
        row_bytes, stride_wn, stride_wk = 0, weight.stride(0), weight.stride(1)
        quant = dict(WEIGHT_4BIT=False, BLOCKSIZE=64, NESTED=False, NESTED_BLOCKSIZE=NESTED_BLOCKSIZE, CHUNK_SCALE=True)
    has_lora = lo is not None
    grid, red_per_split, split, partial, locks, meta = plan or _plan(a.device, N, K, quant, *key)
    P = K if transpose else N
    out = a.new_empty((M, P))  # contiguous: strides (P, 1)
    stride_am, stride_ak = a.stride()
    stride_lm, stride_lr = lo.stride() if has_lora else (0, 0)
    stride_hr, stride_hp = hi.stride() if has_lora else (0, 0)
    stride_mm, stride_mp = mask.stride() if mask is not None else (0, 0)
    with on_device_of(a):
        _skinny_matmul_kernel[grid](
            a, *w_args, lo if has_lora else a, hi if has_lora else a, mask if mask is not None else a,
            bias if bias is not None else a, out, out if partial is None else partial, out if locks is None else locks,
            M, N, K, L or 0, row_bytes, red_per_split, split, float(scale),
            stride_am, stride_ak, stride_wn, stride_wk, stride_lm, stride_lr, stride_hr, stride_hp,
            stride_mm, stride_mp, P, 1, **meta,
        )
    return out


def nf4_matmul(x, packed, absmax, code, shape, blocksize, nested_absmax=None, nested_code=None,
               offset=None, nested_blocksize=NESTED_BLOCKSIZE, bias=None, transpose=False, method="auto", split_k=None):
    """x @ W^T + bias (or x @ W when `transpose`) with W (out, in) = `shape` stored 4-bit.

    x: (..., in) (or (..., out) when `transpose`) in float16, bfloat16 or float32; returns
    (..., out) (or (..., in)) in x's dtype. `method`: "fused" (decode in registers, no weight
    written), "dequant" (workspace + vendor GEMM) or "auto" (fused for M <= SKINNY_MAX_M rows).
    An odd in_features (rows not starting on a byte) always takes "dequant". `split_k`: force the
    number of K splits of the fused kernel (None: automatic). Raises ValueError/TypeError for
    mismatched shapes or dtypes.
    """
    weight = Weight4bit(packed, absmax, code, shape, blocksize, nested_absmax, nested_code, offset, nested_blocksize)
    out_features, in_features = weight.launch_args().shape  # validates the weight
    k_dim, n_dim = (out_features, in_features) if transpose else (in_features, out_features)
    if x.shape[-1] != k_dim:
        raise ValueError(f"x must have last dimension {k_dim}, got shape {tuple(x.shape)}")
    dot_dtype(x.dtype)  # raises TypeError for unsupported activation dtypes
    if bias is not None and (bias.shape != (n_dim,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({n_dim},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if method not in ("auto", "fused", "dequant"):
        raise ValueError(f"method must be 'auto', 'fused' or 'dequant', got {method!r}")
    return matmul_validated(x, weight, bias, transpose, method, split_k)


def matmul_validated(x, weight: Weight4bit, bias=None, transpose=False, method="auto", split_k=None):
    """`nf4_matmul` for a `Weight4bit`, trusting the caller's checks of x, bias and method (the
    public `nf4_matmul` and qlora_fast.functional make them). The weight itself is validated once,
    by its cached `launch_args`: the decode path checks nothing per call."""
    launch = weight.launch_args()
    out_features, in_features = launch.shape
    k_dim, n_dim = (out_features, in_features) if transpose else (in_features, out_features)
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, k_dim)
    if launch.fused and (method == "fused" or (method == "auto" and x2.shape[0] <= SKINNY_MAX_M)):
        out = skinny_launch(x2, weight, out_features, in_features, transpose, bias=bias, split_k=split_k)
    else:
        w = weight_to_workspace(weight, x.dtype)
        if transpose:
            out = x2 @ w if bias is None else torch.addmm(bias, x2, w)
        else:
            out = torch.nn.functional.linear(x2, w, bias)
    return out if flat else out.reshape(*x.shape[:-1], n_dim)
