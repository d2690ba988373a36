"""Swap the Triton kernels' tile tables for a candidate's, for the tile sweeps.

``triton_tiles.py`` (timed on a GPU) and ``sm90_tile_stacks.py`` (compiled for
sm_90, no GPU) try candidate tiles by replacing a table function for a while.
``launch_fitted`` remembers the config that fitted each kernel, so its memory is
forgotten on the way in and out: each candidate, and the table after it, starts
from its own config.
"""

import contextlib


@contextlib.contextmanager
def tables_replaced(replacements):
    """Within the block, ``replacements`` ({(module, name): function}) stand in for
    those tile tables; the originals come back after it, even on an error."""
    from fastlvm.kernels import _triton_gaussian as tg

    saved = {(module, name): getattr(module, name) for module, name in replacements}
    tg._FITTING.clear()
    for (module, name), function in replacements.items():
        setattr(module, name, function)
    try:
        yield
    finally:
        for (module, name), function in saved.items():
            setattr(module, name, function)
        tg._FITTING.clear()


def low_rank_tables(lr, cfg):
    """The replacements that give every mixture-of-PPCA kernel ``cfg``
    (``lr``: ``fastlvm.kernels._triton_low_rank``): the statistics' table and the
    row kernels', and for rows past 128 padded features
    (``_triton_low_rank_wide.wide_configs``) its row tile, warps and, as the
    feature step, ``cfg.block_j`` (8 components a log-density program)."""
    from fastlvm.kernels import _triton_low_rank_wide as wide

    return {(lr, "low_rank_config"): lambda dtype, bd: cfg,
            (lr, "row_pass_config"): lambda dtype, bd, bq: cfg,
            (wide, "wide_configs"): lambda dtype, bd, bq: (cfg._replace(block_k=8),
                                                           cfg._replace(block_k=1))}
