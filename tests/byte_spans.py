"""Byte ranges of a launch's arguments, merged where they overlap (tests only):
arguments that share memory are one range, so the checks built on them
(``tests/triton_bounds.py``, ``tests/kernels/guarded_args.py``) treat memory two
views share as one."""


def merged_spans(named_spans):
    """``named_spans``: (name, (low, high)) byte ranges, high one past the last
    byte.  Returns [(low, high, [names])], sorted, no two overlapping; ranges
    that only touch stay apart."""
    merged = []
    for (low, high), name in sorted((span, name) for name, span in named_spans):
        if merged and low < merged[-1][1]:
            first, last, names = merged[-1]
            merged[-1] = (first, max(last, high), names + [name])
        else:
            merged.append((low, high, [name]))
    return merged
