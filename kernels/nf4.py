"""Blockwise 4-bit (NF4/FP4) quantization and dequantization with double quantization, in Triton.

Format: bitsandbytes' (see qlora_fast/reference/quant.py, which these kernels must match bit for
bit). The flattened tensor is cut into blocks of BLOCKSIZE elements; each program owns GROUP whole
blocks laid out as (GROUP, BLOCKSIZE // 2 pairs, 2), so a pair of neighbours is one packed byte.

quantize, in three launches (the mean of all absmax values is a grid-wide reduction, so double
quantization cannot share the first pass):
  1. `_quantize_4bit_kernel`: read x once, per-block absmax, scale into [-1, 1], nearest code by
     counting the sorted table's 15 midpoints below each value, pack two codes per byte,
     write packed bytes and fp32 absmax. Traffic: n * sizeof(x) in, n / 2 + 4 n / blocksize out.
  2. offset = absmax.mean() (torch; n / blocksize floats).
  3. `_quantize_absmax_kernel`: (absmax - offset) quantized to 8 bits in blocks of 256 with an
     8-step binary search over the signed dynamic map: n / blocksize floats in, about a quarter of
     that out. Passes 2-3 move about 1 / 8 of pass 1's bytes at blocksize 64 with fp16 input.
dequantize, one pass (`_dequantize_4bit_kernel`, the library's only dequantize kernel): each
thread takes chunks of the packed bytes whose outputs fill one 16-byte store (4 bytes -> 8 fp16/bf16,
2 bytes -> 4 fp32); per chunk one block scale (`_block_scale`: the absmax, or its 8-bit code times
the nested absmax plus offset), per byte the two codes by warp shuffle from a per-lane register
table (`_code_lanes` / `_decode_pairs`: no memory access per nibble) and two multiplies. These three
helpers are THE 4-bit decoder: kernels/nf4_matmul.py's fused matmul uses them too.
Traffic: n / 2 + n / blocksize (+ 4 n / (256 blocksize)) bytes in, n * sizeof(out) out. Compiled for
sm_90 (CPU, not run): ~7.4 SASS instructions per element (nested, bf16 out), no shared memory.

Diagnostic switch, read once at import (to narrow a kernel failure down on a GPU):
QLORA_FAST_NO_SHFL=1 makes every decoder (`_code_lanes` / `_decode_pairs`, so the dequantize
kernel and kernels/nf4_matmul.py's fused matmul) look codes up the way the interpreter does, one
load from the 16-entry table per nibble, instead of by warp shuffle (no `shfl.sync`, no `%laneid`;
slower, same values). `_mul_rn`'s `mul.rn.f32` stays (exactness). See also QLORA_FAST_SPLIT_K in
kernels/nf4_matmul.py.

Exactness on the GPU: the reciprocal and the partial-block division use `div_rn` (IEEE
round-to-nearest) because Triton's `/` on fp32 is approximate; `_mul_rn` keeps the
`code8 * nested` of the double-quantized absmax out of an FMA, so `code8 * nested + offset` is
rounded twice, as in bitsandbytes, in every kernel that decodes. Under the CPU
interpreter a bf16 store truncates, so bf16 output is rounded to nearest-even by hand there.
"""
import os
import weakref

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, on_device_of

__all__ = ["quantize_4bit", "quantize_absmax", "dequantize_4bit"]

NESTED_BLOCKSIZE = 256  # = qlora_fast.reference.blockwise.BLOCKSIZE_8BIT (kernels/ may not import it)
# Bytes (pairs of elements) a program handles; whole blocks only, so at least one block.
_PAIRS_PER_PROGRAM = 1024 if not INTERPRET else 4096
_ABSMAX_PER_PROGRAM = 1024
# Packed bytes a dequantize program decodes (16384 elements: 128 per thread at 4 warps)
_DEQUANT_BYTES = 8192 if not INTERPRET else 32768


@triton.jit
def _scale_blocks(x, block, n, BLOCKSIZE: tl.constexpr):
    """Per-block absmax of x (GROUP, ...) and x scaled into [-1, 1] the bitsandbytes way."""
    absmax = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
    # an fp32 constant: 1e-38 is an fp32 subnormal, which triton 3.6 would make an fp64 literal
    safe = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))
    partial = (block + 1) * BLOCKSIZE > n
    # full blocks: multiply by the reciprocal; the partial last block: divide (bitsandbytes does both)
    recip = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    by_recip = x * recip[:, None, None]
    by_div = tl.math.div_rn(x, tl.broadcast_to(safe[:, None, None], x.shape))
    scaled = tl.where(partial[:, None, None], by_div, by_recip)
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    stored = tl.where(partial, safe, absmax)
    return stored, scaled


