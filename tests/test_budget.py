"""Size targets: per-tensor bits from the coded bytes of every choice (deepcompress.budget)."""
import pytest
import torch
from click.testing import CliRunner

from deepcompress import CompressConfig, compress_file
from deepcompress.budget import choose_bits, choose_bits_for_error, descend, hull, rate_points
from deepcompress.cli.main import main
from deepcompress.errors import CompressError


@pytest.fixture(scope="module")
def state(trained):
    return {k: v.detach().clone() for k, v in trained.state_dict().items()}


def test_the_file_meets_the_target_at_less_error_than_uniform_bits(state, tmp_path):
    rate = rate_points(state)
    for target in (9000, 14000, 30000):
        choices = choose_bits(rate, target)
        assert rate.fixed + sum(c.bytes for c in choices) <= target
        # the best single bit width that fits has at least the error of the per-tensor choice
        uniform = [b for b in range(8, 0, -1)
                   if rate.fixed + sum(p[b - 1][1] for p in rate.points.values()) <= target]
        if uniform:
            b = uniform[0]
            assert sum(c.rel_error for c in choices) <= sum(p[b - 1][2] for p in rate.points.values())
    torch.save(state, tmp_path / "m.pt")
    report = compress_file(tmp_path / "m.pt", tmp_path / "m.dcz",
                           CompressConfig(target_bytes=12000, quiet=True))
    assert report.bytes == (tmp_path / "m.dcz").stat().st_size <= 12000
    report = compress_file(tmp_path / "m.pt", tmp_path / "r.dcz",
                           CompressConfig(target_ratio=15, sparsity=0.5, quiet=True))
    assert report.ratio >= 15 and any(r.nonzero < r.weights / 1.9 for r in report.layers)


def test_the_error_target_is_met_at_fewer_bytes_than_uniform_bits(state):
    rate = rate_points(state)
    n = len(rate.points)
    previous = None
    for target in (0.001, 0.01, 0.05):
        choices = choose_bits_for_error(rate, target)
        assert sum(c.rel_error for c in choices) / n <= target
        size = sum(c.bytes for c in choices)
        # the widest uniform width within the target is never smaller than the per-tensor choice
        uniform = [b for b in range(1, 9)
                   if sum(p[b - 1][2] for p in rate.points.values()) / n <= target]
        if uniform:
            assert size <= sum(p[uniform[0] - 1][1] for p in rate.points.values())
        assert previous is None or size <= previous  # a looser target never costs more
        previous = size
    assert {c.bits for c in choose_bits_for_error(rate, 1e-12)} == {8}  # nothing lower fits


def test_an_impossible_target_says_the_smallest_size(state):
    with pytest.raises(CompressError, match="even 1 bit everywhere takes"):
        choose_bits(rate_points(state), 100)


def test_cli_target_and_bits_conflict(trained, tmp_path):
    torch.save(trained.state_dict(), tmp_path / "m.pt")
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.dcz"),
                                  "--target-ratio", "20", "--bits", "4"])
    assert r.exit_code == 2 and "drop bits or the target" in r.output
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.dcz"),
                                  "--target-ratio", "20", "--quiet"])
    assert r.exit_code == 0 and (tmp_path / "o.dcz").stat().st_size <= 202440 / 20


def test_hull_keeps_only_points_a_lagrangian_choice_can_stop_at():
    pts = [("a", 10, 1.0), ("b", 20, 0.5), ("c", 30, 0.45), ("d", 40, 0.1), ("e", 25, 0.9),
           ("f", 20, 0.7), ("g", 50, 0.1)]
    # e and f cost more than b for more error; g more than d for the same; c lies above the
    # chord from b to d
    assert [p[0] for p in hull(pts)] == ["a", "b", "d"]
    assert hull([("x", 5, 0.0)]) == [("x", 5, 0.0)]


def test_descend_fits_the_target_then_spends_what_is_left():
    points = {"big": [("lo", 100, 0.9), ("mid", 300, 0.3), ("hi", 600, 0.0)],
              "small": [("lo", 10, 0.5), ("hi", 40, 0.0)]}
    assert descend(points, 50, 10_000) == {"big": 2, "small": 1}
    assert descend(points, 50, 680) == {"big": 1, "small": 1}  # big's step: least error per byte
    # small is lowered first (cheaper per byte), big must follow, and its large step leaves room
    # to raise small back
    cheap = {"big": [("lo", 100, 0.9), ("hi", 600, 0.0)], "small": [("lo", 10, 0.05), ("hi", 40, 0.0)]}
    assert descend(cheap, 50, 400) == {"big": 0, "small": 1}
    assert descend(points, 50, 150) is None
