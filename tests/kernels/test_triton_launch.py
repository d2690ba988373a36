"""The Triton launch policy: tile tables, shrink-to-fit on shared memory, precision."""

import pytest

from tests.conftest import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def test_tile_config_steps_down_to_a_floor():
    from fastlvm.kernels._triton_gaussian import TileConfig

    cfg = TileConfig(64, 64, 64, 8, 2)
    seen = [cfg]
    while (cfg := cfg.smaller()) is not None:
        seen.append(cfg)
    assert seen[1].num_stages == 1
    assert seen[-1] == TileConfig(16, 16, 16, 8, 1)
    assert len(seen) == len(set(seen))  # every step changes something


def test_launch_fitted_shrinks_on_out_of_resources_and_remembers():
    from triton.runtime.errors import OutOfResources

    from fastlvm.kernels import _triton_gaussian as tg

    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg.block_k > 16:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return "ran"

    key = ("test-key", object())
    assert tg.launch_fitted("probe", key, tg.TileConfig(64, 64, 64, 8, 2), launch) == "ran"
    assert tried[-1].block_k == 16 and tried[-1].block_n == 64
    tried.clear()
    assert tg.launch_fitted("probe", key, tg.TileConfig(64, 64, 64, 8, 2), launch) == "ran"
    assert len(tried) == 1  # the fitting config was remembered


def test_launch_fitted_gives_up_at_the_floor_with_the_ways_round_it():
    """Past the smallest tiles the error is fastlvm's: the kernel, Triton's figures,
    and what to do (another backend, fewer features, a streamed covariance type),
    not Triton's advice to shrink blocks the table has already shrunk."""
    from triton.runtime.errors import OutOfResources

    from fastlvm.kernels import _triton_gaussian as tg

    tried = []

    def never(cfg):
        tried.append(cfg)
        raise OutOfResources(262_144, 232_448, "shared memory")

    with pytest.raises(ValueError) as err:
        tg.launch_fitted("probe", ("floor", object()), tg.TileConfig(32, 32, 32, 4, 2), never)
    assert tried[-1] == tg.TileConfig(16, 16, 16, 4, 1)  # it went all the way down first
    message = str(err.value)
    for part in ("'probe'", "262,144 bytes of shared memory", "232,448", "n_features",
                 "CPU backend", "CuPy backend", "any covariance_type", "16,384 wide"):
        assert part in message, part
    assert isinstance(err.value.__cause__, OutOfResources)


def test_dot_precision_choices(monkeypatch):
    import torch

    from fastlvm.kernels._triton_gaussian import dot_precision

    monkeypatch.delenv("FASTLVM_TRITON_PRECISION", raising=False)
    assert dot_precision(torch.float64) == "ieee"
    assert dot_precision(torch.float32) == "tf32x3"
    monkeypatch.setenv("FASTLVM_TRITON_PRECISION", "tf32")
    assert dot_precision(torch.float32) == "tf32"
    monkeypatch.setenv("FASTLVM_TRITON_PRECISION", "fp8")
    with pytest.raises(ValueError, match="FASTLVM_TRITON_PRECISION"):
        dot_precision(torch.float32)