@triton.jit
def _nearest_code(scaled, mid_ptr, LOG2_CODES: tl.constexpr):
    """Index of the nearest code of a sorted table: the count of its midpoints strictly below each
    value (ties go to the lower code), by a LOG2_CODES-step binary search."""
    idx = tl.zeros(scaled.shape, tl.int32)
    for level in tl.static_range(LOG2_CODES):
        step = 1 << (LOG2_CODES - 1 - level)
        mid = tl.load(mid_ptr + idx + (step - 1))
        idx = tl.where(scaled > mid, idx + step, idx)
    return idx


@triton.jit
def _quantize_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, mid_ptr, step_ptr, n, n_blocks,
    BLOCKSIZE: tl.constexpr, GROUP: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    pair = tl.arange(0, HALF)
    side = tl.arange(0, 2)
    elem = block[:, None, None].to(tl.int64) * BLOCKSIZE + pair[None, :, None] * 2 + side[None, None, :]
    # masked lanes read 0: they change no absmax and an odd tail pads with a scaled 0, as bnb does
    x = tl.load(x_ptr + elem, mask=elem < n, other=0.0).to(tl.float32)
    absmax, scaled = _scale_blocks(x, block, n, BLOCKSIZE)
    # 15 uniform (scalar) loads and compares per element beat 4 dependent gathers here; each
    # midpoint below the value steps from one sorted code's index to the next (`_sorted_tables`)
    code = tl.zeros(scaled.shape, tl.int32) + tl.load(step_ptr)
    for j in tl.static_range(15):
        code += tl.where(scaled > tl.load(mid_ptr + j), tl.load(step_ptr + j + 1), 0)
    # first element of a pair in the high nibble
    byte = tl.sum(code * tl.where(side == 0, 16, 1)[None, None, :], axis=2)
    byte_idx = block[:, None].to(tl.int64) * HALF + pair[None, :]
    tl.store(packed_ptr + byte_idx, byte.to(tl.uint8), mask=byte_idx < (n + 1) // 2)
    tl.store(absmax_ptr + block, absmax, mask=block < n_blocks)


@triton.jit
def _quantize_absmax_kernel(
    absmax_ptr, offset_ptr, q_ptr, nested_ptr, mid_ptr, m, n_blocks,
    GROUP: tl.constexpr, NESTED: tl.constexpr,
):
    block = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    item = tl.arange(0, NESTED)
    idx = block[:, None, None] * NESTED + item[None, :, None]
    mask = idx < m
    offset = tl.load(offset_ptr)
    a = tl.load(absmax_ptr + idx, mask=mask, other=0.0)
    centered = tl.where(mask, a - offset, 0.0)
    nested, scaled = _scale_blocks(centered, block, m, NESTED)
    q = _nearest_code(scaled, mid_ptr, 8)
    tl.store(q_ptr + idx, q.to(tl.uint8), mask=mask)
    tl.store(nested_ptr + block, nested, mask=block < n_blocks)


# QLORA_FAST_NO_SHFL (module docstring): "1" turns the warp-shuffle code lookup off on the GPU.
NO_SHFL = os.environ.get("QLORA_FAST_NO_SHFL", "").strip().lower() in ("1", "true", "on", "yes")
# warp-shuffle code lookup on the GPU (no inline asm in the interpreter), unless QLORA_FAST_NO_SHFL
_SHFL = tl.constexpr(not INTERPRET and not NO_SHFL)
_PTX = tl.constexpr(not INTERPRET)  # inline PTX (mul.rn) on the GPU, whatever QLORA_FAST_NO_SHFL says


@triton.jit
def _mul_rn(a, b):
    """a * b in fp32, rounded on its own: never contracted into an FMA with a following add, so the
    double-quantized absmax `code8 * nested + offset` rounds twice, as bitsandbytes does, without
    disabling fp-fusion for a whole kernel (numpy never fuses under the interpreter)."""
    if _PTX:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of quantization blocks `block` (any shape; call it once per block, not per
    element): the stored value, or `code8[q] * nested_absmax + offset` (two roundings) when
    double-quantized. Masked entries read block 0's code and a zero nested absmax."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = _mul_rn(tl.load(nested_code_ptr + q), nested) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _code_lanes(code_ptr, like):
    """The per-thread register table for `_decode_pairs`: code[lane % 16] in every element of a
    tensor shaped like `like` (int32). Every element of a thread holds the same value, so the
    compiler keeps one register; build it once per program, outside the loops."""
    if _SHFL:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32,
                                         is_pure=True, pack=1) & 15
        table = tl.zeros(like.shape, tl.float32)
        for i in tl.static_range(16):
            table = tl.where(lane == i, tl.load(code_ptr + i), table)
    else:
        table = tl.zeros(like.shape, tl.float32)
    return table


