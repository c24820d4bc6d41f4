"""GPU benchmarks: qlora_fast against its peers (bitsandbytes, torchao, PEFT, torch) in one run.

Each area has `bench/gpu_<area>.py` exposing `run(log)`; this driver runs them in turn and writes
everything it prints to `--out` too. Timings use `triton.testing.do_bench` (median) on inputs
larger than L2. Needs a CUDA device; run it through bench/gpu_check.sh.
"""
import argparse
import importlib
import os
import sys
import time
import traceback

AREAS = ["nf4", "lora", "optim", "grpo", "reasoning"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--areas", nargs="*", default=AREAS, help=f"which areas to run (default: {AREAS})")
    parser.add_argument("--out", default=None, help="also append the log to this file")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    sink = open(args.out, "a") if args.out else None

    def log(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    log(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    failed = 0
    for area in args.areas:
        log(f"\n## {area}")
        try:
            importlib.import_module(f"gpu_{area}").run(log)
        except Exception:  # one area failing must not hide the others' figures
            failed += 1
            log(traceback.format_exc())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
