"""Adam and AdamW with fp32 or 8-bit blockwise states, optionally paged between the device and
host memory, as `torch.optim.Optimizer` subclasses running the fused `qlora_fast._C` ops
(C++ on the CPU, CUDA kernels on the GPU).

Every optimizer keeps each parameter's states in pages (`paging.Page`); an unpaged optimizer has
one page per parameter that never leaves the device, so paged and unpaged share one code path
and one state_dict format (whole flat tensors per parameter, independent of pages and device).

A step is one call of the multi-tensor op `adam_multi_step_` per device over every param group
and state kind (C++ loops on the CPU; on CUDA one table copy and one launch per state kind and
param dtype), with the lists it takes cached (`_DevicePlan`) while the params, their states and
the pages' places stay the same; step counts are float32 CPU tensors (as in torch's AdamW) that
the op increments, so the Python work per step is a list of the gradients. Pages on the host are
streamed through the device afterwards, one per-page op call each.
"""
import math
import numbers
import time
from collections import defaultdict
from itertools import chain
from typing import Dict, Optional

import torch

from qlora_fast.optim.paging import Budget, PageManager, StepStats, check_budget, timed
from qlora_fast.reference.optim import QUANT_BLOCK, dynamic_map, quantize_blockwise_ref

__all__ = ["Adam", "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "paging_stats"]

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE32 = ("exp_avg", "exp_avg_sq")
STATE8 = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")


_READY_DEVICE_TYPES = set()  # device types whose kernels were found: checked once, not per update


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients), else `t`: each rank keeps
    and pages only the states of its own shard (the update is elementwise)."""
    # Plain tensors skip the attribute probe (a failed hasattr on a tensor costs ~1 us, per
    # parameter and gradient on every step).
    return t if type(t) in _PLAIN_TENSORS else getattr(t, "_local_tensor", t)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class _DevicePlan:
    """The arguments of one device's `adam_multi_step_` that do not change between steps:
    `owners` (the params, in group order), their step-count tensors, the resident pages' state
    tensors and the table of (param, group, kind, start, end, state) rows, plus the pages to
    touch and those to stream (host pages). Valid while `key` matches (`_plan_key`). `held`: the
    same arguments held in C++ (`MultiStepPlan`), so a step passes only the gradients; None for
    FSDP2 (DTensor) params, whose local shards are looked up every step."""

    __slots__ = ("key", "owners", "params", "local", "steps", "states", "entries", "touch", "streamed",
                 "owners8", "nonfinite", "maps", "held")

    def __init__(self, key, optimizer: "_PagedAdamBase", device: torch.device):
        self.key = key
        self.owners, self.steps, self.states, self.touch, self.streamed, self.owners8 = [], [], [], [], [], []
        rows = []
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state is None or "pages" not in state or state["device"] != device:
                    continue
                i = len(self.owners)
                self.owners.append(p)
                self.steps.append(state["step"])
                kind = 0 if state["kind"] == "32bit" else 1
                if kind:
                    self.owners8.append(state)
                for page in state["pages"]:
                    self.touch.append((page, i))
                    if page.on_device:
                        rows.append((i, gi, kind, page.start, page.end, len(self.states)))
                        self.states.extend(page.tensors[name] for name in (STATE8 if kind else STATE32))
                    else:
                        self.streamed.append((i, group, state, page))
        self.local = any(type(p) not in _PLAIN_TENSORS for p in self.owners)  # FSDP2: pass the local shards
        self.params = [_local(p) for p in self.owners]
        self.entries = torch.tensor(rows, dtype=torch.int64).reshape(-1, 6)
        # CUDA: the op sets this flag when a new 8-bit block absmax is not finite (read later, no sync).
        cuda = device.type == "cuda" and self.owners8
        self.nonfinite = torch.zeros(1, dtype=torch.int32, device=device) if cuda else None
        self.maps = optimizer._maps_on(device)
        self.held = None if self.local else torch.classes.qlora_fast.MultiStepPlan(
            self.params, self.steps, self.states, self.entries, *self.maps, self.nonfinite)


def _as_dtensor_states(state: dict, p) -> dict:
    """The states of an FSDP2 (DTensor) parameter as DTensors, so that torch.distributed.checkpoint
    saves every rank's shard and can reshard them on load. 32-bit states and 8-bit codes are per
    element: sharded like `p`. 8-bit absmax are per 256-block of each rank's local shard: saved as
    a (world, blocks of the largest shard) table, zero-padded, one row per rank, which
    `_local_8bit_states` maps back onto the blocks of any sharding."""
    from torch.distributed.tensor import DTensor, Shard

    local = p._local_tensor
    eight_bit = state["kind"] == "8bit"
    if eight_bit and (p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)):
        raise NotImplementedError(f"8-bit optimizer states of a DTensor parameter sharded as {p.placements} on a "
                                  f"{p.device_mesh.ndim}-D mesh: only FSDP2's dim-0 sharding (Shard(0)) is supported")
    out = dict(state)
    for name in STATE8[:2] if eight_bit else STATE32:
        out[name] = DTensor.from_local(state[name].to(local.device).view(local.shape), p.device_mesh, p.placements,
                                       run_check=False, shape=p.shape, stride=p.stride())
    if eight_bit:
        world = p.device_mesh.size()
        blocks = -(-(-(-p.shape[0] // world) * (p.numel() // max(p.shape[0], 1))) // QUANT_BLOCK)
        for name in STATE8[2:]:
            row = torch.zeros(1, blocks, dtype=torch.float32, device=local.device)
            row[0, : state[name].numel()] = state[name]
            out[name] = DTensor.from_local(row, p.device_mesh, [Shard(0)], run_check=False, shape=(world, blocks),
                                           stride=(blocks, 1))
    return out


def _local_8bit_states(saved: dict, p) -> dict:
    """Flat 8-bit states of this rank's shard of `p` from the sharded form of `_as_dtensor_states`
    (codes shaped like `p`, already resharded to this rank; absmax tables of the saving world
    size W). Where this rank's 256-blocks are blocks of the saved sharding (same world size, or
    shard boundaries on block boundaries) codes and absmax are taken as they are: bit-identical.
    Other blocks are dequantized and requantized on this sharding's blocks (each value moves by at
    most half a code step of its new block). ValueError for inconsistent tables."""
    local = _local(p)
    n, rows = local.numel(), p.shape[0] if p.dim() else 1
    row_numel = p.numel() // max(rows, 1)
    table = _local(saved["exp_avg_absmax"])
    if table.dim() != 2 or _local(saved["exp_avg_sq_absmax"]).shape != table.shape:
        raise ValueError(f"8-bit absmax tables must be 2-D and alike, got {tuple(table.shape)}")
    world_old, blocks_old = table.shape
    rows_old = -(-rows // world_old)
    if -(-rows_old * row_numel // QUANT_BLOCK) != blocks_old:
        raise ValueError(f"8-bit absmax table {tuple(table.shape)} does not fit a parameter of shape {tuple(p.shape)} "
                         f"sharded over {world_old} ranks")
    start_row = 0
    if hasattr(p, "device_mesh"):
        start_row = p.device_mesh.get_local_rank() * -(-rows // p.device_mesh.size())
    g = start_row * row_numel + torch.arange(n)  # global flat index of each local element
    rank_old = g // (rows_old * row_numel)
    offset_old = g - rank_old * rows_old * row_numel
    block_old = rank_old * blocks_old + offset_old // QUANT_BLOCK
    i = torch.arange(n)
    block_new = i // QUANT_BLOCK
    blocks_new = -(-n // QUANT_BLOCK)
    # sizes of the old blocks (the last one of a shard may be short) and of the new ones
    numel_old = (rows - torch.arange(world_old) * rows_old).clamp(0, rows_old) * row_numel
    size_old = (numel_old[rank_old] - offset_old // QUANT_BLOCK * QUANT_BLOCK).clamp(max=QUANT_BLOCK)
    size_new = (n - block_new * QUANT_BLOCK).clamp(max=QUANT_BLOCK)
    same = (offset_old % QUANT_BLOCK == i % QUANT_BLOCK) & (size_old == size_new)
    exact = torch.ones(blocks_new, dtype=torch.bool)
    exact[block_new[~same]] = False
    first_old = block_old[::QUANT_BLOCK]  # the old block of each new block's first element
    out = {}
    for codes_name, absmax_name, signed in (("exp_avg_codes", "exp_avg_absmax", True),
                                            ("exp_avg_sq_codes", "exp_avg_sq_absmax", False)):
        codes = _local(saved[codes_name]).reshape(-1)
        if codes.numel() != n or codes.dtype != torch.uint8:
            raise ValueError(f"state {codes_name!r}: expected {n} uint8 codes, got {codes.numel()} {codes.dtype}")
        absmax = _local(saved[absmax_name]).reshape(-1).float().cpu()
        codes, absmax_new = codes.cpu().clone(), absmax[first_old].clone()
        if not exact.all():
            code = dynamic_map(signed)
            values = code[codes.long()] * absmax[block_old]
            redo = exact.logical_not()[block_new]
            requant, requant_absmax = quantize_blockwise_ref(values, code, positive_nonzero=not signed)
            codes[redo] = requant[redo]
            absmax_new[~exact] = requant_absmax[~exact]
        out[codes_name], out[absmax_name] = codes, absmax_new
    return out


def _from_torch_adam(saved: dict, kind: str, n: int, saved_id) -> dict:
    """A torch.optim.Adam/AdamW state ({step, exp_avg, exp_avg_sq}, shaped like the parameter, in
    its dtype) in this optimizer's layout: fp32 moments, or 8-bit blocks quantized from them."""
    moments = {}
    for name in STATE32:
        t = saved[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() != n:
            raise ValueError(f"state {name!r} of parameter {saved_id} (torch's Adam layout) must be a floating "
                             f"tensor of {n} elements, got {t!r:.80}")
        moments[name] = _local(t).detach().reshape(-1).float()
    out = {"step": saved["step"], "kind": kind}
    if kind == "32bit":
        return {**out, **moments}
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = quantize_blockwise_ref(moments[name].cpu(), dynamic_map(signed), scaling="reciprocal",
                                               positive_nonzero=not signed)
        out[f"{name}_codes"], out[f"{name}_absmax"] = codes, absmax
    return out


def _ops(device: torch.device):
    """torch.ops.qlora_fast, with the extension loaded; a clear error when `device` is CUDA and
    the extension was built without its CUDA kernels."""
    if device.type in _READY_DEVICE_TYPES:
        return torch.ops.qlora_fast
    from qlora_fast._extension import load

    load()
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("qlora_fast::adam_step_", "CUDA"):
        raise RuntimeError(
            "qlora_fast._C was built without its CUDA kernels (a CPU-only torch or no nvcc at build "
            "time, or QLORA_FAST_SKIP_CUDA_BUILD=1); rebuild it with a CUDA torch and nvcc: "
            "pip install --no-build-isolation -e ."
        )
    _READY_DEVICE_TYPES.add(device.type)
    return torch.ops.qlora_fast


def _real(name: str, value) -> float:
    """`value` as a float: a Python or NumPy real, or a one-element tensor (as schedulers set)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a real number (int, float or a one-element tensor), got {value!r}")


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    if not (math.isfinite(_real("lr", lr)) and float(lr) >= 0.0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _real(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    # inf passes torch's own checks, but an inf eps freezes every parameter and an inf weight decay
    # turns them to NaN
    if not 0.0 <= _real("eps", eps) < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not 0.0 <= _real("weight_decay", weight_decay) < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


# Flags of torch's Adam/AdamW this implementation does not have: a group (or a loaded state_dict)
# that turns one on is refused rather than silently stepping without it.
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def _check_group(group: dict, where: str) -> None:
    """A param group's hyperparameters and flags, before the group is used or stored."""
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in group]
    if missing:
        raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")
    try:
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    on = [k for k in _UNSUPPORTED_FLAGS if group.get(k)]
    if on:
        raise ValueError(f"{where} sets {', '.join(on)}, which qlora_fast's Adam/AdamW do not support")


