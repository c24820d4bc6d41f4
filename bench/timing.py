"""The wall-clock loop the CPU benchmarks' summaries share (pytest-benchmark times the tests)."""
import time


def run_times(fn, rounds: int, warmup: bool = True, clock=time.perf_counter) -> list:
    """Seconds taken by each of `rounds` calls of `fn()`, after one untimed warm-up call, by `clock`
    (wall time; `time.process_time` for this process's CPU time)."""
    if warmup:
        fn()
    times = []
    for _ in range(rounds):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def median(times) -> float:
    return sorted(times)[len(times) // 2]