@triton.jit
def _decode_pairs(byte, table, code_ptr):
    """fp32 code values (high nibble, low nibble) of packed bytes (int32, any shape): the one 4-bit
    decoder. On the GPU each lane holds code[lane % 16] (`_code_lanes`) and a 16-wide warp shuffle
    fetches code[nibble] from lane nibble (its low 4 bits select the lane, so the low nibble needs
    no mask): no memory access per nibble. Under the interpreter, a gather from the 16-entry table."""
    if _SHFL:
        high = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x101f, 0xffffffff;", "=f,f,r",
                                         [table, byte >> 4], dtype=tl.float32, is_pure=True, pack=1)
        low = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x101f, 0xffffffff;", "=f,f,r",
                                        [table, byte], dtype=tl.float32, is_pure=True, pack=1)
    else:
        high = tl.load(code_ptr + (byte >> 4))
        low = tl.load(code_ptr + (byte & 15))
    return high, low


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    CHUNKS: tl.constexpr, CB: tl.constexpr, CHUNK_MASK: tl.constexpr, BF16_BY_HAND: tl.constexpr,
):
    """Each program decodes CHUNKS chunks of CB consecutive packed bytes (2 CB elements, inside
    one quantization block since 2 CB <= BLOCKSIZE): one CB-byte vector load and one block scale
    per chunk, the 2 CB outputs of a chunk stored contiguously. CHUNK_MASK: n is a multiple of
    2 CB, so the bounds mask is per chunk (it does not split the vector accesses)."""
    pid = tl.program_id(0).to(tl.int64)
    packed_ptr += pid * (CHUNKS * CB)
    out_ptr += pid * (CHUNKS * CB * 2)
    # elements from this program's first one to the end, clamped so the masks compare int32
    n_left = tl.minimum(n - pid * (CHUNKS * CB * 2), CHUNKS * CB * 2).to(tl.int32)
    chunk = tl.arange(0, CHUNKS)
    byte_idx = chunk[:, None] * CB + tl.arange(0, CB)[None, :]
    elem = chunk[:, None] * (2 * CB) + tl.arange(0, 2 * CB)[None, :]
    chunk_ok = chunk * (2 * CB) < n_left
    if CHUNK_MASK:
        byte_mask = chunk_ok[:, None]
        out_mask = chunk_ok[:, None]
    else:
        byte_mask = byte_idx * 2 < n_left
        out_mask = elem < n_left
    byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    block = (pid * (CHUNKS * CB * 2) + chunk * (2 * CB)) // BLOCKSIZE
    scale = _block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, chunk_ok,
                         NESTED, NESTED_BLOCKSIZE)[:, None]
    high, low = _decode_pairs(byte, _code_lanes(code_ptr, byte_idx), code_ptr)
    # (chunk, byte, nibble) -> (chunk, element): the 2 CB outputs of a chunk are contiguous
    value = tl.reshape(tl.join(high * scale, low * scale), (CHUNKS, 2 * CB))
    if BF16_BY_HAND:
        # round fp32 to bf16 to nearest-even on the bits; out_ptr is the output viewed as int16
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + elem, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=out_mask)
    else:
        tl.store(out_ptr + elem, value.to(out_ptr.dtype.element_ty), mask=out_mask)


# id(code) -> (weak reference, version, device, tables): the tables of the code tensors in use
_tables: dict = {}


def _sorted_tables(code: torch.Tensor):
    """Midpoints of the sorted table (fp32) and index steps (int32): the code index of sorted
    position 0, then the index difference of each sorted neighbour, so the code of a value with j
    midpoints below it is steps[0] + ... + steps[j], whatever the table's order.

    Cached per code tensor (identity, in-place version, device): device work only on a miss and
    never a host sync, so quantizing is capturable in a CUDA graph once a table has been seen.
    """
    key = id(code)
    hit = _tables.get(key)
    if hit is not None and hit[0]() is code and hit[1] == code._version and hit[2] == code.device:
        return hit[3]
    values = code.float()
    order = torch.sort(values, stable=True).indices
    ordered = values[order]
    steps = torch.diff(order, prepend=order.new_zeros(1)).to(torch.int32)
    tables = ((ordered[:-1] + ordered[1:]) / 2).contiguous(), steps.contiguous()
    _tables[key] = (weakref.ref(code, lambda _, key=key: _tables.pop(key, None)), code._version, code.device, tables)
    return tables


def _check_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the data is on {device}")


