"""``bt-transfer finetune``, ``predict`` and ``evaluate`` end to end on tiny image folders."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, PREPROCESS, one_line_error, write_folder, write_prior
from PIL import Image
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.modelfile import load_model

runner = CliRunner()
FAST = ["--max-epochs", "3", "--lr", "0.05", "--batch-size", "8", "--quiet"]




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fine-tuned model (through the CLI) shared by the predict and evaluate tests."""
    root = tmp_path_factory.mktemp("finetuned")
    prior = write_prior(root / "prior.pt")
    train = write_folder(root / "train")
    test = write_folder(root / "test", 3, seed=1)
    model = root / "model.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(train), "--out", str(model),
                                 "--max-epochs", "8", "--lr", "0.05", "--batch-size", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"root": root, "prior": prior, "train": train, "test": test, "model": model, "output": result.stdout}


def reference_proba(model: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities from the library directly, with the folder's true class indices."""
    estimator = load_model(model)
    X, y = load_image_folder(folder, image_size=(8, 8), channels=1)
    index = {c: i for i, c in enumerate(estimator.classes_.tolist())}
    return estimator.predict_proba(X), np.asarray([index[label] for label in y]), estimator.classes_


# -- the happy path --------------------------------------------------------------------------------------
def test_finetune_writes_a_model_that_learned(trained):
    assert "3 classes (ant, bee, cat), 18 images, 8 epochs" in trained["output"]
    estimator = load_model(trained["model"])
    assert estimator.classes_.tolist() == list(CLASSES)
    assert estimator.get_params()["max_epochs"] == 8 and estimator.get_params()["prior_scale"] == "auto"
    # "auto" is recorded as the scale it meant for this prior.
    assert estimator.prior_scale_ == pytest.approx(Prior.load(trained["prior"]).reference_scale() * 1e3)
    proba, y, _ = reference_proba(trained["model"], trained["train"])
    assert (proba.argmax(1) == y).mean() > 0.5  # well above chance (1/3): the prior was fine-tuned


def test_predict_csv_matches_the_library(trained, tmp_path):
    out = tmp_path / "preds.csv"
    result = runner.invoke(app, ["predict", "--model", str(trained["model"]), str(trained["test"]), "--proba",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "p_ant", "p_bee", "p_cat"]
    proba, _, classes = reference_proba(trained["model"], trained["test"])
    assert [Path(r["path"]).relative_to(trained["test"]).as_posix() for r in rows] == \
        [f"{c}/{i}.png" for c in CLASSES for i in range(3)]
    got = np.asarray([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(got, proba, rtol=1e-5, atol=1e-6)
    assert [r["label"] for r in rows] == classes[proba.argmax(1)].tolist()

    again = runner.invoke(app, ["predict", "--model", str(trained["model"]), str(trained["test"]), "--out", str(out)])
    one_line_error(again, str(out), "--force")
    forced = runner.invoke(app, ["predict", "--model", str(trained["model"]), str(trained["test"] / "bee" / "0.png"),
                                 "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert out.read_text().splitlines() == ["path,label", f"{trained['test'] / 'bee' / '0.png'},{rows[3]['label']}"]


def test_predict_prints_csv_and_searches_folders_recursively(trained, tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "x.png").write_bytes((trained["test"] / "cat" / "1.png").read_bytes())
    (tmp_path / "a" / "readme.txt").write_text("not an image, and not named on the command line")
    single = trained["test"] / "ant" / "2.png"
    result = runner.invoke(app, ["predict", "--model", str(trained["model"]), str(tmp_path / "a"), str(single)])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "label"]
    assert [r[0] for r in rows[1:]] == [str(nested / "x.png"), str(single)]
    assert all(r[1] in CLASSES for r in rows[1:])


def test_predict_names_files_that_are_not_images(trained, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    one_line_error(runner.invoke(app, ["predict", "--model", str(trained["model"]), str(text)]),
                   str(text), "not an image")
    fake = tmp_path / "fake.png"
    fake.write_text("not really a png")
    one_line_error(runner.invoke(app, ["predict", "--model", str(trained["model"]), str(fake)]),
                   str(fake), "not an image")
    one_line_error(runner.invoke(app, ["predict", "--model", str(trained["prior"]), str(fake)]),
                   str(trained["prior"]), "prior file, not a fine-tuned model")
    nowhere = tmp_path / "missing" / "preds.csv"
    one_line_error(runner.invoke(app, ["predict", "--model", str(trained["model"]), str(trained["test"]),
                                       "--out", str(nowhere)]), str(tmp_path / "missing"), "does not exist")


def test_predict_resizes_to_the_models_input_size(trained, tmp_path):
    big = tmp_path / "big.png"
    Image.open(trained["test"] / "cat" / "0.png").resize((16, 16), Image.BILINEAR).save(big)
    result = runner.invoke(app, ["predict", "--model", str(trained["model"]), str(big),
                                 str(trained["test"] / "cat" / "0.png")])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 3


def _numpy_metrics(proba: np.ndarray, y: np.ndarray, n_bins: int) -> dict[str, float]:
    """Accuracy, NLL, Brier and ECE written out with numpy, as the reference."""
    n = len(y)
    onehot = np.eye(proba.shape[1])[y]
    conf, pred = proba.max(1), proba.argmax(1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.sum() / n * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return {"accuracy": float((pred == y).mean()), "nll": float(-np.log(proba[np.arange(n), y]).mean()),
            "brier": float(((proba - onehot) ** 2).sum(1).mean()), "ece": ece}


def test_evaluate_json_matches_numpy(trained, tmp_path):
    diagram = tmp_path / "rel.png"
    result = runner.invoke(app, ["evaluate", "--model", str(trained["model"]), "--data", str(trained["test"]),
                                 "--json", "--bins", "5", "--reliability-diagram", str(diagram)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    proba, y, _ = reference_proba(trained["model"], trained["test"])
    expected = _numpy_metrics(proba, y, 5)
    for key, value in expected.items():
        assert info[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert info["n_images"] == 9 and info["bins"] == 5 and info["classes"] == list(CLASSES)
    assert diagram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line_error(runner.invoke(app, ["evaluate", "--model", str(trained["model"]), "--data", str(trained["test"]),
                                       "--reliability-diagram", str(diagram)]), str(diagram), "--force")

    table = runner.invoke(app, ["evaluate", "--model", str(trained["model"]), "--data", str(trained["test"])])
    assert table.exit_code == 0 and f"{expected['accuracy']:.4f}" in table.stdout


def test_predict_and_evaluate_refuse_a_segmentation_model(trained, tmp_path):
    from sklearn_bayes_transfer.modelfile import save_model
    from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter

    X = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    seg = PriorRegularizedSegmenter(Prior.load(trained["prior"]), max_epochs=1, verbose=0)
    path = save_model(seg.fit(X, (X > 0.5).astype(np.int64)), tmp_path / "seg.pt")
    for args in (["predict", "--model", str(path), str(trained["test"])],
                 ["evaluate", "--model", str(path), "--data", str(trained["test"])]):
        one_line_error(runner.invoke(app, args), str(path), "PriorRegularizedSegmenter")


def test_evaluate_refuses_classes_the_model_does_not_know(trained, tmp_path):
    data = write_folder(tmp_path / "data", 2, classes=("ant", "dog"))
    one_line_error(runner.invoke(app, ["evaluate", "--model", str(trained["model"]), "--data", str(data)]),
                   "'dog'", str(data), "ant, bee, cat")


# -- finetune options --------------------------------------------------------------------------------------
def test_validation_split_progress_and_optimizers(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "data")
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out",
                                 str(tmp_path / "m.pt"), "--max-epochs", "2", "--valid-fraction", "0.34"])
    assert result.exit_code == 0, result.output
    assert "valid_acc" in result.stdout and "train_acc" in result.stdout  # the per-epoch table
    assert "valid accuracy" in result.stdout and "train accuracy" in result.stdout
    for name in ("adam", "fop"):
        out = tmp_path / f"{name}.pt"
        result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out", str(out),
                                     "--optimizer", name, "--prior-structure", "diag", *FAST])
        assert result.exit_code == 0, result.output
        assert torch.load(out, weights_only=True)["meta"]["optimizer"].endswith(
            {"adam": "Adam", "fop": "FOP"}[name])


def test_swag_inference_with_validation(tmp_path):
    """Posterior samples are collected, stored in the model file, and used by predict."""
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "data")
    out = tmp_path / "swag.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out", str(out),
                                 "--inference", "swag", "--samples", "3", "--valid-fraction", "0.34",
                                 "--max-epochs", "4", "--lr", "0.05", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "valid accuracy" in result.stdout
    assert torch.load(out, weights_only=True)["samples"]["samples"].shape[0] == 3
    predicted = runner.invoke(app, ["predict", "--model", str(out), str(data / "bee"), "--proba"])
    assert predicted.exit_code == 0, predicted.output
    rows = list(csv.DictReader(io.StringIO(predicted.stdout)))
    X, _ = load_image_folder(data / "bee", labeled=False)
    expected = load_model(out).predict_proba(X)
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], expected, rtol=1e-5, atol=1e-6)


def test_accuracy_during_fit_reads_class_indices(trained):
    """The train/valid accuracy callbacks get class indices from skorch and compare them correctly."""
    from sklearn_bayes_transfer.classifier import index_accuracy

    estimator = load_model(trained["model"])
    X, y = load_image_folder(trained["test"], image_size=(8, 8), channels=1)
    codes = np.searchsorted(estimator.classes_, y)
    Xt = estimator._prepare_X(X)
    predicted = estimator.predict(X)
    for targets in (codes, (codes + 1) % 3):  # the true classes, and wrong ones
        expected = float(np.mean(predicted == estimator.classes_[targets]))
        assert index_accuracy(estimator, Xt, torch.as_tensor(targets)) == pytest.approx(expected)


def test_same_seed_same_model_and_force(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "data")
    out = tmp_path / "m.pt"
    args = ["finetune", "--prior", str(prior), "--data", str(data), "--out", str(out), "--random-state", "3", *FAST]
    assert runner.invoke(app, args).exit_code == 0
    first = torch.load(out, weights_only=True)["state_dict"]
    before = out.read_bytes()
    # Refused before any training: the file is untouched.
    one_line_error(runner.invoke(app, args), str(out), "--force")
    assert out.read_bytes() == before
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    second = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert runner.invoke(app, [*args[:-len(FAST)], *FAST, "--force", "--random-state", "4"]).exit_code == 0
    third = torch.load(out, weights_only=True)["state_dict"]
    assert not torch.equal(first["head.weight"], third["head.weight"])


def test_mixed_sizes_resized_to_the_priors_image_size(tmp_path):
    data = write_folder(tmp_path / "data")
    Image.open(data / "ant" / "0.png").resize((12, 10)).save(data / "ant" / "0.png")
    with_size = write_prior(tmp_path / "sized.pt")
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(with_size), "--data", str(data), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output

    without = write_prior(tmp_path / "plain.pt", with_preprocess=False)
    result = runner.invoke(app, ["finetune", "--prior", str(without), "--data", str(data), "--out",
                                 str(tmp_path / "m2.pt"), *FAST])
    one_line_error(result, "different sizes", "--image-size")
    result = runner.invoke(app, ["finetune", "--prior", str(without), "--data", str(data), "--out",
                                 str(tmp_path / "m2.pt"), "--image-size", "6x7", *FAST])
    assert result.exit_code == 0, result.output
    loaded = load_model(tmp_path / "m2.pt")
    assert loaded.input_shape_ == (1, 6, 7)
    # Without a recorded preprocessing the statistics are fitted on the (resized) training images.
    X, _ = load_image_folder(data, image_size=(6, 7))
    assert loaded.preprocess_.mean[0] == pytest.approx(X.mean(), rel=1e-5)


def test_image_size_overrides_the_priors(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "data")
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out", str(out),
                                 "--image-size", "6", *FAST])
    assert result.exit_code == 0, result.output
    pre = load_model(out).preprocess_
    assert pre.image_size == (6, 6) and pre.mean == (0.5,) and pre.std == (0.25,)


# -- finetune errors: one line, exit code 1 -----------------------------------------------------------------
@pytest.fixture
def folders(tmp_path):
    return {"prior": write_prior(tmp_path / "prior.pt"), "data": write_folder(tmp_path / "data"),
            "out": tmp_path / "model.pt", "tmp": tmp_path}


def _finetune(folders, *extra, prior=None, data=None):
    return runner.invoke(app, ["finetune", "--prior", str(prior or folders["prior"]), "--data",
                               str(data or folders["data"]), "--out", str(folders["out"]), *FAST, *extra])


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_prior_scale_must_be_positive(folders, value):
    one_line_error(_finetune(folders, "--prior-scale", value), "--prior-scale", "> 0")
    assert not folders["out"].exists()


@pytest.mark.parametrize("args, needles", [
    (["--prior-scale", "big"], ["--prior-scale", "'big'", "auto"]),
    (["--warmup", "1.5"], ["--warmup", "< 1"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--early-stopping", "3"], ["--early-stopping", "--valid-fraction"]),
])
def test_recipe_options_are_checked_by_name(folders, args, needles):
    one_line_error(_finetune(folders, *args), *needles)
    assert not folders["out"].exists()


def test_recipe_options_reach_the_estimator(folders):
    result = _finetune(folders, "--augment", "none", "--lr-schedule", "constant", "--batchnorm", "running",
                       "--warmup", "0.2", "--prior-scale", "3e3", "--valid-fraction", "0.34", "--early-stopping", "2")
    assert result.exit_code == 0, result.output
    estimator = load_model(folders["out"])
    params = estimator.get_params()
    assert (params["augment"], params["lr_schedule"], params["batchnorm"], params["warmup"]) == \
        ("none", "constant", "running", 0.2)
    assert estimator.prior_scale_ == 3e3 and params["prior_scale"] == 3e3


def test_bad_prior_files(folders):
    tmp = folders["tmp"]
    one_line_error(_finetune(folders, prior=tmp / "absent.pt"), str(tmp / "absent.pt"), "does not exist")
    text = tmp / "prior.txt"
    text.write_text("not a prior")
    one_line_error(_finetune(folders, prior=text), str(text))
    # A prior whose recorded architecture is not the one its weights come from.
    torch.manual_seed(0)
    wrong = Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01,
                              meta={"backbone_kwargs": {"width": 8}, "preprocess": PREPROCESS}).save(tmp / "wrong.pt")
    one_line_error(_finetune(folders, prior=wrong), "does not fit")
    # A prior over a user's own module cannot rebuild its backbone from a name.
    mine = Prior.from_module(torch.nn.Conv2d(1, 2, 3), variance=0.01).save(tmp / "mine.pt")
    one_line_error(_finetune(folders, prior=mine), "not a registered backbone")
    assert not folders["out"].exists()


def test_bad_data_folders(folders):
    tmp = folders["tmp"]
    empty = tmp / "empty"
    empty.mkdir()
    one_line_error(_finetune(folders, data=empty), str(empty), "no images")
    one_line_error(_finetune(folders, data=tmp / "nowhere"), str(tmp / "nowhere"), "does not exist")
    bad = folders["data"] / "bee" / "broken.png"
    bad.write_text("plain text with a .png name")
    one_line_error(_finetune(folders), str(bad), "not an image")
    assert not folders["out"].exists()


def test_valid_fraction_needs_two_examples_per_class(folders, tmp_path):
    data = write_folder(tmp_path / "few", 6, classes=("ant", "bee"))
    (data / "cat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "cat" / "only.png")
    one_line_error(_finetune(folders, "--valid-fraction", "0.3", data=data), "'cat'", "--valid-fraction")
    one_line_error(_finetune(folders, "--valid-fraction", "0.05"), "--valid-fraction 0.05", "one per class")
    one_line_error(_finetune(folders, "--valid-fraction", "1"), "--valid-fraction", "< 1")
    assert not folders["out"].exists()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("finetune", "predict", "evaluate"):
        assert command in result.stdout
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.stdout


def test_early_stopping_that_fires_writes_the_model(folders):
    # A learning rate this high makes the validation loss rise at once: EarlyStopping ends the fit.
    result = _finetune(folders, "--valid-fraction", "0.34", "--early-stopping", "1", "--lr", "2", "--max-epochs", "60",
                       "--lr-schedule", "constant")
    assert result.exit_code == 0, result.output  # not "interrupted": EarlyStopping stops skorch with Ctrl-C's exception
    assert folders["out"].exists() and "wrote" in result.stdout and " 60 epochs" not in result.stdout
