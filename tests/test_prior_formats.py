"""Prior files in both formats (torch and safetensors): round trips, detection by content, refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import make_random_prior, one_line_error
from safetensors.torch import save_file
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import ConfigError, Prior, PriorFormatError

runner = CliRunner()


@pytest.fixture
def prior() -> Prior:
    buffers = {"bn.running_mean": torch.randn(3), "bn.running_var": torch.rand(3) + 0.5,
               "bn.num_batches_tracked": torch.tensor(7)}
    return make_random_prior(factor_dtype=torch.bfloat16, buffers=buffers, meta={"note": "héllo", "n": [1, 2.5]})


def assert_same(a: Prior, b: Prior) -> None:
    for x, y in ((a.mean, b.mean), (a.variance, b.variance), (a.factor, b.factor)):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert a.names == b.names and a.shapes == b.shapes and a.meta == b.meta
    assert a.buffers.keys() == b.buffers.keys()
    assert all(torch.equal(a.buffers[k], b.buffers[k]) and a.buffers[k].dtype == b.buffers[k].dtype for k in a.buffers)
    assert a.digest() == b.digest()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trips_are_bit_identical(prior, tmp_path, suffix):
    path = prior.save(tmp_path / f"p{suffix}")
    assert_same(Prior.load(path), prior)


def test_format_is_read_by_content_not_name(prior, tmp_path):
    as_safetensors = prior.save(tmp_path / "really_safetensors.pt", file_format="safetensors")
    as_torch = prior.save(tmp_path / "really_torch.safetensors", file_format="torch")
    assert as_safetensors.read_bytes()[8:9] == b"{" and as_torch.read_bytes()[:2] == b"PK"
    assert_same(Prior.load(as_safetensors), Prior.load(as_torch))
    with pytest.raises(ConfigError, match="file_format"):
        prior.save(tmp_path / "x", file_format="onnx")


def test_safetensors_loading_maps_the_file(prior, tmp_path):
    path = prior.save(tmp_path / "p.safetensors")
    loaded = Prior.load(path)
    # Views of one mapping of the file: no tensor owns a private copy of its bytes.
    storages = {t.untyped_storage().data_ptr() for t in (loaded.mean, loaded.variance, loaded.factor)}
    assert len(storages) == 1 and loaded.mean.untyped_storage().nbytes() == path.stat().st_size


def _forge(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(("case", "needle"), [
    ("truncated", "truncated"),
    ("garbled header", "not JSON"),
    ("absurd header length", "header length"),
    ("future version", "version 99"),
    ("not a prior", "not a sklearn-bayes-transfer prior"),
    ("range beyond the data", "do not hold"),
    ("edited tensor", "digest"),
])
def test_broken_safetensors_priors_are_refused_naming_the_file(prior, tmp_path, case, needle):
    good = prior.save(tmp_path / "good.safetensors")
    content = good.read_bytes()
    path = tmp_path / f"{case}.safetensors"
    if case == "truncated":
        path.write_bytes(content[:-100])
    elif case == "garbled header":
        path.write_bytes(content[:8] + b"{" + b"\xff" * 20 + content[29:])
    elif case == "absurd header length":
        path.write_bytes(struct.pack("<Q", 10**15) + content[8:])
    elif case in ("future version", "edited tensor"):
        loaded = Prior.load(good)
        tensors = {"mean": loaded.mean, "variance": loaded.variance * (2 if case == "edited tensor" else 1),
                   "factor": loaded.factor, **{f"buffers/{k}": v for k, v in loaded.buffers.items()}}
        n = struct.unpack("<Q", content[:8])[0]
        metadata = json.loads(content[8:8 + n])["__metadata__"]
        if case == "future version":
            metadata["version"] = "99"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    elif case == "not a prior":
        save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    else:
        _forge(path, {"mean": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\x00" * 16)
    with pytest.raises(PriorFormatError) as info:
        Prior.load(path)
    assert str(path) in str(info.value) and needle in str(info.value)
    one_line_error(runner.invoke(app, ["inspect", str(path), "--verify"]), str(path))


def test_convert_between_formats_and_inspect(prior, tmp_path):
    source = prior.save(tmp_path / "p.pt")
    out = tmp_path / "p.safetensors"
    result = runner.invoke(app, ["convert", str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert prior.digest()[:12] in result.stdout
    assert_same(Prior.load(out), prior)
    back = tmp_path / "back.pt"
    assert runner.invoke(app, ["convert", str(out), str(back)]).exit_code == 0
    assert_same(Prior.load(back), prior)
    result = runner.invoke(app, ["inspect", str(out), "--verify", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["digest"] == "verified"
    one_line_error(runner.invoke(app, ["convert", str(source), str(out)]), "--force")
    one_line_error(runner.invoke(app, ["convert", str(source), str(source), "--force"]), "input file")


# -- model files ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from conftest import write_prior

    from sklearn_bayes_transfer import PriorRegularizedClassifier
    from sklearn_bayes_transfer.datasets import load_digits_images

    folder = tmp_path_factory.mktemp("model")
    X, y = load_digits_images()
    clf = PriorRegularizedClassifier(str(write_prior(folder / "prior.pt")), max_epochs=4, verbose=0, random_state=0,
                                     inference="swag", n_samples=2)
    return clf.fit(X[:80], y[:80]), X[:80]


def test_model_files_in_both_formats_hold_the_same_model(fitted, tmp_path):
    import numpy as np

    from sklearn_bayes_transfer import load_model, save_model
    from sklearn_bayes_transfer.modelfile import _read_payload, convert_model, model_summary

    clf, X = fitted
    torch_file = save_model(clf, tmp_path / "m.pt")
    st_file = save_model(clf, tmp_path / "m.safetensors")
    with open(st_file, "rb") as f:
        assert f.read(9)[8:9] == b"{"  # a safetensors file, no pickle
    for path in (torch_file, st_file):
        np.testing.assert_array_equal(load_model(path).predict_proba(X), clf.predict_proba(X))  # samples included
    assert model_summary(st_file)["hyperparameters"] == model_summary(torch_file)["hyperparameters"]
    back = convert_model(st_file, tmp_path / "back.pt")
    a, b = _read_payload(torch_file), _read_payload(back)
    assert a.keys() == b.keys() and a["fitted"] == b["fitted"] and a["meta"] == b["meta"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key])
    # The command converts model files too, and a model file is told apart from a prior by content.
    shown = runner.invoke(app, ["inspect", str(st_file)])
    assert shown.exit_code == 0 and "PriorRegularizedClassifier" in shown.stdout, shown.output
    result = runner.invoke(app, ["convert", str(torch_file), str(tmp_path / "c.safetensors")])
    assert result.exit_code == 0 and "model file" in result.stdout, result.output
    np.testing.assert_array_equal(load_model(tmp_path / "c.safetensors").predict_proba(X), clf.predict_proba(X))


def test_broken_safetensors_model_files_are_refused(fitted, prior, tmp_path):
    from sklearn_bayes_transfer import ModelFileError, load_model, save_model

    clf, _ = fitted
    path = save_model(clf, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"cut.safetensors' is not a valid safetensors file.*truncated"):
        load_model(tmp_path / "cut.safetensors")
    prior.save(tmp_path / "p.safetensors")
    with pytest.raises(ModelFileError, match="this is a prior file, not a fine-tuned model"):
        load_model(tmp_path / "p.safetensors")
    _forge(tmp_path / "forged.safetensors", {"__metadata__": {"format": "sklearn-bayes-transfer/model",
                                                              "payload": "{not json"}})
    with pytest.raises(ModelFileError, match="forged.safetensors': its safetensors header lacks or garbles"):
        load_model(tmp_path / "forged.safetensors")
