"""Time the cells of ``bench/benchmarks_gpu.py``'s asv classes without asv.

    python bench/asv_cells.py LinearGaussianFitGPU [MPPCAEStepGPU ...] [--reps 3]
        [--out table.md]

The device machine has no network to install asv from, and its sessions are
short: this runs each cell's ``setup`` (which compiles) and then each ``time_*``
method ``--reps`` times, by the host's clock (every timing ends with the module's
``synchronize``), and prints one markdown row per cell with the median in ms.  A
cell whose ``setup`` raises ``NotImplementedError`` (asv's skip) is listed as
skipped; any other error is printed in its row and the run goes on.
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_ms  # noqa: E402

import benchmarks_gpu  # noqa: E402


def cell_rows(name, reps):
    """Markdown rows ``| class | cell | timing | ms |`` for every cell of ``name``."""
    cls = getattr(benchmarks_gpu, name)
    timings = sorted(attr for attr in dir(cls) if attr.startswith("time_"))
    for cell in itertools.product(*cls.params):
        label = ", ".join(f"{p}={v}" for p, v in zip(cls.param_names, cell))
        bench = cls()
        try:
            bench.setup(*cell)
        except NotImplementedError as skip:
            yield f"| {name} | {label} | | skipped: {skip} |"
            continue
        except Exception as exc:  # a broken cell costs its row, not the run
            yield f"| {name} | {label} | setup | ERROR {type(exc).__name__}: {exc} |"
            continue
        for timing in timings:
            try:
                ms = median_ms(lambda: getattr(bench, timing)(*cell), reps)
                yield f"| {name} | {label} | {timing} | {ms:.2f} |"
            except Exception as exc:
                yield f"| {name} | {label} | {timing} | ERROR {type(exc).__name__}: {exc} |"
        if hasattr(bench, "teardown"):
            bench.teardown(*cell)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classes", nargs="+", help="asv classes of bench/benchmarks_gpu.py")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    lines = ["| class | cell | timing | median ms |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.classes:
        for row in cell_rows(name, args.reps):
            print(row, flush=True)
            lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
