"""`QuantState`: everything needed to dequantize a 4-bit tensor, in bitsandbytes' layout.

It serialises to the state_dict keys bitsandbytes uses (`absmax`, `quant_map`, `nested_absmax`,
`nested_quant_map` and `quant_state.bitsandbytes__nf4` / `__fp4`, a uint8 tensor holding UTF-8
JSON of the non-tensor fields), so 4-bit checkpoints move both ways between the two libraries.
"""
import dataclasses
import json
from typing import Optional

import torch

QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PACKED_KEY = "quant_state.bitsandbytes__"


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
    nested_blocksize: int = 256

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
                nested_offset=float(self.offset.item()),
            )
        if not packed:
            return {**tensors, **fields}
        blob = json.dumps(fields).encode("utf-8")
        tensors[_PACKED_KEY + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, d: dict, device=None) -> "QuantState":
        """Rebuild a state from `as_dict` output (packed or not); keys may carry a prefix.

        Raises ValueError naming the missing key when a required entry is absent.
        """
        d = {k.split("quant_state.")[-1] if "quant_state." in k else k.split(".")[-1]: v for k, v in d.items()}
        packed_keys = [k for k in d if k.startswith("bitsandbytes__")]
        if len(packed_keys) > 1:
            raise ValueError(f"state dict holds more than one packed quant_state entry: {packed_keys}")
        if packed_keys:
            blob = d.pop(packed_keys[0])
            d.update(json.loads(bytes(blob.cpu().tolist()).decode("utf-8")))
        for key in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"):
            if key not in d:
                hint = " (or the packed 'quant_state.bitsandbytes__<type>' entry)" if key not in ("absmax", "quant_map") else ""
                raise ValueError(f"quant state dict is missing {key!r}{hint}")
        if d["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {d['quant_type']!r}")
        nested = "nested_absmax" in d
        if nested:
            for key in ("nested_quant_map", "nested_offset"):
                if key not in d:
                    raise ValueError(f"quant state dict has 'nested_absmax' but is missing {key!r}")
        device = d["absmax"].device if device is None else torch.device(device)
        return cls(
            absmax=d["absmax"].to(device),
            shape=torch.Size(d["shape"]),
            dtype=_dtype_from_name(d["dtype"], "dtype"),
            blocksize=int(d["blocksize"]),
            quant_type=d["quant_type"],
            code=d["quant_map"].to(device, torch.float32),
            offset=torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=device) if nested else None,
            nested_absmax=d["nested_absmax"].to(device, torch.float32) if nested else None,
            nested_code=d["nested_quant_map"].to(device, torch.float32) if nested else None,
            nested_blocksize=int(d.get("nested_blocksize", 256)),
        )
