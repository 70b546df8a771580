"""``bt-transfer inspect``, ``convert-official``, ``--version`` and ``--help`` (through Typer's runner)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from sklearn_bayes_transfer.cli import convert_cmd, inspect_cmd  # noqa: F401  (register the commands)
from sklearn_bayes_transfer.cli._app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior, __version__

# The shared Typer app with only the commands under test registered: these tests then do not
# depend on the import health of every other command module (cli/app.py imports them all).

runner = CliRunner()


class _TouchOnUnpickle:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def one_line_error(result, path: pathlib.Path) -> str:
    """A failed command: exit code 1, no traceback, one stderr line naming ``path``."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and str(path) in lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def clamped_prior(random_prior, tmp_path) -> tuple[Prior, pathlib.Path]:
    """A prior with a known clamp, a fifth of its variances at it, saved to a file."""
    base = random_prior(rank=4, seed=3, meta={"var_clamp": 2e-6, "source_task": "supervised"})
    variance = base.variance.clone()
    variance[::5] = 1e-6
    prior = Prior(base.mean, variance, base.factor, names=base.names, shapes=base.shapes,
                  buffers={"bn.running_var": torch.ones(3)}, meta=base.meta)
    return prior, prior.save(tmp_path / "prior.pt")


# -- version and help ---------------------------------------------------------------------------------
def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "inspect" in result.stdout and "convert-official" in result.stdout
    for command in ("inspect", "convert-official"):
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.stdout


# -- inspect -----------------------------------------------------------------------------------------------
def test_inspect_json(clamped_prior):
    prior, path = clamped_prior
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    mean, var = prior.mean.double().numpy(), prior.variance.double().numpy()
    assert info["n_params"] == 53 and info["rank"] == 4 and info["factor_dtype"] == "float32"
    assert info["n_tensors"] == 6 and info["n_buffers"] == 1 and info["file"] == str(path)
    assert info["reference_scale"] == pytest.approx(np.mean(mean ** 2) / np.mean(var), rel=1e-12)
    assert info["variance"]["fraction_at_clamp"] == pytest.approx(np.mean(var <= 1e-6))
    assert 0.19 < info["variance"]["fraction_at_clamp"] < 0.25  # premise: a fifth sit at the clamp
    assert info["variance"]["min"] == pytest.approx(1e-6) and info["variance"]["clamp_known"] is True
    assert info["meta"]["source_task"] == "supervised"


def test_inspect_json_bfloat16(clamped_prior, tmp_path):
    prior, _ = clamped_prior
    path = prior.with_factor_dtype("bfloat16").save(tmp_path / "bf16.pt")
    info = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert info["factor_dtype"] == "bfloat16"


def test_inspect_json_is_strict_json_for_a_zero_variance_prior(tmp_path, random_prior):
    base = random_prior(rank=2, seed=3)
    prior = Prior(base.mean, torch.zeros(base.n_params), base.factor, names=base.names, shapes=base.shapes,
                  meta=base.meta)
    path = prior.save(tmp_path / "zero.pt")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    info = json.loads(result.stdout, parse_constant=refuse)
    assert info["reference_scale"] is None and info["variance"]["max"] == 0.0


def test_inspect_table(clamped_prior):
    prior, path = clamped_prior
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for label in ("backbone", "parameters D", "rank K", "factor dtype", "fraction at clamp",
                  "reference scale lambda_0"):
        assert label in out
    assert "test-mlp" in out and "53 in 6 tensors" in out and "float32" in out
    assert f"{prior.reference_scale():.3g}" in out
    assert f"{prior.variance_stats()['fraction_at_clamp']:.1%}" in out


@pytest.mark.parametrize("kind", ["text", "truncated", "missing", "plain-dict", "evil"])
def test_inspect_bad_file(clamped_prior, tmp_path, kind):
    _, good = clamped_prior
    path = tmp_path / f"{kind}.pt"
    marker = tmp_path / "pwned"
    if kind == "text":
        path.write_text("this is not a prior\n")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "plain-dict":
        torch.save({"weight": torch.zeros(2)}, path)
    elif kind == "evil":
        torch.save({"format": "sklearn-bayes-transfer/prior", "x": _TouchOnUnpickle(marker)}, path)
    line = one_line_error(runner.invoke(app, ["inspect", str(path), "--json"]), path)
    expected = {"text": "not a file written by torch.save", "truncated": "truncated or corrupt",
                "missing": "does not exist", "plain-dict": "not a sklearn-bayes-transfer prior",
                "evil": "would run code"}[kind]
    assert expected in line
    assert not marker.exists()


# -- convert-official ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalized", [False, True])
def test_convert_official(official_prior, tmp_path, normalized):
    files = official_prior(rank=5, normalized=normalized)
    out = tmp_path / "converted.pt"
    result = runner.invoke(app, ["convert-official", str(files.prefix), str(out)])
    assert result.exit_code == 0, result.output
    detected = "normalized" if normalized else "raw"
    assert f"detected as {detected}" in result.stdout and "wrote" in result.stdout
    converted = Prior.load(out)
    direct = Prior.from_official(files.prefix)
    for name in ("mean", "variance", "factor"):
        assert torch.equal(getattr(converted, name), getattr(direct, name)), name
    assert converted.names == direct.names and converted.buffers.keys() == direct.buffers.keys()
    assert converted.meta["import"]["factor_normalization"] == detected


def test_convert_official_refuses_existing_output(official_prior, tmp_path):
    files = official_prior(rank=5)
    out = tmp_path / "existing.pt"
    out.write_bytes(b"precious")
    result = runner.invoke(app, ["convert-official", str(files.prefix), str(out)])
    line = one_line_error(result, out)
    assert "--force" in line
    assert out.read_bytes() == b"precious"

    forced = runner.invoke(app, ["convert-official", str(files.prefix), str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert Prior.load(out).rank == 5


def test_convert_official_options_and_warnings(official_prior, tmp_path):
    files = official_prior(rank=5, normalized=True, model_holds_last_iterate=True)
    out = tmp_path / "forced.pt"
    result = runner.invoke(app, ["convert-official", str(files.prefix), str(out),
                                 "--factor-normalization", "raw", "--backbone", "resnet18"])
    assert result.exit_code == 0, result.output
    assert "given as raw" in result.stdout
    assert "warning:" in result.stdout and "differs from the parameters" in result.stdout
    prior = Prior.load(out)
    assert prior.meta["backbone"] == "resnet18" and prior.meta["import"]["factor_normalization"] == "raw"


def test_convert_official_missing_files(tmp_path):
    prefix = tmp_path / "nothing"
    out = tmp_path / "out.pt"
    line = one_line_error(runner.invoke(app, ["convert-official", str(prefix), str(out)]), prefix)
    assert "nothing_covmat.pt" in line and "missing" in line
    assert not out.exists()