def _groups(blocksize: int, per_program: int) -> int:
    return max(1, per_program // blocksize)


def quantize_4bit(x: torch.Tensor, blocksize: int, code: torch.Tensor):
    """Quantize float x (any shape) with the 16-entry fp32 `code` table.

    Returns (packed uint8 (ceil(n / 2), 1), absmax fp32 (ceil(n / blocksize),)).
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if code.numel() != 16:
        raise ValueError(f"code must have 16 entries, got {code.numel()}")
    _check_device("code", code, x.device)
    x = x.contiguous().view(-1)
    n = x.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty((n_blocks,), dtype=torch.float32, device=x.device)
    mids, steps = _sorted_tables(code)
    group = _groups(blocksize, 2 * _PAIRS_PER_PROGRAM)
    grid = (triton.cdiv(n_blocks, group),)
    with on_device_of(x):
        _quantize_4bit_kernel[grid](x, packed, absmax, mids, steps, n, n_blocks, BLOCKSIZE=blocksize, GROUP=group)
    return packed, absmax


def quantize_absmax(absmax: torch.Tensor, code: torch.Tensor):
    """Double quantization of fp32 absmax with the sorted 256-entry `code` (signed dynamic map).

    Returns (uint8 codes like absmax, fp32 nested absmax per 256 values, 0-dim fp32 offset = mean).
    """
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    _check_device("code", code, absmax.device)
    absmax = absmax.contiguous()
    m = absmax.numel()
    offset = absmax.mean()
    n_blocks = -(-m // NESTED_BLOCKSIZE)
    q = torch.empty_like(absmax, dtype=torch.uint8)
    nested = torch.empty((n_blocks,), dtype=torch.float32, device=absmax.device)
    mids, _ = _sorted_tables(code)
    group = _groups(NESTED_BLOCKSIZE, _ABSMAX_PER_PROGRAM)
    grid = (triton.cdiv(n_blocks, group),)
    with on_device_of(absmax):
        _quantize_absmax_kernel[grid](absmax, offset, q, nested, mids, m, n_blocks, GROUP=group,
                                      NESTED=NESTED_BLOCKSIZE)
    return q, nested, offset


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    numel: int,
    blocksize: int,
    out_dtype: torch.dtype,
    nested_absmax: torch.Tensor = None,
    nested_code: torch.Tensor = None,
    offset: torch.Tensor = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    out: torch.Tensor = None,
):
    """Dequantize `numel` elements to a flat tensor of `out_dtype` (written into `out`, a
    contiguous tensor of `numel` elements of `out_dtype`, when given); returns it.

    `absmax` is fp32 per block, or uint8 codes when `nested_absmax` (one fp32 per
    `nested_blocksize` codes), `nested_code` (256 fp32) and `offset` (0-dim fp32) are given
    (double quantization, decoded in the same pass). The one dequantize kernel of the library:
    kernels/nf4_matmul.py's workspace path launches it too.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2, got {blocksize}")
    nested = nested_absmax is not None
    if nested and (nested_code is None or offset is None):
        raise ValueError("double-quantized absmax needs nested_absmax, nested_code and offset together")
    if (absmax.dtype == torch.uint8) != nested:
        raise TypeError(f"absmax must be uint8 with nested statistics and float32 without, got {absmax.dtype}")
    for name, t in (
        ("absmax", absmax),
        ("code", code),
        ("nested_absmax", nested_absmax),
        ("nested_code", nested_code),
        ("offset", offset),
    ):
        if t is not None:
            _check_device(name, t, packed.device)
    if out is None:
        out = torch.empty((numel,), dtype=out_dtype, device=packed.device)
    elif out.dtype != out_dtype or out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of {numel} elements, "
                         f"got {out.dtype} {tuple(out.shape)}")
    # the kernel indexes flat buffers: a strided view (e.g. FSDP's unit layout) is copied here, a
    # contiguous tensor passes as it is
    packed, absmax, code = packed.contiguous(), absmax.contiguous(), code.contiguous()
    if nested:
        nested_absmax, nested_code = nested_absmax.contiguous(), nested_code.contiguous()
    by_hand = INTERPRET and out_dtype == torch.bfloat16
    dummy = code  # stands in for the nested pointers when they are unused
    # a chunk: the bytes whose outputs fill one 16-byte store (8 fp16/bf16 or 4 fp32), inside one
    # block; wider byte loads would need a shared-memory relayout before the coalesced stores
    cb = min(8 // out.element_size(), blocksize // 2)
    chunk_mask = numel % (2 * cb) == 0
    # per-element masks (an odd tail) cost registers: a quarter of the work per program then
    chunks = _DEQUANT_BYTES // cb // (1 if chunk_mask else 4)
    grid = (triton.cdiv(numel, 2 * cb * chunks),)
    with on_device_of(packed):
        _dequantize_4bit_kernel[grid](
            packed, absmax, code if code.dtype == torch.float32 else code.float(),
            nested_absmax if nested else dummy,
            (nested_code if nested_code.dtype == torch.float32 else nested_code.float()) if nested else dummy,
            offset if nested else dummy,
            out.view(torch.int16) if by_hand else out, numel,
            BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
            CHUNKS=chunks, CB=cb, CHUNK_MASK=chunk_mask, BF16_BY_HAND=by_hand,
            num_warps=4, num_stages=1,
        )
    return out
