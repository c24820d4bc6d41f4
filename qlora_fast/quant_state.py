"""`QuantState`: everything needed to dequantize a 4-bit tensor, in bitsandbytes' layout.

It serialises to the state_dict keys bitsandbytes uses (`absmax`, `quant_map`, `nested_absmax`,
`nested_quant_map` and `quant_state.bitsandbytes__nf4` / `__fp4`, a uint8 tensor holding UTF-8
JSON of the non-tensor fields), so 4-bit checkpoints move both ways between the two libraries.

A state is checked once where it is made or loaded (`validate`, `from_dict`), and the kernel
path reads it through `kernel_weight`: the launcher's `Weight4bit`, built and validated on first
use and cached until a field changes, so a forward call rebuilds and re-checks nothing.
"""
import dataclasses
import json
from typing import Optional

import torch

from qlora_fast.reference.blockwise import BLOCKSIZE_8BIT

QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCKSIZE = 32
MAX_BLOCKSIZE = 4096
NESTED_BLOCKSIZE = BLOCKSIZE_8BIT  # bitsandbytes always double-quantizes in blocks of 256 (the kernels assume it)
_PACKED_KEY = "quant_state.bitsandbytes__"
# the state_dict key of each tensor field (bitsandbytes' names)
_KEYS = {"absmax": "absmax", "code": "quant_map", "nested_absmax": "nested_absmax",
         "nested_code": "nested_quant_map", "offset": "nested_offset"}