class _PagedAdamBase(torch.optim.Optimizer):
    """Shared machinery; use the public subclasses.

    `eight_bit`: states quantized per block of 256 (params with fewer than `min_8bit_size`
    elements keep fp32 states, as bitsandbytes does). `budget` (paged only): see `PageManager`.
    `page_bytes`: state bytes per page (rounded down to whole 256-element blocks).
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *,
                 eight_bit=False, min_8bit_size=4096, paged=False, budget: Budget = 0.8,
                 page_bytes=8 << 20):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        lr = _real("lr", lr)
        if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if not isinstance(page_bytes, int) or isinstance(page_bytes, bool):
            raise TypeError(f"page_bytes must be an int, got {page_bytes!r}")
        self._eight_bit = eight_bit
        self._min_8bit_size = min_8bit_size
        self._paged = paged
        self._budget = budget if paged else None
        # A page holds whole quantization blocks; fp32 states take 8 bytes per element, 8-bit
        # ones 2 bytes plus two fp32 absmax per 256 elements.
        self._page_elements = {
            "32bit": page_bytes // 8 // QUANT_BLOCK * QUANT_BLOCK,
            "8bit": page_bytes // (2 * QUANT_BLOCK + 8) * QUANT_BLOCK,
        }
        if paged and min(self._page_elements.values()) < QUANT_BLOCK:
            raise ValueError(f"page_bytes must hold at least {QUANT_BLOCK} elements of state "
                             f"({8 * QUANT_BLOCK} bytes), got {page_bytes}")
        self._page_bytes = page_bytes
        if paged:
            check_budget(budget, page_bytes)
        self._managers: Dict[torch.device, PageManager] = {}
        self._maps: Dict[torch.device, tuple] = {}
        self._pending_checks = []  # CUDA: (event, pinned flag, states) of 8-bit updates not yet read
        self._epoch = 0  # bumped when params or states change other than by a step (plans are rebuilt)
        self._plans: Dict[torch.device, _DevicePlan] = {}
        self._stateless = (None, [])  # (key, params without states), re-listed when the key changes
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, with the group checked before it is added: a bad group
        raises and leaves the optimizer as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        # A generator is read once here and handed on as a list.
        params = [params] if isinstance(params, torch.Tensor) else params
        if params is not None and not isinstance(params, (set, dict)):
            params = list(params)
        param_group = {**param_group, "params": params}
        _check_group({**self.defaults, **param_group}, f"param group {len(self.param_groups)}")
        for p in params or ():
            if isinstance(p, torch.Tensor) and p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"parameters must be float32, bfloat16 or float16, got {p.dtype}")
            if isinstance(p, torch.Tensor) and not p.is_contiguous():
                raise ValueError("parameters must be contiguous (states are paged over the flat parameter)")
        super().add_param_group(param_group)
        self._epoch += 1

    # ---- copy.deepcopy and pickle -------------------------------------------------------
    _CONFIG = ("_eight_bit", "_min_8bit_size", "_paged", "_budget", "_page_elements", "_page_bytes")

    def __getstate__(self) -> dict:
        """The configuration, the groups and each parameter's whole states; pages, plans and
        device caches are rebuilt on the other side (torch's own keeps only defaults, state
        and param_groups, which left a copy without its configuration)."""
        for manager in self._managers.values():
            manager.synchronize()
        self._read_pending_checks(wait=True)
        state = {p: self._flat_state(v) for p, v in self.state.items() if "pages" in v}
        return {"defaults": self.defaults, "param_groups": self.param_groups, "flat_state": state,
                **{name: getattr(self, name) for name in self._CONFIG}}

    def __setstate__(self, state: dict) -> None:
        if "flat_state" not in state:  # torch's load_state_dict calls this too: nothing to rebuild then
            super().__setstate__(state)
            return
        flat_state = state.pop("flat_state")
        super().__setstate__({**state, "state": defaultdict(dict)})
        self._managers, self._maps, self._plans = {}, {}, {}
        self._pending_checks, self._epoch, self._stateless = [], 0, (None, [])
        for p, flat in flat_state.items():
            tensors = {k: v for k, v in flat.items() if k not in ("step", "kind")}
            self._init_state(p, tensors, step=int(flat["step"]))

    # ---- states and pages --------------------------------------------------------------
    def _manager(self, device: torch.device) -> PageManager:
        manager = self._managers.get(device)
        if manager is None:
            min_bytes = self._page_bytes if self._paged else 0
            manager = PageManager(device, self._budget, min_budget_bytes=min_bytes)
            self._managers[device] = manager
        return manager

    def _kind(self, p: torch.Tensor) -> str:
        return "8bit" if self._eight_bit and p.numel() >= self._min_8bit_size else "32bit"

    def _page_ranges(self, p: torch.Tensor, kind: str):
        """Equal pages (whole 256-blocks, the last possibly shorter) of at most page_bytes each:
        a 2048x2048 parameter splits into halves, not into a full page and a sliver."""
        n = _local(p).numel()
        if not self._paged or n == 0:
            return [(0, n)]
        blocks = -(-n // QUANT_BLOCK)
        count = -(-n // self._page_elements[kind])
        size = -(-blocks // count) * QUANT_BLOCK
        return [(s, min(n, s + size)) for s in range(0, n, size)]

    @staticmethod
    def _empty_states(kind: str, n: int, device) -> Dict[str, torch.Tensor]:
        if kind == "32bit":
            return {name: torch.zeros(n, dtype=torch.float32, device=device) for name in STATE32}
        blocks = -(-n // QUANT_BLOCK)
        return {
            "exp_avg_codes": torch.zeros(n, dtype=torch.uint8, device=device),
            "exp_avg_sq_codes": torch.zeros(n, dtype=torch.uint8, device=device),
            "exp_avg_absmax": torch.zeros(blocks, dtype=torch.float32, device=device),
            "exp_avg_sq_absmax": torch.zeros(blocks, dtype=torch.float32, device=device),
        }

    def _init_state(self, p: torch.Tensor, flat: Optional[Dict[str, torch.Tensor]] = None, step: int = 0):
        """Create the pages of `p`: zeros, or slices of `flat` (whole-tensor states) when given."""
        kind = self._kind(p)
        manager = self._manager(p.device)
        pages = []
        for start, end in self._page_ranges(p, kind):
            if flat is None:
                tensors = self._empty_states(kind, end - start, p.device)
            else:
                b0, b1 = start // QUANT_BLOCK, -(-end // QUANT_BLOCK)
                tensors = {
                    name: (t[b0:b1] if name.endswith("absmax") else t[start:end]).to(p.device, copy=True)
                    for name, t in flat.items()
                }
            pages.append(manager.add(start, end, tensors))
        # The step count as a tensor (float32 on the CPU, as torch's AdamW keeps it): the op
        # increments it, so a step does no per-parameter Python arithmetic.
        step = torch.tensor(float(step), dtype=torch.float32)
        self.state[p] = {"step": step, "kind": kind, "pages": pages, "device": p.device}
        self._epoch += 1

    def _maps_on(self, device: torch.device):
        maps = self._maps.get(device)
        if maps is None:
            maps = (dynamic_map(True).to(device), dynamic_map(False).to(device))
            self._maps[device] = maps
        return maps

    # ---- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss."""
        self._read_pending_checks(wait=False)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hyper = []
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = group["lr"] = float(lr)
            _check_hyperparameters(lr, group["betas"], group["eps"], group["weight_decay"])
            hyper += map(float, (lr, *group["betas"], group["eps"], group["weight_decay"]))
        for p in self._stateless_params():
            if p.grad is not None:
                self._init_state(p)
        # Every device's budget is re-read each step, also where no parameter has a gradient.
        for manager in list(self._managers.values()):
            self._step_device(manager, hyper)
        return loss

    def _plan_key(self, manager: PageManager) -> tuple:
        return (self._epoch, manager.version, id(self.state), len(self.state), len(self.param_groups))

    def _stateless_params(self) -> list:
        """The params that have no states yet (listed again only when states or groups change)."""
        key = (self._epoch, id(self.state), len(self.state), len(self.param_groups))
        if self._stateless[0] != key:
            state_of = self.state
            params = [p for g in self.param_groups for p in g["params"] if "pages" not in state_of.get(p, ())]
            self._stateless = (key, params)
        return self._stateless[1]

    def _step_device(self, manager: PageManager, hyper: list) -> None:
        stats = StepStats()
        host_t0 = time.perf_counter()
        device = manager.device
        with timed(stats, "plan_s", manager):
            manager.plan(stats)
        plan = self._plans.get(device)
        key = self._plan_key(manager)
        if plan is None or plan.key != key:
            _ops(device)  # the extension loaded (and its CUDA kernels found) before the plan holds its class
            plan = self._plans[device] = _DevicePlan(key, self, device)
        if plan.local:
            grads = [_local(p.grad) for p in plan.owners]
            params = [_local(p) for p in plan.owners]
        else:
            grads = [p.grad for p in plan.owners]
            params = plan.params
        if manager.paged:
            manager.touch_used(plan.touch, grads)  # recency only matters for eviction
        with timed(stats, "resident_update_s", manager):
            # One call for every resident page; it checks every gradient before changing anything.
            if plan.held is not None:
                nonfinite = plan.held.step(grads, hyper, self._decoupled)
            else:
                nonfinite = _ops(device).adam_multi_step_(params, grads, plan.steps, plan.states, plan.entries, hyper,
                                                          self._decoupled, *plan.maps, plan.nonfinite)
            if nonfinite:
                self._raise_non_finite(plan.owners8)
            if plan.nonfinite is not None:
                self._queue_check(plan.nonfinite[0].ne(0), plan.owners8)
        with timed(stats, "streamed_update_s", manager):
            streamed = [e for e in plan.streamed if grads[e[0]] is not None]
            by_page = {id(e[3]): e for e in streamed}

            def update(page, device_tensors):
                i, group, state, _ = by_page[id(page)]
                grad = grads[i].reshape(-1)
                pflat = params[i].detach().view(-1)
                entry = (group, pflat[page.start:page.end], grad[page.start:page.end], state, page)
                self._update(device, state["kind"], group, [entry], [device_tensors])

            manager.stream([e[3] for e in streamed], update, stats)
        stats.host_s = time.perf_counter() - host_t0
        manager.finish_step(stats)

    def _update(self, device, kind, group, entries, states) -> None:
        ops = _ops(device)
        beta1, beta2 = group["betas"]
        args = ([e[1] for e in entries], [e[2] for e in entries])
        steps = [int(e[3]["step"]) for e in entries]
        hyper = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                 float(group["weight_decay"]), self._decoupled)
        if kind == "32bit":
            ops.adam_step_(*args, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps, *hyper)
        else:
            signed, unsigned = self._maps_on(device)
            state_args = ([s[name] for s in states] for name in STATE8)
            if device.type == "cpu":
                # The op checks the new absmax values as it writes them (see _check_finite).
                if ops.adam8bit_step_checked_(*args, *state_args, signed, unsigned, steps, *hyper):
                    self._raise_non_finite([e[3] for e in entries], states)
                return
            ops.adam8bit_step_(*args, *state_args, signed, unsigned, steps, *hyper)
            self._check_finite(device, [e[3] for e in entries], states)

    # ---- non-finite 8-bit states -----------------------------------------------------------
    def _check_finite(self, device, owners, states) -> None:
        """Flag 8-bit states whose new block absmax is not finite: a gradient element above
        sqrt(float32 max / (1 - beta2)) (~5.8e20 at beta2 = 0.999; ~1.8e19 where g*g is formed
        first, as in bitsandbytes) overflows the second moment, and the whole block's state
        decodes to NaN from the next step on. One fused check over the (small) absmax tensors; on the CPU
        it raises now (the CPU op itself does this check: `_update`), on CUDA the flag is copied to the host
        without a sync and read at the next `step` or `state_dict` (the error comes one step late;
        untested without a GPU)."""
        absmaxes = [s[name] for s in states for name in ("exp_avg_absmax", "exp_avg_sq_absmax")]
        flag = torch.isfinite(torch.cat(absmaxes)).all().logical_not_()
        if device.type != "cuda":
            if flag.item():
                self._raise_non_finite(owners, states)
            return
        self._queue_check(flag, owners)

    def _queue_check(self, flag: torch.Tensor, owners) -> None:
        """CUDA: copy a device flag (non-finite 8-bit state) to the host without a sync; it is
        read at the next `step` or `state_dict`."""
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(flag.device))  # the copy's stream, not the current GPU's
        self._pending_checks.append((event, host, owners))

    def _read_pending_checks(self, wait: bool) -> None:
        still = []
        for event, host, owners in self._pending_checks:
            if wait:
                event.synchronize()
            elif not event.query():
                still.append((event, host, owners))
                continue
            if host.item():
                self._pending_checks = []
                self._raise_non_finite(owners)
        self._pending_checks = still

    def _raise_non_finite(self, owners, checked=None) -> None:
        """`owners`: the states of the update that failed the check; `checked`: the state
        tensors it checked (None when read later: then the pages, after a sync, are scanned)."""
        where = {id(self.state[p]): (gi, pi, p) for gi, group in enumerate(self.param_groups)
                 for pi, p in enumerate(group["params"]) if p in self.state}
        if checked is None:
            for manager in self._managers.values():
                manager.synchronize()
            checked = [None] * len(owners)
        bad = []
        for state, tensors in zip(owners, checked):
            pages = [tensors] if tensors is not None else [pg.tensors for pg in state["pages"]]
            if any(
                not torch.isfinite(t[name]).all() for t in pages for name in ("exp_avg_absmax", "exp_avg_sq_absmax")
            ):
                gi, pi, p = where[id(state)]
                bad.append(f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}, step {int(state['step'])})")
        raise FloatingPointError(
            f"{type(self).__name__}: the 8-bit state of {', '.join(bad) or 'a parameter'} is no longer finite: "
            "a NaN gradient element, or one above ~5.8e20 (sqrt(float32 max / (1 - beta2))) or inf that "
            "overflows the second moment (1 - beta2) * g * g, and every "
            "element of its 256-element block would decode to NaN. Clip the gradients (e.g. "
            "torch.nn.utils.clip_grad_norm_) or skip such steps; reload a checkpoint to continue."
        )

    # ---- state_dict ----------------------------------------------------------------------
    def _flat_state(self, state: dict) -> dict:
        """Whole-tensor states of one parameter (pages joined; on the host when paged)."""
        pages = state["pages"]
        # Unpaged: the live tensors, as torch's state_dict (so a later step moves the step count and
        # the moments together); paged: a copy of all of them, joined on the host.
        out = {"step": state["step"] if not self._paged else state["step"].clone(), "kind": state["kind"]}
        for name in pages[0].tensors:
            parts = [pg.tensors[name] for pg in pages]
            if len(parts) == 1 and not self._paged:
                out[name] = parts[0]
            else:
                out[name] = torch.cat([t.cpu() for t in parts])
        return out

    def state_dict(self) -> dict:
        """torch's layout; each parameter's state is {"step", "kind" ("32bit"/"8bit"), and its
        whole state tensors} whatever the paging, so it loads into paged or unpaged optimizers
        on any device."""
        for manager in self._managers.values():
            manager.synchronize()
        self._read_pending_checks(wait=True)
        sd = super().state_dict()
        sd["state"] = {k: (self._flat_state(v) if "pages" in v else v) for k, v in sd["state"].items() if v}
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for k, state in sd["state"].items():
            if hasattr(params[k], "_local_tensor") and "kind" in state:
                sd["state"][k] = _as_dtensor_states(state, params[k])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` (from a paged or unpaged optimizer, any device): states move to
        each parameter's device keeping their dtypes (fp32 moments, uint8 codes).

        All or nothing: the whole state_dict is validated before anything of this optimizer
        changes, so a bad one raises ValueError/TypeError and leaves the live state as it was."""
        flats = self._validated_states(state_dict)
        for manager in self._managers.values():
            manager.clear()
        super().load_state_dict({**state_dict, "state": {}})
        self.state = defaultdict(dict)
        self._epoch += 1
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for p, loaded in zip(params, flats):
            if loaded is not None:
                self._init_state(p, loaded[0], step=loaded[1])

    def _validated_states(self, state_dict) -> list:
        """Per parameter of this optimizer: None (no saved state) or (flat state tensors, step),
        after checking everything `load_state_dict` needs; raises before any change."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (an optimizer's state_dict())")
        saved_groups, saved_states = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_states, dict):
            raise ValueError("state_dict['param_groups'] must be a list and state_dict['state'] a dict")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"state_dict['param_groups'][{i}] has no 'params'")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict param group {i} has {len(saved['params'])} parameters, "
                                 f"this optimizer's {len(group['params'])}")
            # torch replaces each group by the saved one: it must be complete and usable.
            _check_group(saved, f"state_dict param group {i}")
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        out = []
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved_states:
                out.append(None)
                continue
            saved = saved_states[saved_id]
            if not isinstance(saved, dict):
                raise ValueError(f"state of parameter {saved_id} must be a dict, got {type(saved).__name__}")
            if not saved:  # an entry created by reading `opt.state[p]` before any step: no state
                out.append(None)
                continue
            kind = self._kind(p)
            if "kind" not in saved and {"step", *STATE32} <= saved.keys():
                saved = _from_torch_adam(saved, kind, _local(p).numel(), saved_id)
            if saved.get("kind") != kind:
                raise ValueError(f"parameter {saved_id} has {saved.get('kind')!r} states in the state_dict "
                                 f"but this optimizer keeps {kind!r} states for it")
            step = saved.get("step")
            step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
            if (isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step)
                    or step != int(step) or step < 0):
                raise ValueError(f"'step' of parameter {saved_id} must be an integer >= 0, got {saved.get('step')!r}")
            names = STATE32 if kind == "32bit" else STATE8
            table = saved.get("exp_avg_absmax")
            if kind == "8bit" and isinstance(table, torch.Tensor) and table.dim() == 2:
                try:  # the sharded form (a distributed checkpoint): this rank's blocks
                    saved = {**saved, **_local_8bit_states(saved, p)}
                except (KeyError, ValueError) as e:
                    raise ValueError(f"8-bit states of parameter {saved_id}: {e}") from None
            flat = {}
            n = _local(p).numel()
            for name in names:
                t = saved.get(name)
                t = _local(t) if isinstance(t, torch.Tensor) else t  # DTensor states: this rank's shard
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"state {name!r} of parameter {saved_id} is missing or not a tensor")
                want_dtype = torch.uint8 if name.endswith("codes") else torch.float32
                if t.dtype != want_dtype:
                    raise ValueError(f"state {name!r} of parameter {saved_id} is {t.dtype}, expected {want_dtype}")
                want = -(-n // QUANT_BLOCK) if name.endswith("absmax") else n
                if t.numel() != want:
                    raise ValueError(
                        f"state {name!r} of parameter {saved_id} has {t.numel()} elements, expected {want}"
                    )
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"state {name!r} of parameter {saved_id} has non-finite values")
                if name != "exp_avg" and t.is_floating_point() and bool((t < 0).any()):
                    # a negative second moment or scale would turn the next step's parameters to NaN
                    raise ValueError(f"state {name!r} of parameter {saved_id} has negative values")
                flat[name] = t.reshape(-1)
            out.append((flat, int(step)))
        return out

    # ---- paging stats --------------------------------------------------------------------
    def paging_stats(self) -> dict:
        """Per device: resident and host bytes of the states, page counts, staging bytes, bytes
        moved each way (total and last step), and the last step's time split in seconds (plan,
        resident update, streamed update, total: wall time on the CPU, CUDA-event time on a GPU,
        where this call waits for the last step's events; `host_s`: the step's host time). A
        step itself never synchronises the device."""
        return {str(d): m.stats() for d, m in self._managers.items()}


def paging_stats(optimizer) -> dict:
    """`optimizer.paging_stats()` for any qlora_fast optimizer."""
    return optimizer.paging_stats()


class Adam(_PagedAdamBase):
    """Adam (L2 weight decay added to the gradient) with fp32 states."""

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr, betas, eps, weight_decay)


class AdamW(_PagedAdamBase):
    """AdamW (decoupled weight decay) with fp32 states; follows torch.optim.AdamW to float
    rounding. Parameters may be float32, bfloat16 or float16 (updated in fp32, rounded once)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


class AdamW8bit(_PagedAdamBase):
    """AdamW with 8-bit blockwise states (a quarter of the fp32 state memory); parameters with
    fewer than `min_8bit_size` elements keep fp32 states."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, min_8bit_size=4096):
        super().__init__(params, lr, betas, eps, weight_decay, eight_bit=True, min_8bit_size=min_8bit_size)


class PagedAdamW(_PagedAdamBase):
    """AdamW with fp32 states in pages of `page_bytes` that stay on the device within `budget`
    (bytes, or a fraction of free device memory re-read each step) and otherwise live in pinned
    host memory, streamed through the device for their update."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *,
                 budget: Budget = 0.8, page_bytes=8 << 20):
        super().__init__(params, lr, betas, eps, weight_decay, paged=True, budget=budget, page_bytes=page_bytes)


class PagedAdamW8bit(_PagedAdamBase):
    """`PagedAdamW` with 8-bit blockwise states (see `AdamW8bit`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *,
                 min_8bit_size=4096, budget: Budget = 0.8, page_bytes=8 << 20):
        super().__init__(params, lr, betas, eps, weight_decay, eight_bit=True, min_8bit_size=min_8bit_size,
                         paged=True, budget=budget, page_bytes=page_bytes)
