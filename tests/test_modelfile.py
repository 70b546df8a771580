"""Model files: a fitted estimator saved as tensors and plain containers, and read back safely."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_bayes_transfer import OutputExistsError, Prior, PriorFormatError
from sklearn_bayes_transfer.backbones import BackboneWithHead, get_backbone
from sklearn_bayes_transfer.classifier import PriorRegularizedClassifier
from sklearn_bayes_transfer.data import Preprocess
from sklearn_bayes_transfer.modelfile import (
    MODEL_FORMAT_NAME,
    MODEL_FORMAT_VERSION,
    ModelFileError,
    load_model,
    save_model,
)

PREPROCESS = {"image_size": [8, 8], "channels": 1, "mean": [0.4], "std": [0.3]}




class _TouchOnUnpickle:
    """Unpickling this object would create ``marker``: a stand-in for code a malicious file runs."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _data(labels, n_per_class=6, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(0.2 + 0.3 * k, 0.1, (n_per_class, 8, 8)) for k in range(len(labels))])
    y = np.repeat(np.asarray(labels), n_per_class)
    return X.astype(np.float32), y


def _prior(width=4, meta=None):
    torch.manual_seed(1)
    return Prior.from_module(get_backbone("small_cnn", width=width), variance=0.01,
                             meta={"preprocess": PREPROCESS, **(meta or {})})


@pytest.fixture(scope="module")
def fitted():
    X, y = _data(["cat", "dog", "eel"])
    torch.manual_seed(0)
    clf = PriorRegularizedClassifier(_prior(), max_epochs=3, lr=0.05, batch_size=8, prior_scale=10.0,
                                     prior_eps=1e-4, head_weight_decay=0.5, verbose=0,
                                     iterator_train__shuffle=True, optimizer__momentum=0.9)
    return clf.fit(X, y), X, y


def test_round_trip_predicts_identically(fitted, tmp_path):
    clf, X, y = fitted
    path = save_model(clf, tmp_path / "model.pt")
    assert path == tmp_path / "model.pt"
    loaded = load_model(path)
    assert type(loaded) is PriorRegularizedClassifier and loaded.prior is None and loaded.prior_ is None
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
    assert loaded.classes_.tolist() == ["cat", "dog", "eel"] and loaded.classes_.dtype.kind == "U"
    assert loaded.score(X, y) == clf.score(X, y)
    assert loaded.preprocess_ == Preprocess.from_meta(PREPROCESS)
    assert loaded.input_shape_ == clf.input_shape_ == (1, 8, 8) and loaded.n_train_ == clf.n_train_ == 18
    params = loaded.get_params()
    assert (params["prior_scale"], params["prior_eps"], params["head_weight_decay"]) == (10.0, 1e-4, 0.5)
    assert (params["lr"], params["max_epochs"], params["batch_size"]) == (0.05, 3, 8)
    # Weights and BatchNorm statistics are the fitted ones, not a fresh initialisation.
    fresh = BackboneWithHead(get_backbone("small_cnn", width=4), nn.Linear(16, 3)).state_dict()
    for name, value in clf.module_.state_dict().items():
        torch.testing.assert_close(loaded.module_.state_dict()[name], value, rtol=0, atol=0)
        if name.endswith("running_var"):
            assert not torch.equal(value, fresh[name]), "premise: fitting moved the BatchNorm statistics"


def test_payload_is_plain_and_documented(fitted, tmp_path):
    clf, _, _ = fitted
    payload = torch.load(save_model(clf, tmp_path / "model.pt"), weights_only=True)
    assert payload["format"] == MODEL_FORMAT_NAME == "sklearn-bayes-transfer/model"
    assert payload["version"] == MODEL_FORMAT_VERSION == 1
    assert payload["estimator"] == "PriorRegularizedClassifier"
    assert payload["backbone"] == {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}}
    assert payload["head"] == {"kind": "linear", "in_features": 16, "out_features": 3, "bias": True}
    assert payload["classes"] == ["cat", "dog", "eel"] and all(type(c) is str for c in payload["classes"])
    assert payload["preprocess"] == PREPROCESS
    assert payload["samples"] is None
    assert set(payload["state_dict"]) == set(clf.module_.state_dict())
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())
    hyper = payload["hyperparameters"]
    assert hyper["prior_structure"] == "lowrank" and hyper["optimizer__momentum"] == 0.9
    assert "prior" not in hyper and "module" not in hyper and "device" not in hyper
    assert payload["meta"]["optimizer"] == "torch.optim.sgd.SGD"
    assert payload["meta"]["prior"]["backbone"] == "small_cnn"