def check_options(blocksize, quant_type, where: str = "") -> None:
    """TypeError/ValueError unless blocksize is a power of two in [32, 4096] and quant_type is known."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{where}blocksize must be an int, got {type(blocksize).__name__}")
    if not (MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE) or blocksize & (blocksize - 1):
        raise ValueError(
            f"{where}blocksize must be a power of two from {MIN_BLOCKSIZE} to {MAX_BLOCKSIZE}, got {blocksize}"
        )
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_compress_statistics(compress_statistics) -> None:
    """TypeError unless compress_statistics is a bool (a string such as "false" would be truthy)."""
    if not isinstance(compress_statistics, bool):
        raise TypeError(f"compress_statistics must be a bool, got {type(compress_statistics).__name__}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what} must name a torch dtype, got {name!r}")
    return dtype


@dataclasses.dataclass
class QuantState:
    """Quantization state of one 4-bit tensor.

    absmax: fp32 absmax per block, or uint8 codes of it when double-quantized (`nested`).
    shape, dtype: the original tensor's shape and dtype.
    blocksize: elements per block; quant_type: "nf4" or "fp4"; code: fp32 (16,) code table.
    offset, nested_absmax, nested_code, nested_blocksize: the double quantization (mean of the
    absmax as a 0-dim fp32 tensor, fp32 absmax per 256 absmax values, fp32 (256,) dynamic map).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    # (packed, weight_fields, Weight4bit or None) of the last call; cleared whenever a field is set
    _kernel: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name != "_kernel":
            object.__setattr__(self, "_kernel", None)

    def __getstate__(self):
        # the cache is not saved: it refers to a packed tensor and a kernels type (Triton) that a
        # loading process may not have
        return {**self.__dict__, "_kernel": None}

    def validate(self, packed: Optional[torch.Tensor] = None, where: str = "") -> "QuantState":
        """Check that the fields (and the `packed` weight, if given) describe one 4-bit tensor.

        Sizes and dtypes only (no device sync). `where` prefixes the names in the errors (e.g.
        "weight." gives "weight.absmax", the state_dict key). Raises TypeError/ValueError naming
        the bad field; returns self.
        """
        check_options(self.blocksize, self.quant_type, where)
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}dtype must be float32, float16 or bfloat16, got {self.dtype}")
        numel = self.numel
        if numel <= 0:
            raise ValueError(f"{where}shape must have at least one element, got {tuple(self.shape)}")
        if numel >= 2**31:
            raise ValueError(f"{where}shape: tensors of 2**31 or more elements are not supported, got {numel}")
        if packed is not None:
            if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
                raise TypeError(f"{where.rstrip('.') or 'packed'} must be a packed uint8 tensor, "
                                f"got {getattr(packed, 'dtype', type(packed).__name__)}")
            if packed.numel() != (numel + 1) // 2:
                raise ValueError(f"{where.rstrip('.') or 'packed'} has {packed.numel()} bytes but shape "
                                 f"{tuple(self.shape)} needs {(numel + 1) // 2}")
        parts = [getattr(self, f) is not None for f in ("nested_absmax", "nested_code", "offset")]
        if any(parts) and not all(parts):
            missing = [_KEYS[f] for f, there in zip(("nested_absmax", "nested_code", "offset"), parts) if not there]
            raise ValueError(f"double quantization needs {where}nested_absmax, {where}nested_quant_map and "
                             f"{where}nested_offset together; missing {', '.join(where + k for k in missing)}")
        n_blocks = -(-numel // self.blocksize)
        _expect(self.code, "code", torch.float32, 16, where, "the 16-entry code table")
        _expect(self.absmax, "absmax", torch.uint8 if self.nested else torch.float32, n_blocks, where,
                f"one per block of {self.blocksize}" + (" as 8-bit codes (double-quantized)" if self.nested else ""))
        if self.nested:
            if self.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"{where}nested_blocksize must be {NESTED_BLOCKSIZE}, got {self.nested_blocksize}")
            _expect(self.nested_code, "nested_code", torch.float32, 256, where, "the 256-entry dynamic map")
            _expect(self.nested_absmax, "nested_absmax", torch.float32, -(-n_blocks // NESTED_BLOCKSIZE), where,
                    f"one per {NESTED_BLOCKSIZE} absmax codes")
            _expect(self.offset, "offset", torch.float32, 1, where, "the mean of the absmax")
        return self

    def weight_fields(self, packed: torch.Tensor) -> tuple:
        """(packed, absmax, code, (out, in), blocksize, nested_absmax, nested_code, offset,
        nested_blocksize) for a 2-D weight: the order of the launchers' `Weight4bit`. Validated
        against `packed` on the first call and cached (setting a field, or another `packed`,
        validates again)."""
        cached = self._kernel
        if cached is not None and cached[0] is packed:
            return cached[1]
        self.validate(packed)
        if len(self.shape) != 2:
            raise ValueError(f"a 4-bit weight's shape must be (out_features, in_features), got {tuple(self.shape)}")
        fields = (packed, self.absmax, self.code.contiguous(), (int(self.shape[0]), int(self.shape[1])),
                  self.blocksize, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)
        object.__setattr__(self, "_kernel", (packed, fields, None))
        return fields

    def kernel_weight(self, packed: torch.Tensor):
        """`weight_fields` as the launchers' `Weight4bit` (built once and cached). Needs Triton."""
        cached = self._kernel
        if cached is not None and cached[0] is packed and cached[2] is not None:
            return cached[2]
        from qlora_fast.kernels.nf4_matmul import Weight4bit

        fields = self.weight_fields(packed)
        if not (packed.is_contiguous() and self.absmax.is_contiguous()
                and (self.nested_absmax is None or self.nested_absmax.is_contiguous())):
            # Strided views (FSDP2's unit layout, distributed/fsdp.py): the kernels index flat
            # buffers, so this call gets contiguous copies (in the same byte order), never cached.
            nested = None if self.nested_absmax is None else self.nested_absmax.contiguous()
            return Weight4bit(packed.contiguous(), self.absmax.contiguous(), *fields[2:5], nested, *fields[6:])
        weight = Weight4bit(*fields)
        object.__setattr__(self, "_kernel", (packed, self._kernel[1], weight))
        return weight

    @property
    def nested(self) -> bool:
        """True when the absmax is double-quantized."""
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def to(self, device) -> "QuantState":
        """A copy with every tensor on `device` (the original is left as it is)."""

        def move(t):
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            absmax=move(self.absmax),
            code=move(self.code),
            offset=move(self.offset),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    def statistics_bytes(self) -> int:
        """Bytes of the per-block statistics (absmax, nested absmax, offset); tables excluded."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.nested:
            total += self.nested_absmax.numel() * self.nested_absmax.element_size()
            total += self.offset.numel() * self.offset.element_size()
        return total

    def as_dict(self, packed: bool = True) -> dict:
        """The state under bitsandbytes' keys.

        packed=True: tensors only (safe for safetensors), the non-tensor fields JSON-encoded in
        `quant_state.bitsandbytes__<quant_type>`. packed=False: tensors and plain Python values.
        """
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        fields = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.nested:
            tensors["nested_absmax"] = self.nested_absmax
            # a separate copy: safetensors refuses tensors that share memory
            tensors["nested_quant_map"] = self.nested_code.clone()
            fields.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                # a meta tensor has no value to write (a module built on the meta device)
                nested_offset=0.0 if self.offset.is_meta else float(self.offset.item()),
            )
        if not packed:
            return {**tensors, **fields}
        blob = json.dumps(fields).encode("utf-8")
        tensors[_PACKED_KEY + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, d: dict, device=None, where: str = "") -> "QuantState":
        """Rebuild a state from `as_dict` output (packed or not); keys may carry a prefix.

        Everything is checked here, once: required entries, sizes and dtypes (`validate`), and
        that `quant_map` is the table of `quant_type` (bitsandbytes' kernels pick the table by
        `quant_type`, so a different map would decode differently on each library). `where`
        prefixes the key names in the errors. Raises ValueError naming the missing or bad key.
        """
        d = {k.split("quant_state.")[-1] if "quant_state." in k else k.split(".")[-1]: v for k, v in d.items()}
        packed_keys = [k for k in d if k.startswith("bitsandbytes__")]
        if len(packed_keys) > 1:
            raise ValueError(f"state dict holds more than one packed quant_state entry: {packed_keys}")
        if packed_keys:
            blob = d.pop(packed_keys[0])
            try:
                fields = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
                if not isinstance(fields, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, TypeError, RuntimeError) as e:
                raise ValueError(f"{where}quant_state.{packed_keys[0]} is not the JSON of a quant state: {e}") from None
            d.update(fields)
        for key in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"):
            if key not in d:
                hint = (
                    " (or the packed 'quant_state.bitsandbytes__<type>' entry)"
                    if key not in ("absmax", "quant_map")
                    else ""
                )
                raise ValueError(f"quant state dict is missing {where + key!r}{hint}")
        if d["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"{where}quant_type must be one of {QUANT_TYPES}, got {d['quant_type']!r}")
        for key in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            if key in d and not isinstance(d[key], torch.Tensor):
                raise TypeError(f"{where}{key} must be a tensor, got {type(d[key]).__name__}")
        nested = "nested_absmax" in d
        if nested:
            for key in ("nested_quant_map", "nested_offset"):
                if key not in d:
                    raise ValueError(f"quant state dict has {where + 'nested_absmax'!r} but is missing {where + key!r}")
        elif "nested_offset" in d or "nested_quant_map" in d or d["absmax"].dtype == torch.uint8:
            # a double-quantized state without its nested absmax would decode 8-bit codes as scales
            raise ValueError(f"quant state dict is double-quantized but is missing {where + 'nested_absmax'!r}")
        device = d["absmax"].device if device is None else torch.device(device)
        state = cls(
            absmax=d["absmax"].to(device),
            shape=torch.Size(_ints(d["shape"], where + "shape")),
            dtype=_dtype_from_name(d["dtype"], where + "dtype"),
            blocksize=_ints([d["blocksize"]], where + "blocksize")[0],
            quant_type=d["quant_type"],
            code=d["quant_map"].to(device, torch.float32),
            offset=torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=device) if nested else None,
            nested_absmax=d["nested_absmax"].to(device, torch.float32) if nested else None,
            nested_code=d["nested_quant_map"].to(device, torch.float32) if nested else None,
            nested_blocksize=_ints([d.get("nested_blocksize", NESTED_BLOCKSIZE)], where + "nested_blocksize")[0],
        )
        state.validate(where=where)
        if d["quant_map"].device.type != "meta":
            from qlora_fast.reference.quant import code_for

            if not torch.equal(d["quant_map"].detach().cpu().float(), code_for(state.quant_type)):
                raise ValueError(f"{where}quant_map is not the {state.quant_type} code table that {where}quant_type "
                                 f"names: the checkpoint's quant_type and quant_map disagree")
        return state


def _ints(values, what: str) -> list:
    """`values` as Python ints; ValueError naming `what` when one is not a whole number."""
    try:
        out = [int(v) for v in values]
        if any(o != v for o, v in zip(out, values)):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{what} must hold whole numbers, got {values!r}") from None
    return out


def _expect(t, field: str, dtype: torch.dtype, numel: int, where: str, what: str) -> None:
    name = where + _KEYS[field] if where else field
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')} ({what}), got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} values ({what}), got {t.numel()}")
