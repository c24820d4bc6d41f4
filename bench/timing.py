"""The wall-clock loop the CPU benchmarks' summaries share (pytest-benchmark times the tests)."""
import time


def run_times(fn, rounds: int, warmup: bool = True) -> list:
    """Seconds taken by each of `rounds` calls of `fn()`, after one untimed warm-up call."""
    if warmup:
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(times) -> float:
    return sorted(times)[len(times) // 2]