def test_integer_labels_round_trip(tmp_path):
    X, y = _data([3, 7])
    torch.manual_seed(0)
    clf = PriorRegularizedClassifier(_prior(), max_epochs=2, verbose=0).fit(X, y.astype(np.int16))
    loaded = load_model(save_model(clf, tmp_path / "m.pt"))
    assert loaded.classes_.tolist() == [3, 7] and loaded.classes_.dtype.kind == "i"
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))


def test_overwrite_false_refuses(fitted, tmp_path):
    clf, _, _ = fitted
    path = tmp_path / "model.pt"
    path.write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_model(clf, path, overwrite=False)
    assert path.read_bytes() == b"keep"


def test_unfitted_and_user_modules_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="not fitted"):
        save_model(PriorRegularizedClassifier(_prior()), tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match="not fitted"):  # initialised, but no classes learned
        save_model(PriorRegularizedClassifier(module=nn.Linear(64, 2)).initialize(), tmp_path / "m.pt")
    X, y = _data([0, 1])
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    clf = PriorRegularizedClassifier(module=net, max_epochs=1, verbose=0).fit(X, y)
    with pytest.raises(ModelFileError, match="pickle"):
        save_model(clf, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_head_protocol(monkeypatch, tmp_path):
    """A head that is not a bare Linear needs the estimator's head_spec / head_from_spec."""
    def build_head(self, backbone):
        return nn.Sequential(nn.Linear(backbone.feature_dim, 5), nn.Tanh(), nn.Linear(5, len(self.classes_)))

    monkeypatch.setattr(PriorRegularizedClassifier, "_build_head", build_head)
    X, y = _data(["a", "b"])
    torch.manual_seed(0)
    clf = PriorRegularizedClassifier(_prior(), max_epochs=2, verbose=0).fit(X, y)
    with pytest.raises(ModelFileError, match="Sequential head"):
        save_model(clf, tmp_path / "m.pt")

    def head_spec(self):
        return {"kind": "mlp", "in_features": 16, "hidden": 5, "out_features": len(self.classes_)}

    def build_from_spec(cls, spec, backbone):
        assert backbone.feature_dim == spec["in_features"]
        return nn.Sequential(nn.Linear(spec["in_features"], spec["hidden"]), nn.Tanh(),
                             nn.Linear(spec["hidden"], spec["out_features"]))

    monkeypatch.setattr(PriorRegularizedClassifier, "head_spec", head_spec)
    monkeypatch.setattr(PriorRegularizedClassifier, "head_from_spec", classmethod(build_from_spec))
    path = save_model(clf, tmp_path / "m.pt")
    assert torch.load(path, weights_only=True)["head"]["kind"] == "mlp"
    np.testing.assert_array_equal(load_model(path).predict_proba(X), clf.predict_proba(X))


def test_extras_protocol(monkeypatch, fitted, tmp_path):
    """Posterior samples travel as tensors through posterior_state / load_posterior_state."""
    clf, _, _ = fitted
    samples = torch.randn(4, 7)
    monkeypatch.setattr(PriorRegularizedClassifier, "posterior_state",
                        lambda self: {"samples": samples, "n_samples": np.int64(4)})
    path = save_model(clf, tmp_path / "m.pt")
    restored = {}
    monkeypatch.setattr(PriorRegularizedClassifier, "load_posterior_state",
                        lambda self, extras: restored.update(extras))
    load_model(path)
    assert restored["n_samples"] == 4 and type(restored["n_samples"]) is int
    torch.testing.assert_close(restored["samples"], samples, rtol=0, atol=0)

    monkeypatch.setattr(PriorRegularizedClassifier, "posterior_state", lambda self: {"callback": print})
    with pytest.raises(ModelFileError, match="builtin_function_or_method"):
        save_model(clf, tmp_path / "bad.pt")


def test_swag_samples_round_trip(tmp_path):
    """Bayesian model averaging predicts the same after loading: the samples travel in the file."""
    X, y = _data(["a", "b"], n_per_class=4)
    torch.manual_seed(0)
    clf = PriorRegularizedClassifier(_prior(), max_epochs=4, lr=0.05, inference="swag", n_samples=3,
                                     random_state=0, verbose=0).fit(X, y)
    path = save_model(clf, tmp_path / "swag.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["samples"]["samples"].shape == clf.samples_.shape
    loaded = load_model(path)
    torch.testing.assert_close(loaded.samples_, clf.samples_, rtol=0, atol=0)
    np.testing.assert_allclose(loaded.predict_proba(X), clf.predict_proba(X), rtol=0, atol=1e-6)
    # Averaging over the samples differs from the MAP weights' prediction (so the check above has teeth).
    single = load_model(path)
    single.set_params(inference="map")
    assert not np.allclose(single.predict_proba(X), clf.predict_proba(X), atol=1e-6)
    # Samples kept on a GPU where the file was written follow the network to the CPU here.
    payload["hyperparameters"]["inference_device"] = "cuda:0"
    torch.save(payload, tmp_path / "from_gpu.pt")
    moved = load_model(tmp_path / "from_gpu.pt", device="cpu")
    assert moved.inference_device == "cpu" and moved.samples_.device.type == "cpu"
    np.testing.assert_allclose(moved.predict_proba(X), clf.predict_proba(X), rtol=0, atol=1e-6)


def test_segmenter_round_trip(tmp_path):
    from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter

    rng = np.random.default_rng(0)
    X = rng.random((4, 8, 8)).astype(np.float32)
    masks = (X > 0.5).astype(np.int64) * 7
    torch.manual_seed(0)
    seg = PriorRegularizedSegmenter(_prior(), max_epochs=1, verbose=0).fit(X, masks)
    path = save_model(seg, tmp_path / "seg.pt")
    assert torch.load(path, weights_only=True)["estimator"] == "PriorRegularizedSegmenter"
    loaded = load_model(path)
    assert type(loaded) is PriorRegularizedSegmenter and loaded.classes_.tolist() == [0, 7]
    np.testing.assert_array_equal(loaded.predict_proba(X), seg.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), seg.predict(X))


def test_pickle_bomb_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": MODEL_FORMAT_NAME, "version": 1, "payload": _TouchOnUnpickle(marker)}, path)
    with pytest.raises(ModelFileError, match="refused") as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def _edited(fitted, tmp_path, **changes):
    clf, _, _ = fitted
    payload = torch.load(save_model(clf, tmp_path / "base.pt"), weights_only=True)
    payload.update(changes)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"version": 2}, "version 2 is not supported"),
    ({"format": "something-else"}, "not a sklearn-bayes-transfer model file"),
    ({"estimator": "os.system"}, "estimator 'os.system' is not one"),
    ({"classes": "cat"}, "'classes' has the wrong type"),
    ({"backbone": {"backbone": "no_such_net", "backbone_kwargs": {}}}, "not a registered backbone"),
    ({"head": {"kind": "linear", "in_features": 16, "out_features": 5, "bias": True}},
     r"shape mismatch.*head.weight: network \(5, 16\) vs file \(3, 16\)"),
    ({"head": {"kind": "conv"}}, "head kind 'conv' is not known"),
    ({"state_dict": {"head.weight": torch.zeros(3, 16)}}, "tensors .*missing"),
])
def test_malformed_files_fail_with_the_file_named(fitted, tmp_path, changes, message):
    path = _edited(fitted, tmp_path, **changes)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, PriorFormatError)


def test_missing_key_and_unknown_hyperparameter(fitted, tmp_path):
    clf, X, _ = fitted
    payload = torch.load(save_model(clf, tmp_path / "base.pt"), weights_only=True)
    del payload["state_dict"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(ModelFileError, match="missing key 'state_dict'"):
        load_model(tmp_path / "missing.pt")
    payload = torch.load(tmp_path / "base.pt", weights_only=True)
    payload["hyperparameters"]["from_the_future"] = 3
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.warns(UserWarning, match="from_the_future=3 is unknown"):
        loaded = load_model(tmp_path / "newer.pt")
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_other_files_are_not_model_files(tmp_path):
    prior_path = _prior().save(tmp_path / "prior.pt")
    with pytest.raises(ModelFileError, match="prior file, not a fine-tuned model"):
        load_model(prior_path)
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01 not torch")
    with pytest.raises(ModelFileError, match="not a file written by torch.save"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "absent.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="expected a dict"):
        load_model(tmp_path / "list.pt")

