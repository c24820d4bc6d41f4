"""Optimizer states in fixed-size pages that live on the device while they fit a budget and in
(pinned) host memory otherwise.

A page holds the states of one contiguous slice of one parameter (at most `page_elements`
elements, a multiple of the 256-element quantization block), so any page can be updated on its
own. Each step, `PageManager.plan` re-reads the budget and moves whole pages: the least recently
used resident pages go to the host until the resident bytes fit, then host pages come back (most
recently used first) while they fit. Pages left on the host are streamed through two device
staging slots: on CUDA the copies in and out run on two side streams of their own, so copying
page i+1 in, page i-1 out and the update of page i all overlap. Nothing uses unified memory:
every move is an explicit copy. No step synchronises the device: timings are CUDA events, read
(and waited for) only when the stats are asked for.

On a CPU-only machine "device" and "host" are both the CPU; the bookkeeping, copies and stats
all still run, which is how the logic is tested without a GPU.
"""
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch

Budget = Union[None, int, float]


@dataclass
class Page:
    """States of elements [start, end) of one parameter; `tensors` maps state name to tensor."""

    start: int
    end: int
    tensors: Dict[str, torch.Tensor]
    on_device: bool
    last_used: int = 0

    def __post_init__(self):
        # Fixed for the page's life: moves replace its tensors with copies of the same shapes.
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class StepStats:
    """What one step did: bytes copied each way and where the time went (seconds)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    plan_s: float = 0.0
    resident_update_s: float = 0.0
    streamed_update_s: float = 0.0
    total_s: float = 0.0
    pages_streamed: int = 0
    host_s: float = 0.0  # wall time the step took on the host (the other *_s are device time on CUDA)
    # CUDA: attr -> (start, end) events, turned into seconds by `resolve` (which waits for `end`).
    events: Dict[str, tuple] = field(default_factory=dict, repr=False)

    def resolve(self) -> None:
        for attr, (start, end) in self.events.items():
            end.synchronize()
            setattr(self, attr, getattr(self, attr) + start.elapsed_time(end) / 1e3)
        self.events = {}


@dataclass
class PagingTotals:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    steps: int = 0
    last: StepStats = field(default_factory=StepStats)


def _available_bytes(device: torch.device) -> int:
    """Free memory on `device` now: for CUDA, the driver's free memory plus what torch's caching
    allocator holds but does not use (it is free for our pages too); MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + int(cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_budget(budget: Budget, min_bytes: int) -> None:
    """ValueError/TypeError unless `budget` is None, an int >= `min_bytes`, or a float in (0, 1]."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be None, an int (bytes) or a float fraction, got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < min_bytes:
        raise ValueError(
            f"budget of {budget} bytes is smaller than one page ({min_bytes} bytes); "
            "raise the budget or lower page_bytes"
        )


class PageManager:
    """Residency, budget and copies of the pages of one optimizer on one device.

    `budget`: None (every page stays on the device), an int (bytes of resident pages), or a float
    in (0, 1] (that fraction of the device memory that is free or already held by resident pages,
    re-read at every `plan`). The two staging slots (one page each) are allocated beyond the
    budget, only while some page lives on the host.
    """

    def __init__(self, device: torch.device, budget: Budget = None, min_budget_bytes: int = 0):
        self.device = torch.device(device)
        check_budget(budget, min_budget_bytes)
        self.budget = budget
        self.pages: List[Page] = []
        self._resident = 0  # bytes of the pages on the device, kept by add/_move/clear (no re-summing)
        self._host_pages = 0  # pages on the host, kept likewise (plan's fast path)
        self.clock = 0
        # Bumped whenever a page is added, dropped or moved (its tensors replaced): the optimizer
        # caches the lists it passes to its step op while this stays the same.
        self.version = 0
        self.totals = PagingTotals()
        self._staging: Dict[tuple, List[torch.Tensor]] = {}
        self._h2d_stream = None  # CUDA: copies into the staging slots
        self._d2h_stream = None  # CUDA: copies out of them, so both directions overlap
        self.last_budget_bytes: Optional[int] = None

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def paged(self) -> bool:
        return self.budget is not None

    def resident_bytes(self) -> int:
        return self._resident

    def host_bytes(self) -> int:
        return sum(p.nbytes for p in self.pages if not p.on_device)

    def budget_bytes(self) -> Optional[int]:
        """The budget now, in bytes (None when unlimited)."""
        if self.budget is None:
            return None
        if isinstance(self.budget, int):
            return self.budget
        return int(self.budget * (_available_bytes(self.device) + self.resident_bytes()))

    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin())
        out.copy_(t)
        return out

    def add(self, start: int, end: int, tensors: Dict[str, torch.Tensor]) -> Page:
        """Register a new page whose `tensors` are on the device; it moves to the host if the
        budget has no room for it."""
        page = Page(start, end, tensors, on_device=True, last_used=self.clock)
        self.version += 1
        budget = self.budget_bytes()
        self.pages.append(page)
        self._resident += page.nbytes
        if budget is not None and self._resident > budget:
            self._move(page, to_device=False, stats=None)
        return page

    def clear(self) -> None:
        """Forget every page (the optimizer is about to load other states)."""
        self.pages.clear()
        self.version += 1
        self._resident = 0
        self._host_pages = 0

    def _move(self, page: Page, to_device: bool, stats: Optional[StepStats]) -> None:
        if page.on_device == to_device:
            return
        self.version += 1
        if to_device:
            page.tensors = {k: t.to(self.device, non_blocking=True) for k, t in page.tensors.items()}
        else:
            page.tensors = {k: self._to_host(t) for k, t in page.tensors.items()}
        page.on_device = to_device
        self._resident += page.nbytes if to_device else -page.nbytes
        self._host_pages += -1 if to_device else 1
        if stats is not None:
            if to_device:
                stats.h2d_bytes += page.nbytes
            else:
                stats.d2h_bytes += page.nbytes

    def plan(self, stats: StepStats) -> None:
        """Fit the resident pages to the budget read now: evict least recently used pages, then
        bring back host pages, most recently used first, while they fit."""
        budget = self.budget_bytes()
        self.last_budget_bytes = budget
        if budget is None:
            return
        if self._host_pages == 0 and self._resident <= budget:
            self._staging.clear()  # everything fits (the common case): no sorting of the pages
            return
        resident = sorted((p for p in self.pages if p.on_device), key=lambda p: p.last_used)
        used = self._resident
        for page in resident:
            if used <= budget:
                break
            self._move(page, to_device=False, stats=stats)
            used -= page.nbytes
        for page in sorted((p for p in self.pages if not p.on_device), key=lambda p: -p.last_used):
            if used + page.nbytes <= budget:
                self._move(page, to_device=True, stats=stats)
                used += page.nbytes
        if not any(not p.on_device for p in self.pages):
            self._staging.clear()  # everything fits: give the staging memory back

    def touch(self, page: Page) -> None:
        self.clock += 1
        page.last_used = self.clock

    def touch_used(self, pages, grads) -> None:
        """`touch` each page of `pages` ((page, owner index) pairs, in order) whose owner has a
        gradient in `grads`: one loop for a whole step."""
        clock = self.clock
        for page, owner in pages:
            if grads[owner] is not None:
                clock += 1
                page.last_used = clock
        self.clock = clock

    # ---- streaming ---------------------------------------------------------------------
    def _prepare_slots(self, pages: List[Page]) -> None:
        """Size both staging slots for the largest of `pages` before any copy is queued, so no
        slot is reallocated while a copy on the side stream may still use it."""
        need: Dict[tuple, int] = {}
        for page in pages:
            for name, t in page.tensors.items():
                key = (name, t.dtype)
                need[key] = max(need.get(key, 0), t.numel())
        for key, numel in need.items():
            slots = self._staging.get(key)
            if slots is None or slots[0].numel() < numel:
                new = [torch.empty(numel, dtype=key[1], device=self.device) for _ in range(2)]
                if self.device.type == "cuda":
                    # The side streams use the slots: tell the caching allocator, so a freed slot
                    # is not handed out again before their copies are done.
                    for t in new:
                        t.record_stream(self._h2d_stream)
                        t.record_stream(self._d2h_stream)
                self._staging[key] = new

    def _slot(self, index: int, page: Page) -> Dict[str, torch.Tensor]:
        """Device views for `page` in staging slot `index` (0 or 1)."""
        return {
            name: self._staging[(name, t.dtype)][index][: t.numel()].view(t.shape)
            for name, t in page.tensors.items()
        }

    def stream(self, pages: List[Page], update: Callable[[Page, Dict[str, torch.Tensor]], None],
               stats: StepStats) -> None:
        """Run `update(page, device_tensors)` for host pages through the two staging slots, the
        copies (on CUDA: in on one side stream, out on another) overlapped with the updates.
        Ordering is by events only (no host synchronisation). Untested on a GPU (none here)."""
        if not pages:
            return
        cuda = self.device.type == "cuda"
        if cuda and self._h2d_stream is None:
            self._h2d_stream = torch.cuda.Stream(self.device)
            self._d2h_stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device) if cuda else None
        self._prepare_slots(pages)
        if cuda:
            # Slots (new ones, or memory the allocator recycled on the main stream) and the
            # params/grads are written by earlier main-stream work: the copies wait for it.
            self._h2d_stream.wait_stream(main)
            self._d2h_stream.wait_stream(main)
        h2d_ctx = (lambda: torch.cuda.stream(self._h2d_stream)) if cuda else contextlib.nullcontext
        d2h_ctx = (lambda: torch.cuda.stream(self._d2h_stream)) if cuda else contextlib.nullcontext
        loaded = [None] * len(pages)  # event: page i is in its slot
        unloaded = [None] * len(pages)  # event: page i has left its slot

        def load(i):
            views = self._slot(i % 2, pages[i])
            with h2d_ctx():
                if cuda and i >= 2:
                    self._h2d_stream.wait_event(unloaded[i - 2])  # same slot as page i-2
                for name, t in pages[i].tensors.items():
                    views[name].copy_(t, non_blocking=True)
                    stats.h2d_bytes += t.numel() * t.element_size()
                if cuda:
                    loaded[i] = self._h2d_stream.record_event()
            return views

        views_of = {0: load(0)}
        if len(pages) > 1:
            views_of[1] = load(1)
        for i, page in enumerate(pages):
            views = views_of.pop(i)
            if cuda:
                main.wait_event(loaded[i])
            update(page, views)
            with d2h_ctx():
                if cuda:
                    self._d2h_stream.wait_event(main.record_event())
                for name, t in page.tensors.items():
                    t.copy_(views[name], non_blocking=True)
                    stats.d2h_bytes += t.numel() * t.element_size()
                if cuda:
                    unloaded[i] = self._d2h_stream.record_event()
            if i + 2 < len(pages):
                views_of[i + 2] = load(i + 2)
        if cuda:
            # The host copies of the pages are complete before anything reads them again
            # (the next step's loads, state_dict) and the slots are free for the next step.
            main.wait_stream(self._d2h_stream)
            main.wait_stream(self._h2d_stream)
        stats.pages_streamed += len(pages)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def finish_step(self, stats: StepStats) -> None:
        self.totals.h2d_bytes += stats.h2d_bytes
        self.totals.d2h_bytes += stats.d2h_bytes
        self.totals.steps += 1
        self.totals.last = stats

    def stats(self) -> dict:
        last = self.totals.last
        last.resolve()  # CUDA: waits for the last step's timing events (only here)
        return {
            "device": str(self.device),
            "budget_bytes": self.last_budget_bytes,
            "resident_bytes": self.resident_bytes(),
            "host_bytes": self.host_bytes(),
            "pages_resident": sum(1 for p in self.pages if p.on_device),
            "pages_host": sum(1 for p in self.pages if not p.on_device),
            "staging_bytes": sum(s.numel() * s.element_size() for slots in self._staging.values() for s in slots),
            "h2d_bytes_total": self.totals.h2d_bytes,
            "d2h_bytes_total": self.totals.d2h_bytes,
            "steps": self.totals.steps,
            "last_step": {k: v for k, v in vars(last).items() if k != "events"},
        }


def timed(stats: StepStats, attr: str, manager: PageManager):
    """Context manager adding the time of a block to `stats.attr`: wall time on the CPU; on CUDA
    two events around the block, read by `StepStats.resolve` when the stats are asked for, so
    timing never synchronises the device during a step."""

    @contextlib.contextmanager
    def _ctx():
        if manager.device.type == "cuda":
            stream = torch.cuda.current_stream(manager.device)  # its GPU's, whichever GPU is current
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            stats.events[attr] = (start, end)
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(stats, attr, getattr(stats, attr) + time.perf_counter() - t0)

    return _ctx()
