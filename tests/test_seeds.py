"""Seed sets never overlap: calibration (observer ranges), compensation fit, held-out check, parity and evaluation
(fidelity benchmark, report) trajectories start from disjoint seeds, at the largest counts the config accepts, and
a build really draws each stage's noise from its own set (recorded while a tiny build runs)."""

from __future__ import annotations

import inspect
from itertools import combinations

import pytest
from click.testing import CliRunner

from qdc_export import sampling
from qdc_export.check.folder import PARITY_SEED_OFFSET
from qdc_export.cli import main
from qdc_export.compensation.stage import fit_seeds, held_out_seeds
from qdc_export.config import MAX_CALIB_SAMPLES, MAX_PARITY_SAMPLES, BuildConfig
from qdc_export.errors import UserError
from qdc_export.quantize.calibrate import calibration_seeds
from qdc_export.report.fidelity import MAX_EVALUATION_IMAGES, evaluation_seeds


def _seed_sets(config: BuildConfig, num_images: int) -> dict[str, list[int]]:
    return {
        "calibration": calibration_seeds(config.seed, config.calib_samples),
        "fit": fit_seeds(config),
        "held-out": held_out_seeds(config),
        "parity": [PARITY_SEED_OFFSET + i for i in range(config.parity_samples)],
        "evaluation": evaluation_seeds(num_images),
    }


@pytest.mark.parametrize("seed", [0, 1, 7, 13, 12345])
def test_seed_sets_are_disjoint_at_the_largest_supported_counts(seed):
    config = BuildConfig(seed=seed, calib_samples=MAX_CALIB_SAMPLES, parity_samples=MAX_PARITY_SAMPLES)
    sets = _seed_sets(config, MAX_EVALUATION_IMAGES)
    expected_sizes = {"calibration": MAX_CALIB_SAMPLES, "fit": MAX_CALIB_SAMPLES, "held-out": MAX_CALIB_SAMPLES,
                      "parity": MAX_PARITY_SAMPLES, "evaluation": MAX_EVALUATION_IMAGES}
    for name, seeds in sets.items():
        assert len(set(seeds)) == len(seeds) == expected_sizes[name], name
    for (a, sa), (b, sb) in combinations(sets.items(), 2):
        shared = set(sa) & set(sb)
        assert not shared, f"seed {seed}: {a} and {b} share {len(shared)} seeds, e.g. {sorted(shared)[:3]}"


@pytest.mark.parametrize("fields, needle", [
    ({"calib_samples": MAX_CALIB_SAMPLES + 1}, "--calib-samples must be in 1..1000"),
    ({"calib_samples": 0}, "--calib-samples must be in 1..1000"),
    ({"parity_samples": MAX_PARITY_SAMPLES + 1}, "--parity-samples must be in 1..1000"),
    ({"seed": -1}, "--seed must be >= 0"),
])
def test_counts_beyond_the_disjoint_range_are_user_errors(fields, needle):
    with pytest.raises(UserError, match=needle):
        BuildConfig(**fields)


def test_cli_refuses_too_many_calibration_samples_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["build", "tiny-unet2d", "--calib-samples", str(MAX_CALIB_SAMPLES + 1),
                                       "--out", str(tmp_path / "b")])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(lines) == 1 and "--calib-samples must be in 1..1000, got 1001" in lines[0], result.output
    assert not (tmp_path / "b").exists()
    result = CliRunner().invoke(main, ["check", str(tmp_path), "--seeds", str(MAX_PARITY_SAMPLES + 1)])
    assert result.exit_code != 0 and "--seeds must be in 1..1000, got 1001" in result.output, result.output
    with pytest.raises(UserError, match="evaluation images must be in"):
        evaluation_seeds(MAX_EVALUATION_IMAGES + 1)


def test_a_build_draws_each_stage_from_its_own_seed_set(monkeypatch, build_factory):
    """Every starting noise of a tiny TCEC build (held-out check on) is recorded with the function that asked for
    it; each stage must use exactly its set."""
    used: dict[str, set[int]] = {}
    real = sampling.initial_latents  # every sampler episode draws its starting noise here (Episode.from_seeds)
    stages = {"run_calibration": "calibration", "fit_compensation": "fit", "validate_compensation": "held-out",
              "run_parity": "parity"}

    def initial_latents(shape, seeds):
        callers = [frame.function for frame in inspect.stack()[1:8]]  # helpers nested in a stage count as it
        stage = next((stages[c] for c in callers if c in stages), callers[0])
        used.setdefault(stage, set()).update(seeds)
        return real(shape, seeds)

    monkeypatch.setattr(sampling, "initial_latents", initial_latents)
    overrides = dict(compensation="tcec", comp_validate=True, calib_samples=3, parity_samples=2, steps=2, seed=1)
    result = build_factory("tiny-unet2d", "w8a8", **overrides)
    config = BuildConfig.from_dict(result.manifest["build"])
    expected = {name: set(seeds) for name, seeds in _seed_sets(config, 1).items() if name != "evaluation"}
    assert used == expected, used
