"""``bt-transfer fit-prior`` on small image folders, read back by ``bt-transfer inspect``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior, _io
from sklearn_bayes_transfer.data import save_image
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.swag import SwagCallback

FAST = ["--backbone", "small_cnn", "--backbone-kwargs", '{"width": 4}', "--max-epochs", "3", "--swag-start", "1",
        "--rank", "2", "--batch-size", "32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _write_digits(root: Path, classes: tuple[int, ...], per_class: int, labeled: bool = True) -> Path:
    X, y = load_digits_images()
    for c in classes:
        folder = root / str(c) if labeled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(y == c)[:per_class]):
            save_image(X[index], folder / f"{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    return _write_digits(tmp_path_factory.mktemp("digits"), (0, 1, 2), per_class=20)


def _output(result) -> str:
    return result.output + (getattr(result, "stderr", "") or "")


def test_fit_prior_writes_a_prior_that_inspect_reads(runner, digit_folder, tmp_path) -> None:
    out = tmp_path / "prior.pt"
    result = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", str(out), *FAST])
    assert result.exit_code == 0, _output(result)
    assert "wrote" in result.output and "K = 2" in result.output
    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, _output(shown)
    info = json.loads(shown.output)
    assert info["backbone"] == "small_cnn" and info["rank"] == 2
    assert info["meta"]["source_task"] == "supervised" and info["meta"]["classes"] == ["0", "1", "2"]
    assert info["meta"]["preprocess"]["channels"] == 1 and info["meta"]["n_source_examples"] == 60
    prior = Prior.load(out)
    assert prior.n_params == info["n_params"] and prior.meta["n_snapshots"] == 2


def test_simclr_on_an_unlabeled_folder_with_resizing(runner, tmp_path) -> None:
    folder = _write_digits(tmp_path / "loose", (3, 4), per_class=15, labeled=False)
    out = tmp_path / "simclr.pt"
    result = runner.invoke(app, ["fit-prior", "--data", str(folder), "--out", str(out), "--task", "simclr",
                                 "--image-size", "12", *FAST])
    assert result.exit_code == 0, _output(result)
    meta = Prior.load(out).meta
    assert meta["source_task"] == "simclr" and meta["preprocess"]["image_size"] == [12, 12]


def test_existing_output_needs_force(runner, digit_folder, tmp_path) -> None:
    out = tmp_path / "prior.pt"
    out.write_bytes(b"keep me")
    result = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", str(out), *FAST])
    assert result.exit_code == 1
    assert "already exists" in _output(result) and "--force" in _output(result)
    assert out.read_bytes() == b"keep me"
    forced = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", str(out), "--force", *FAST])
    assert forced.exit_code == 0, _output(forced)
    assert Prior.load(out).rank == 2


def test_empty_folder(runner, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["fit-prior", "--data", str(tmp_path / "empty"), "--out",
                                 str(tmp_path / "p.pt"), *FAST])
    assert result.exit_code == 1 and "no images found" in _output(result)
    assert not (tmp_path / "p.pt").exists()


def test_unreadable_image_is_named(runner, tmp_path) -> None:
    folder = _write_digits(tmp_path / "data", (0, 1), per_class=5)
    (folder / "1" / "broken.png").write_bytes(b"not a png at all")
    result = runner.invoke(app, ["fit-prior", "--data", str(folder), "--out", str(tmp_path / "p.pt"), *FAST])
    assert result.exit_code == 1 and "broken.png" in _output(result)


def test_single_class_is_refused_for_supervised(runner, tmp_path) -> None:
    folder = _write_digits(tmp_path / "one", (7,), per_class=10)
    result = runner.invoke(app, ["fit-prior", "--data", str(folder), "--out", str(tmp_path / "p.pt"), *FAST])
    assert result.exit_code == 1
    assert "at least 2 classes" in _output(result) and "simclr" in _output(result)


def test_bad_rank_and_too_few_snapshots(runner, digit_folder, tmp_path) -> None:
    out = str(tmp_path / "p.pt")
    low = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", out, *FAST, "--rank", "1"])
    assert low.exit_code == 1 and "rank >= 2" in _output(low)
    few = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", out, *FAST, "--rank", "4"])
    assert few.exit_code == 1 and "swag_start" in _output(few) and "collect_every" in _output(few)
    assert not Path(out).exists()


def test_bad_image_size_is_a_usage_error(runner, digit_folder, tmp_path) -> None:
    result = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", str(tmp_path / "p.pt"),
                                 "--image-size", "12by12", *FAST])
    assert result.exit_code == 2 and "image size" in _output(result)


def test_ctrl_c_during_training_writes_nothing(runner, digit_folder, tmp_path, monkeypatch) -> None:
    def interrupt(self, net, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SwagCallback, "on_epoch_end", interrupt)
    out = tmp_path / "prior.pt"
    result = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", str(out), *FAST])
    assert result.exit_code == 130 and "interrupted" in _output(result)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_saving_writes_nothing(runner, digit_folder, tmp_path, monkeypatch) -> None:
    real_save = torch.save

    def interrupted_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # the whole temporary file is there...
        raise KeyboardInterrupt  # ...but the rename onto the target never happens

    monkeypatch.setattr(_io.torch, "save", interrupted_save)
    out = tmp_path / "prior.pt"
    result = runner.invoke(app, ["fit-prior", "--data", str(digit_folder), "--out", str(out), *FAST])
    assert result.exit_code == 130
    assert os.listdir(tmp_path) == []
