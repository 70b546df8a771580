"""Prior: file round trips, sharing semantics, reductions, the official import and bad input."""

from __future__ import annotations

import copy
import math
import os
import pathlib
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, clone
from torch import nn

from sklearn_bayes_transfer import (
    ConfigError,
    OutputExistsError,
    Prior,
    PriorFormatError,
    PriorMismatchError,
)
from sklearn_bayes_transfer.prior import (
    FORMAT_NAME,
    FORMAT_VERSION,
    named_parameters_for,
)


def assert_same_prior(a: Prior, b: Prior) -> None:
    """Bit-exact equality of every tensor, and equal names, shapes, buffers and metadata."""
    for name in ("mean", "variance", "factor"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    assert a.names == b.names and a.shapes == b.shapes
    assert a.buffers.keys() == b.buffers.keys()
    for key in a.buffers:
        assert a.buffers[key].dtype == b.buffers[key].dtype and torch.equal(a.buffers[key], b.buffers[key]), key
    assert a.meta == b.meta


@pytest.fixture
def prior_with_buffers(random_prior) -> Prior:
    buffers = {"bn.running_mean": torch.randn(4), "bn.running_var": torch.rand(4) + 0.5,
               "bn.num_batches_tracked": torch.tensor(17)}
    meta = {"backbone_kwargs": {"width": 4, "small_input": True}, "n_snapshots": 30, "var_clamp": 1e-8,
            "preprocess": {"image_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25]}}
    return random_prior(rank=4, seed=1, buffers=buffers, meta=meta)


# -- files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip_is_bit_exact(prior_with_buffers, tmp_path, factor_dtype, mmap):
    prior = prior_with_buffers.with_factor_dtype(factor_dtype)
    path = prior.save(tmp_path / "prior.pt")
    loaded = Prior.load(path, mmap=mmap)
    assert loaded.factor_dtype == getattr(torch, factor_dtype)
    assert_same_prior(prior, loaded)
    assert sorted(os.listdir(tmp_path)) == ["prior.pt"]  # no temporary file left behind


def test_file_is_plain_version_1_payload(prior_with_buffers, tmp_path):
    path = prior_with_buffers.save(tmp_path / "prior.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT_NAME and payload["version"] == FORMAT_VERSION == 1
    assert set(payload) == {"format", "version", "names", "shapes", "mean", "variance", "factor", "buffers", "meta",
                            "digest"}
    assert payload["digest"] == prior_with_buffers.digest()
    assert payload["shapes"] == [list(s) for s in prior_with_buffers.shapes]


def test_save_refuses_to_overwrite_when_asked(random_prior, tmp_path):
    path = tmp_path / "prior.pt"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="prior.pt"):
        random_prior().save(path, overwrite=False)
    assert path.read_bytes() == b"keep me"
    random_prior().save(path)  # overwrite=True is the default
    assert Prior.load(path).n_params == random_prior().n_params


def test_deepcopy_copy_and_clone_share_the_prior(random_prior):
    prior = random_prior()
    assert copy.deepcopy(prior) is prior
    assert copy.copy(prior) is prior

    class Holder(BaseEstimator):
        def __init__(self, prior=None, alpha=1.0):
            self.prior = prior
            self.alpha = alpha

    est = Holder(prior=prior, alpha=0.5)
    cloned = clone(est)
    assert cloned is not est and cloned.prior is prior and cloned.alpha == 0.5
    assert clone(est.set_params(alpha=2.0)).prior is prior


def test_pickle_round_trip(prior_with_buffers):
    restored = pickle.loads(pickle.dumps(prior_with_buffers))
    assert isinstance(restored, Prior) and restored is not prior_with_buffers
    assert_same_prior(prior_with_buffers, restored)
    assert repr(restored) == repr(prior_with_buffers)


def test_views_do_not_leak_mutation(prior_with_buffers):
    meta = prior_with_buffers.meta
    meta["preprocess"]["channels"] = 3
    meta["new"] = 1
    buffers = prior_with_buffers.buffers
    buffers.pop("bn.running_mean")
    assert prior_with_buffers.meta["preprocess"]["channels"] == 1 and "new" not in prior_with_buffers.meta
    assert "bn.running_mean" in prior_with_buffers.buffers


# -- derived quantities ------------------------------------------------------------------------------
def test_covariance_and_marginal_variance(random_prior):
    prior = random_prior(rank=3, seed=4)
    var, f = prior.variance.double().numpy(), prior.factor.double().numpy()
    np.testing.assert_allclose(prior.covariance().numpy(), np.diag(var) + f.T @ f, rtol=1e-12)
    np.testing.assert_allclose(prior.marginal_variance().numpy(), var + (f ** 2).sum(0), rtol=1e-6)


def test_reduce(random_prior):
    prior = random_prior(rank=3, seed=4)
    assert prior.reduce("lowrank") is prior
    diag = prior.reduce("diag")
    assert diag.rank == 0 and torch.equal(diag.variance, prior.variance) and torch.equal(diag.mean, prior.mean)
    iso = prior.reduce("isotropic")
    level = (prior.variance.double().numpy() + (prior.factor.double().numpy() ** 2).sum(0)).mean()
    assert iso.rank == 0 and torch.equal(iso.mean, prior.mean)
    np.testing.assert_allclose(iso.variance.numpy(), np.full(prior.n_params, level), rtol=1e-6)
    assert prior.rank == 3  # reductions return new objects


def test_reduce_unknown_structure_lists_allowed_values(random_prior):
    with pytest.raises(ConfigError) as err:
        random_prior().reduce("full-rank")
    msg = str(err.value)
    assert "'full-rank'" in msg and all(f"'{s}'" in msg for s in ("lowrank", "diag", "isotropic", "none"))
    with pytest.raises(ConfigError, match="none"):
        random_prior().reduce("none")


def test_with_factor_dtype_validates(random_prior):
    prior = random_prior()
    assert prior.with_factor_dtype(torch.float32) is prior
    assert prior.with_factor_dtype("float16").factor_dtype == torch.float16
    with pytest.raises(ConfigError, match="factor_dtype='int8'"):
        prior.with_factor_dtype("int8")
    with pytest.raises(ConfigError, match="factor_dtype"):
        prior.with_factor_dtype(torch.float64)


def test_reference_scale_and_clamp_fraction(random_prior):
    prior = random_prior(seed=6, meta={"var_clamp": 1e-6})
    variance = prior.variance.clone()
    variance[::4] = 0.5e-6  # a quarter of the raw variances sat at the clamp
    clamped = Prior(prior.mean, variance, prior.factor, names=prior.names, shapes=prior.shapes, meta=prior.meta)
    mean, var = clamped.mean.double().numpy(), variance.double().numpy()
    assert clamped.reference_scale() == pytest.approx(np.mean(mean ** 2) / np.mean(var), rel=1e-12)
    stats = clamped.variance_stats()
    assert stats["clamp_known"] and stats["fraction_at_clamp"] == pytest.approx(np.mean(var <= 0.5e-6))
    assert stats["min"] == pytest.approx(0.5e-6) and stats["max"] == pytest.approx(var.max())


def test_from_module_and_split():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    prior = Prior.from_module(net, variance=0.01)
    assert prior.names == ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
    assert prior.rank == 0 and torch.all(prior.variance == 0.01)
    for (name, param), (split_name, view) in zip(net.named_parameters(), prior.split(prior.mean).items()):
        assert name == split_name and torch.equal(param.detach(), view)
    assert set(prior.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    with pytest.raises(ConfigError, match="variance"):
        Prior.from_module(net, variance=0.0)


def test_named_parameters_for_mismatch_names_first_parameters(random_prior):
    prior = random_prior()  # shapes of Linear(3,4)-Linear(4,5)-Linear(5,2)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 2))
    with pytest.raises(PriorMismatchError) as err:
        named_parameters_for(prior, other)
    msg = str(err.value)
    assert "2.weight: prior (5, 4) vs module (7, 4)" in msg and "2.bias: prior (5,) vs module (7,)" in msg
    assert "3 shape mismatch" in msg


# -- bad input: every case its own clear PriorFormatError naming the file -----------------------------
class _TouchOnUnpickle:
    """Unpickling this would create ``marker``: the shape of a malicious checkpoint."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _payload(prior: Prior, **changes) -> dict:
    payload = prior.to_dict()
    payload.update(changes)
    return payload


def _load_error(path: pathlib.Path) -> str:
    """Load ``path`` expecting one PriorFormatError, on one line naming the file, and no warnings."""
    with warnings.catch_warnings(record=True) as caught, pytest.raises(PriorFormatError) as err:
        warnings.simplefilter("always")
        Prior.load(path)
    assert not caught, [str(w.message) for w in caught]
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("kind, expected", [
    ("text", "it looks like a text file"),
    ("json", "it looks like a text file"),
    ("empty", "the file is empty"),
    ("npy", "it looks like a numpy .npy file"),
    ("binary", "unrecognised binary content"),
])
def test_not_a_torch_file(tmp_path, kind, expected):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("mean,variance\n0.1,0.2\n")
    elif kind == "json":
        path.write_text('{"format": "sklearn-bayes-transfer/prior"}')
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        np.save(path, np.zeros(3))
        path = path.with_name(path.name + ".npy")
    elif kind == "binary":
        path.write_bytes(bytes(range(255, 100, -1)))
    msg = _load_error(path)
    assert "not a file written by torch.save" in msg and expected in msg


def test_missing_file_and_directory(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nope.pt")
    assert "is a directory" in _load_error(tmp_path)


def test_plain_dict_without_format_key(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(3), "bias": torch.zeros(1)}, path)
    msg = _load_error(path)
    assert "not a sklearn-bayes-transfer prior" in msg and "convert-official" in msg


def test_truncated_file(prior_with_buffers, tmp_path):
    full = prior_with_buffers.save(tmp_path / "full.pt")
    cut = tmp_path / "cut.pt"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _load_error(cut)


@pytest.mark.parametrize("writer", ["torch.save", "pickle-2", "pickle-4"])
def test_code_running_pickle_is_refused(random_prior, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = _payload(random_prior(), meta={"x": _TouchOnUnpickle(marker)})
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))
    # The premise: an unsafe load of the same kind of file does run the code.
    proof_marker, proof = tmp_path / "proof", tmp_path / "proof.pt"
    torch.save({"x": _TouchOnUnpickle(proof_marker)}, proof)
    torch.load(proof, weights_only=False)
    assert proof_marker.exists()

    msg = _load_error(path)
    if writer == "pickle-4":  # torch's safe unpickler stops at the protocol-4 framing already
        assert "it is a Python pickle, not a torch.save file" in msg
    else:
        assert "refused" in msg and "would run code" in msg and "pathlib" not in msg.split("(")[0]
    assert not marker.exists()


def test_wrong_format_version(random_prior, tmp_path):
    path = tmp_path / "v2.pt"
    torch.save(_payload(random_prior(), version=2), path)
    msg = _load_error(path)
    assert "version 2" in msg and f"version {FORMAT_VERSION}" in msg


@pytest.mark.parametrize("bad, expected", [
    ("nan_variance", "variance contains NaN"),
    ("negative_variance", "variance must be >= 0"),
    ("factor_wrong_width", "factor must have shape (K, D) = (K, 53), got (3, 52)"),
    ("factor_1d", "factor must have shape (K, D) = (K, 53), got (53,)"),
    ("nan_mean", "mean contains NaN"),
    ("missing_key", "missing key 'variance'"),
    ("shapes_disagree", "add up to 54 elements but mean has 53"),
    ("names_not_list", "'names' must be a list"),
])
def test_invalid_content(random_prior, tmp_path, bad, expected):
    prior = random_prior(rank=3)
    payload = prior.to_dict()
    variance, mean = prior.variance.clone(), prior.mean.clone()
    if bad == "nan_variance":
        variance[5] = float("nan")
        payload["variance"] = variance
    elif bad == "negative_variance":
        variance[5] = -1e-4
        payload["variance"] = variance
    elif bad == "factor_wrong_width":
        payload["factor"] = prior.factor[:, :-1].clone()
    elif bad == "factor_1d":
        payload["factor"] = prior.factor[0].clone()
    elif bad == "nan_mean":
        mean[0] = float("nan")
        payload["mean"] = mean
    elif bad == "missing_key":
        del payload["variance"]
    elif bad == "shapes_disagree":
        payload["shapes"] = [[4, 3], [4], [5, 4], [5], [2, 5], [3]]
    elif bad == "names_not_list":
        payload["names"] = "0.weight"
    path = tmp_path / f"{bad}.pt"
    torch.save(payload, path)
    assert expected in _load_error(path)


def test_constructor_checks_metadata_is_plain(random_prior):
    prior = random_prior()
    with pytest.raises(PriorFormatError, match=r"meta\['fn'\] holds a builtin_function_or_method"):
        Prior(prior.mean, prior.variance, names=prior.names, shapes=prior.shapes, meta={"fn": print})


# -- the official repository's four-file format ---------------------------------------------------------
def _check_official_import(prior: Prior, files, rank: int) -> None:
    d = files.mean.numel()
    raw = files.deviations.double().numpy()
    diag = files.variance.double().numpy()
    assert prior.n_params == d and prior.rank == rank
    assert list(prior.names) == files.backbone_names and not any(n.startswith("fc.") for n in prior.names)
    assert torch.equal(prior.mean, files.mean)
    # Sigma = 0.5 diag(var) + 0.5 C^T C / (K - 1) (docs/design.md); checked on a 400 x 400 block.
    np.testing.assert_allclose(prior.variance.double().numpy(), 0.5 * diag, rtol=1e-6)
    block = slice(1000, 1400)
    f = prior.factor.double().numpy()[:, block]
    expected = 0.5 * raw[:, block].T @ raw[:, block] / (rank - 1)
    np.testing.assert_allclose(f.T @ f, expected, rtol=1e-4, atol=1e-6 * float(np.abs(expected).max()))
    state = files.model.state_dict()
    buffer_names = [n for n in state if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sorted(prior.buffers) == sorted(buffer_names) and len(buffer_names) == 18
    for name in buffer_names:
        assert torch.equal(prior.buffers[name], state[name]), name


@pytest.mark.parametrize("rank", [5, 10])
@pytest.mark.parametrize("normalized", [False, True])
def test_official_import_detects_normalisation(official_prior, rank, normalized):
    files = official_prior(rank=rank, normalized=normalized)
    assert 3000 < files.mean.numel() < 10_000  # "a few thousand parameters"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mean matches the model: nothing to warn about
        prior = Prior.from_official(files.prefix)
    info = prior.meta["import"]
    assert info["factor_normalization"] == ("normalized" if normalized else "raw") and info["detected"]
    assert info["mean_matches_model"]
    expected_ratio = rank / (rank - 1) if normalized else rank
    assert 0.5 * expected_ratio < info["row_sq_sum_over_variance_median"] < 1.5 * expected_ratio
    _check_official_import(prior, files, rank)
    assert prior.meta["backbone"] == "resnet50" and prior.meta["method"] == "swag"


def test_official_import_forced_normalisation(official_prior):
    files = official_prior(rank=5, normalized=True)
    auto = Prior.from_official(files.prefix)
    forced = Prior.from_official(files.prefix, factor_normalization="raw")
    assert forced.meta["import"]["factor_normalization"] == "raw" and not forced.meta["import"]["detected"]
    # Treating normalised rows as raw divides them by sqrt(K - 1) once more.
    torch.testing.assert_close(forced.factor * 2.0, auto.factor, rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="factor_normalization='sqrt'"):
        Prior.from_official(files.prefix, factor_normalization="sqrt")


def test_official_import_drops_fc_and_round_trips(official_prior, tmp_path):
    files = official_prior(rank=5, with_fc=True)
    assert any(k.startswith("fc.") for k in files.model.state_dict())
    prior = Prior.from_official(files.prefix)
    _check_official_import(prior, files, 5)
    loaded = Prior.load(prior.save(tmp_path / "converted.pt"))
    assert_same_prior(prior, loaded)
    # It binds to the backbone it came from.
    bound = named_parameters_for(loaded, files.model)
    assert [n for n, _ in bound] == files.backbone_names


def test_official_import_wrapped_checkpoint(official_prior):
    # A checkpoint saved from DataParallel: {"state_dict": {"module.conv1.weight": ...}}, fc included.
    files = official_prior(rank=5, with_fc=True)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in files.model.state_dict().items()}}
    torch.save(wrapped, f"{files.prefix}_model.pt")
    prior = Prior.from_official(files.prefix)
    _check_official_import(prior, files, 5)


def test_official_import_transposed_covmat(official_prior):
    files = official_prior(rank=5)
    reference = Prior.from_official(files.prefix)
    torch.save(files.covmat.T.contiguous(), f"{files.prefix}_covmat.pt")
    assert torch.equal(Prior.from_official(files.prefix).factor, reference.factor)


def test_official_mean_differing_from_model_warns(official_prior):
    files = official_prior(rank=5, model_holds_last_iterate=True)
    with pytest.warns(UserWarning, match=r"official_mean\.pt' differs from the parameters"):
        prior = Prior.from_official(files.prefix)
    assert not prior.meta["import"]["mean_matches_model"]
    assert torch.equal(prior.mean, files.mean)  # the mean file is the centre


def test_official_k2_is_ambiguous(official_prior):
    files = official_prior(rank=2)
    with pytest.warns(UserWarning, match="K=2"):
        prior = Prior.from_official(files.prefix)
    assert prior.meta["import"]["factor_normalization"] == "raw"


@pytest.mark.parametrize("part", ["model", "mean", "variance", "covmat"])
def test_official_missing_file(official_prior, part):
    files = official_prior()
    os.remove(f"{files.prefix}_{part}.pt")
    with pytest.raises(PriorFormatError) as err:
        Prior.from_official(files.prefix)
    msg = str(err.value)
    assert f"official_{part}.pt" in msg and "incomplete" in msg
    assert all(f"official_{other}.pt" not in msg.split("(expected")[0] for other in
               {"model", "mean", "variance", "covmat"} - {part})


@pytest.mark.parametrize("case, file_part, expected", [
    ("variance_short", "variance", "entries, the mean has"),
    ("covmat_wrong_d", "covmat", "expected (K, "),
    ("covmat_3d", "covmat", "must be 2-D"),
    ("covmat_one_row", "covmat", "K=1"),
    ("mean_short", "mean", "do not belong together"),
    ("model_not_state_dict", "model", "is not a state_dict"),
    ("mean_not_tensor", "mean", "must hold one tensor"),
])
def test_official_mismatched_files(official_prior, case, file_part, expected):
    files = official_prior(rank=5)
    prefix = files.prefix
    target = f"{prefix}_{file_part}.pt"
    if case == "variance_short":
        torch.save(files.variance[:-3].clone(), target)
    elif case == "covmat_wrong_d":
        torch.save(files.covmat[:, :-3].clone(), target)
    elif case == "covmat_3d":
        torch.save(files.covmat[None].clone(), target)
    elif case == "covmat_one_row":
        torch.save(files.covmat[:1].clone(), target)
    elif case == "mean_short":
        torch.save(files.mean[:-3].clone(), target)
        torch.save(files.variance[:-3].clone(), f"{prefix}_variance.pt")
        torch.save(files.covmat[:, :-3].clone(), f"{prefix}_covmat.pt")
    elif case == "model_not_state_dict":
        torch.save(torch.zeros(3), target)
    elif case == "mean_not_tensor":
        torch.save({"mean": files.mean}, target)
    with pytest.raises(PriorFormatError) as err:
        Prior.from_official(prefix)
    msg = str(err.value)
    assert target in msg and expected in msg


def test_official_file_that_would_run_code(official_prior, tmp_path):
    files = official_prior()
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _TouchOnUnpickle(marker)}, f"{files.prefix}_model.pt")
    with pytest.raises(PriorFormatError, match="refused"):
        Prior.from_official(files.prefix)
    assert not marker.exists()


def test_official_mean_matches_model_exactly(official_prior):
    # Sanity check on the fixture itself: the mean file is the model's parameters, flattened.
    files = official_prior()
    flat = torch.cat([p.detach().reshape(-1) for n, p in files.model.named_parameters()])
    assert torch.equal(flat, files.mean) and math.isclose(float(files.covmat.abs().max()), float(
        files.deviations.abs().max()))
