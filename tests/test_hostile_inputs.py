"""Hostile and broken inputs against the command line: every one is refused cleanly.

Families: truncated, bit-flipped, wrong-shape, non-finite and malicious prior and model files;
hostile image folders (symbolic-link loops, corrupt and decompression-bomb PNGs, besides unusual
but valid images that must work); bad option values (fuzzed with hypothesis); unusable output
paths; Ctrl-C. For a refusal the rule is: a non-zero exit code (1 for our checks, 2 for click's own
usage errors, 130 for Ctrl-C), the thing named on one line of stderr (click's usage panel names the
option), no traceback, and no file created or changed. ``CASES`` counts them for the report.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_folder, write_prior
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior, PriorRegularizedClassifier
from sklearn_bayes_transfer._io import atomic_write
from sklearn_bayes_transfer.exceptions import OutputExistsError
from sklearn_bayes_transfer.modelfile import save_model

runner = CliRunner()
FAST = ["--max-epochs", "1", "--batch-size", "4", "--quiet"]
HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- what every refusal must look like ------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every regular file below ``root`` (links not followed): its mode and a digest of its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        out[str(path.relative_to(root))] = (stat.S_IMODE(path.stat().st_mode),
                                            hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def refused(result, root: Path, before: dict, *needles: str, code: int = 1) -> str:
    """A clean refusal: ``code``, one stderr line (or click's usage panel) naming ``needles``, nothing written."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Traceback" not in result.output
    text = result.stderr.strip()
    if code == 2:  # click's usage error names the option in its panel
        assert "Invalid value" in text or "No such option" in text or "Missing" in text, text
    else:
        assert len(text.splitlines()) == 1 and text.startswith("error:"), text
    for needle in needles:
        assert needle in text, (needle, text)
    assert snapshot(root) == before, "a file was created or changed"
    return text


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A prior, a labelled folder and a fitted model file, in a folder of their own (the cwd)."""
    monkeypatch.chdir(tmp_path)
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 3)
    model = tmp_path / "model.pt"
    result = runner.invoke(app, ["finetune", "--prior", str(prior), "--data", str(data), "--out", str(model), *FAST])
    assert result.exit_code == 0, result.output
    return tmp_path


# -- prior files ------------------------------------------------------------------------------------------
def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _bad_priors(prior: Prior) -> dict[str, tuple[bytes, str]]:
    """Name -> (file bytes, a word the refusal must contain)."""
    payload = prior.to_dict()
    nan_mean = {**payload, "mean": payload["mean"].clone().fill_(float("nan")), "digest": None}
    del nan_mean["digest"]
    neg_var = {**payload, "buffers": {k: (v.clone().fill_(-1.0) if k.endswith("running_var") else v)
                                      for k, v in payload["buffers"].items()}}
    del neg_var["digest"]
    shapes = {**payload, "shapes": [[3]] * len(payload["shapes"])}
    edited = {**payload, "variance": payload["variance"] * 2}  # the stored digest no longer fits
    return {
        "empty": (b"", "empty"),
        "text": (b"this is not a prior\n", "text"),
        "npy": (b"\x93NUMPY\x01\x00" + b"\x00" * 64, "numpy"),
        "pickle of code": (pickle.dumps(Evil()), "prior file"),
        "torch file of code": (_torch_bytes({"format": "x", "evil": Evil()}), "run code"),
        "a plain tensor": (_torch_bytes(torch.zeros(3)), "Tensor"),
        "NaN mean": (_torch_bytes(nan_mean), "NaN"),
        "negative BatchNorm variance": (_torch_bytes(neg_var), "negative"),
        "wrong shapes": (_torch_bytes(shapes), "shapes"),
        "edited content": (_torch_bytes(edited), "digest"),
        "future version": (_torch_bytes({**payload, "version": 99}), "version 99"),
    }


PRIOR_COMMANDS = {
    "inspect": lambda p, ws: ["inspect", str(p), "--verify"],
    "finetune": lambda p, ws: ["finetune", "--prior", str(p), "--data", str(ws / "imgs"), "--out",
                               str(ws / "new.pt"), *FAST],
    "tune": lambda p, ws: ["tune", "--prior", str(p), "--data", str(ws / "imgs"), "--cv", "2", "--out",
                           str(ws / "new.pt"), "--max-epochs", "1"],
}


@pytest.mark.parametrize("command", list(PRIOR_COMMANDS))
def test_broken_and_malicious_prior_files_are_refused(workspace, command):
    prior = Prior.load(workspace / "prior.pt")
    for name, (content, needle) in _bad_priors(prior).items():
        path = workspace / f"bad {name}.pt"
        path.write_bytes(content)
        before = snapshot(workspace)
        result = runner.invoke(app, PRIOR_COMMANDS[command](path, workspace))
        refused(result, workspace, before, str(path), needle)
        assert not (workspace / "PWNED").exists()
        path.unlink()


@HYPOTHESIS
@given(cut=st.floats(0.0, 0.999))
def test_truncated_prior_files_are_refused(workspace, cut):
    original = (workspace / "prior.pt").read_bytes()
    path = workspace / "truncated.pt"
    path.write_bytes(original[:int(cut * len(original))])
    before = snapshot(workspace)
    refused(runner.invoke(app, ["inspect", str(path)]), workspace, before, str(path))
    path.unlink()


@HYPOTHESIS
@given(position=st.floats(0.0, 0.999), bit=st.integers(0, 7))
def test_a_flipped_bit_is_refused_or_changes_nothing(workspace, position, bit):
    original = (workspace / "prior.pt").read_bytes()
    damaged = bytearray(original)
    damaged[int(position * len(damaged))] ^= 1 << bit
    path = workspace / "flipped.pt"
    path.write_bytes(bytes(damaged))
    before = snapshot(workspace)
    result = runner.invoke(app, ["inspect", str(path), "--verify", "--json"])
    if result.exit_code == 0:  # the bit was in zip bookkeeping torch does not read: same content
        assert Prior.load(path).digest() == Prior.load(workspace / "prior.pt").digest()
    else:
        refused(result, workspace, before, str(path))
    path.unlink()


def test_data_flips_are_caught_by_the_digest(workspace):
    # A flip inside a tensor's bytes keeps the zip readable; only the digest notices.
    path = workspace / "prior.pt"
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the biggest tensor's storage
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    damaged = bytearray(path.read_bytes())
    damaged[start + info.file_size // 2] ^= 0x10
    flipped = workspace / "flipped.pt"
    flipped.write_bytes(bytes(damaged))
    before = snapshot(workspace)
    refused(runner.invoke(app, ["finetune", "--prior", str(flipped), "--data", "imgs", "--out", "x.pt", *FAST]),
            workspace, before, str(flipped), "digest")
    assert Prior.load(flipped, verify=False).n_params == Prior.load(path).n_params  # the escape hatch


def test_non_regular_inputs_are_refused_before_reading(workspace):
    fifo = workspace / "fifo.pt"
    os.mkfifo(fifo)
    for target, needle in (("/dev/zero", "device"), (str(fifo), "pipe"), (str(workspace / "imgs"), "directory"),
                           (str(workspace / "missing.pt"), "does not exist")):
        before = snapshot(workspace)
        refused(runner.invoke(app, ["inspect", target]), workspace, before, target, needle)
        refused(runner.invoke(app, ["predict", "--model", target, "imgs"]), workspace, before, target, needle)
    loop = workspace / "loop.pt"
    loop.symlink_to(loop)
    before = snapshot(workspace)
    refused(runner.invoke(app, ["inspect", str(loop)]), workspace, before, str(loop), "symbolic links")


# -- model files ------------------------------------------------------------------------------------------
def _bad_models(model: Path) -> dict[str, tuple[bytes, str]]:
    payload = torch.load(model, weights_only=True)

    def variant(**changes) -> bytes:
        return _torch_bytes({**payload, **changes})

    state = payload["state_dict"]
    nan_state = {k: (v.clone().fill_(float("nan")) if v.is_floating_point() else v) for k, v in state.items()}
    neg_var = {k: (v.clone().fill_(-1.0) if k.endswith("running_var") else v) for k, v in state.items()}
    hyper = payload["hyperparameters"]
    return {
        "NaN weights": (variant(state_dict=nan_state), "NaN"),
        "negative BatchNorm variance": (variant(state_dict=neg_var), "negative"),
        "batch_size -5": (variant(hyperparameters={**hyper, "batch_size": -5}), "batch_size"),
        "callbacks as text": (variant(hyperparameters={**hyper, "callbacks": "rm -rf"}), "callbacks"),
        "predict_nonlinearity as text": (variant(hyperparameters={**hyper, "predict_nonlinearity": "os.system"}),
                                         "predict_nonlinearity"),
        "iterator_valid as text": (variant(hyperparameters={**hyper, "iterator_valid": "x"}), "iterator_valid"),
        "fewer classes than outputs": (variant(classes=payload["classes"][:1]), "classes"),
        "missing weights": (variant(state_dict=dict(list(state.items())[:-2])), "weights"),
        "a prior file": (model.with_name("prior.pt").read_bytes(), "prior file"),
        "pickle of code": (pickle.dumps(Evil()), "model file"),
        "truncated": (model.read_bytes()[:len(model.read_bytes()) // 2], "model file"),
    }


@pytest.mark.parametrize("command", ["predict", "evaluate", "inspect"])
def test_broken_and_malicious_model_files_are_refused(workspace, command):
    for name, (content, needle) in _bad_models(workspace / "model.pt").items():
        path = workspace / f"bad {name}.pt"
        path.write_bytes(content)
        args = {"predict": ["predict", "--model", str(path), "imgs", "--out", "preds.csv"],
                "evaluate": ["evaluate", "--model", str(path), "--data", "imgs"],
                "inspect": ["inspect", str(path)]}[command]
        if command == "inspect":
            if name not in ("pickle of code", "truncated"):
                path.unlink()
                continue  # inspect describes a file without rebuilding it; the other checks are load_model's
            needle = "file"  # inspect reads priors and models alike
        before = snapshot(workspace)
        refused(runner.invoke(app, args), workspace, before, str(path), needle)
        assert not (workspace / "PWNED").exists()
        path.unlink()


# -- image folders ----------------------------------------------------------------------------------------
def _finetune(folder: Path, out: Path) -> list[str]:
    return ["finetune", "--prior", "prior.pt", "--data", str(folder), "--out", str(out), *FAST]


def test_hostile_folders_are_refused(workspace):
    cases = {}
    loop = write_folder(workspace / "loop", 2)
    (loop / "ant" / "again").symlink_to(loop)
    cases["a link back to the folder"] = (loop, "loop")
    twice = write_folder(workspace / "twice", 2)
    (twice / "bee" / "ants").symlink_to(twice / "ant")
    cases["a link into another class"] = (twice, "read twice")
    self_link = write_folder(workspace / "self", 2)
    (self_link / "ant" / "me").symlink_to(self_link / "ant" / "me")
    cases["a link to itself"] = (self_link, "me")
    corrupt = write_folder(workspace / "corrupt", 2)
    (corrupt / "ant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))
    cases["a corrupt PNG"] = (corrupt, "broken.png")
    truncated = write_folder(workspace / "truncated", 2)
    whole = (truncated / "ant" / "0.png").read_bytes()
    (truncated / "ant" / "0.png").write_bytes(whole[:len(whole) // 2])
    cases["a truncated PNG"] = (truncated, "0.png")
    bomb = write_folder(workspace / "bomb", 2)
    Image.new("1", (25000, 25000)).save(bomb / "ant" / "bomb.png")
    cases["a decompression bomb"] = (bomb, "bomb.png")
    dangling = write_folder(workspace / "dangling", 2)
    (dangling / "ant" / "gone.png").symlink_to(workspace / "nowhere.png")
    cases["a dangling link"] = (dangling, "gone.png")
    root_loop = workspace / "rootloop"
    root_loop.symlink_to(root_loop)
    cases["a looping --data"] = (root_loop, "rootloop")
    for name, (folder, needle) in cases.items():
        before = snapshot(workspace)
        refused(runner.invoke(app, _finetune(folder, workspace / "out.pt")), workspace, before, needle)


def test_unusual_but_valid_images_work(workspace):
    folder = workspace / "odd"
    for cls in ("ant", "bee"):
        (folder / cls).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(folder / "ant" / "sixteen bit.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).convert("P").save(folder / "ant" / "palette.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 4), dtype=np.uint8), "RGBA").save(folder / "bee" / "rgba.png")
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(folder / "bee" / "one pixel.png")
    Image.fromarray(rng.integers(0, 255, (300, 500), dtype=np.uint8)).save(folder / "bee" / "größer 图像.png")
    result = runner.invoke(app, _finetune(folder, workspace / "odd.pt"))
    assert result.exit_code == 0, result.output
    assert (workspace / "odd.pt").exists()


def test_segmentation_masks_with_impossible_ids_are_refused_at_fit(workspace):
    images, masks = workspace / "seg_images", workspace / "seg_masks"
    images.mkdir()
    masks.mkdir()
    for i, value in enumerate((1, 100000)):
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(images / f"{i}.png")
        Image.fromarray(np.full((8, 8), value, np.int32), "I").save(masks / f"{i}.tif")
    before = snapshot(workspace)
    result = runner.invoke(app, ["finetune", "--task", "segmentation", "--prior", "prior.pt", "--data", str(images),
                                 "--masks", str(masks), "--out", "seg.pt", *FAST])
    refused(result, workspace, before, "1.tif", "100000")


# -- option values ----------------------------------------------------------------------------------------
NUMERIC_OPTIONS = ["--lr", "--batch-size", "--prior-scale", "--warmup", "--momentum", "--min-steps", "--max-epochs",
                   "--prior-eps", "--head-weight-decay", "--valid-fraction", "--samples", "--early-stopping"]
VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "-0.0", "1e309", "abc", "", " ", "1,2", "0x10", "1e-400",
                     "999999999999999999999", "auto", "evidence", "None", "--force"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**12, 10**12).map(str),
    st.text(alphabet="0123456789.-+eE_ ", max_size=6),
)


@HYPOTHESIS
@given(option=st.sampled_from(NUMERIC_OPTIONS), value=VALUES)
def test_fuzzed_option_values_are_accepted_or_refused_cleanly(workspace, option, value):
    out = workspace / "fuzzed.pt"
    if out.exists():
        out.unlink()
    before = snapshot(workspace)
    args = ["finetune", "--prior", "prior.pt", "--data", "imgs", "--out", str(out), "--quiet", "--max-epochs", "1",
            "--batch-size", "4", option, value]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), \
        (option, value, repr(result.exception), result.output)
    if result.exit_code == 0:
        assert out.exists()
        return
    assert result.exit_code in (1, 2), (option, value, result.output)
    refused(result, workspace, before, code=result.exit_code)


def test_unknown_device_and_structure_are_one_line_errors(workspace):
    for args, needle in ((["finetune", "--prior", "prior.pt", "--data", "imgs", "--out", "x.pt", "--device", "tpu"],
                          "--device"),
                         (["predict", "--model", "model.pt", "imgs", "--device", "tpu"], "--device"),
                         (["evaluate", "--model", "model.pt", "--data", "imgs", "--device", "tpu"], "--device"),
                         (["tune", "--prior", "prior.pt", "--data", "imgs", "--device", "tpu"], "--device"),
                         (["tune", "--prior", "prior.pt", "--data", "imgs", "--structures", "bogus"], "bogus"),
                         (["tune", "--prior", "prior.pt", "--data", "imgs", "--cv", "50"], "'ant'")):
        before = snapshot(workspace)
        text = refused(runner.invoke(app, args), workspace, before, needle)
        assert "np.str_" not in text


# -- output paths -----------------------------------------------------------------------------------------
def test_outputs_that_cannot_be_written_are_refused_before_training(workspace):
    fifo = workspace / "fifo"
    os.mkfifo(fifo)
    cases = [("/dev/full", "device"), (str(fifo), "pipe"), (str(workspace / "imgs"), "directory"),
             (str(workspace / "no" / "such" / "dir.pt"), "does not exist"), ("prior.pt", "input file")]
    for out, needle in cases:
        before = snapshot(workspace)
        result = runner.invoke(app, ["finetune", "--prior", "prior.pt", "--data", "imgs", "--out", out, "--force",
                                     *FAST])
        refused(result, workspace, before, needle)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # still a device


def test_an_existing_output_needs_force_and_keeps_its_mode(workspace):
    model = workspace / "model.pt"
    before = snapshot(workspace)
    refused(runner.invoke(app, ["finetune", "--prior", "prior.pt", "--data", "imgs", "--out", str(model), *FAST]),
            workspace, before, str(model), "--force")
    model.chmod(0o640)
    result = runner.invoke(app, ["finetune", "--prior", "prior.pt", "--data", "imgs", "--out", str(model), "--force",
                                 *FAST])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(model.stat().st_mode) == 0o640


def test_new_outputs_follow_the_umask_and_links_are_written_through(workspace):
    old = os.umask(0o027)
    try:
        atomic_write(workspace / "new.txt", lambda tmp: Path(tmp).write_text("x"), overwrite=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((workspace / "new.txt").stat().st_mode) == 0o640
    target = workspace / "target.txt"
    target.write_text("old")
    link = workspace / "link.txt"
    link.symlink_to(target)
    atomic_write(link, lambda tmp: Path(tmp).write_text("new"), overwrite=True)
    assert link.is_symlink() and target.read_text() == "new"


def test_a_concurrent_writer_is_never_overwritten(workspace):
    out = workspace / "race.txt"

    def write(tmp: str) -> None:
        Path(tmp).write_text("mine")
        out.write_text("theirs")  # another run finished first

    with pytest.raises(OutputExistsError, match="race.txt"):
        atomic_write(out, write, overwrite=False)
    assert out.read_text() == "theirs"
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".race")] == []  # no temp file left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_refused_before_training(workspace):
    locked = workspace / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    before = snapshot(workspace)
    refused(runner.invoke(app, ["finetune", "--prior", "prior.pt", "--data", "imgs", "--out", str(locked / "m.pt"),
                                *FAST]), workspace, before, "not writable")


# -- Ctrl-C -----------------------------------------------------------------------------------------------
def _interrupt_after(monkeypatch, steps: int) -> None:
    from sklearn_bayes_transfer.regularized import PriorRegularizedMixin

    original = PriorRegularizedMixin.train_step
    calls = {"n": 0}

    def train_step(self, batch, **fit_params):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return original(self, batch, **fit_params)

    monkeypatch.setattr(PriorRegularizedMixin, "train_step", train_step)


@pytest.mark.parametrize("command", ["finetune", "tune"])
def test_ctrl_c_writes_nothing_and_exits_130(workspace, monkeypatch, command):
    _interrupt_after(monkeypatch, 2)
    before = snapshot(workspace)
    args = {"finetune": ["finetune", "--prior", "prior.pt", "--data", "imgs", "--out", "model.pt", "--force",
                         "--batch-size", "2", "--max-epochs", "3", "--quiet"],
            "tune": ["tune", "--prior", "prior.pt", "--data", "imgs", "--cv", "2", "--prior-scale", "1",
                     "--max-epochs", "3", "--out", "best.pt", "--quiet"]}[command]
    refused(runner.invoke(app, args), workspace, before, "interrupted; nothing written", code=130)


def test_ctrl_c_in_fit_is_raised_not_swallowed(workspace, monkeypatch):
    _interrupt_after(monkeypatch, 1)
    X = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    clf = PriorRegularizedClassifier(Prior.load("prior.pt"), max_epochs=3, batch_size=2, verbose=0)
    with pytest.raises(KeyboardInterrupt, match="partly trained"):
        clf.fit(X, np.arange(8) % 2)


def test_ctrl_c_while_the_command_line_starts(monkeypatch, capsys):
    from sklearn_bayes_transfer.cli import _entry

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "sklearn_bayes_transfer.cli.app", None)  # the import itself fails ...
    monkeypatch.setattr("builtins.__import__", _import_raising(interrupted))
    with pytest.raises(SystemExit) as exit_info:
        _entry.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; nothing written"


def _import_raising(handler):
    real = __import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 1 and name == "app":
            handler()
        return real(name, globals, locals, fromlist, level)

    return fake


def test_model_save_refuses_an_existing_file_without_overwrite(workspace):
    clf = PriorRegularizedClassifier(Prior.load("prior.pt"), max_epochs=1, verbose=0)
    clf.fit(np.random.default_rng(0).random((4, 8, 8), dtype=np.float32), np.array([0, 1, 0, 1]))
    with pytest.raises(OutputExistsError, match="model.pt"):
        save_model(clf, workspace / "model.pt", overwrite=False)


# -- the official four-file format ----------------------------------------------------------------------
@pytest.mark.parametrize(("part", "value", "needle"), [
    ("variance", float("nan"), "NaN"), ("variance", -1.0, "-1"), ("covmat", float("inf"), "Inf"),
    ("mean", float("nan"), "NaN"),
])
def test_official_files_with_bad_values_name_the_file_and_the_value(official_prior, tmp_path, part, value, needle):
    files = official_prior()
    path = Path(f"{files.prefix}_{part}.pt")
    tensor = torch.load(path, weights_only=True)
    tensor.view(-1)[3] = value
    torch.save(tensor, path)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["convert-official", str(files.prefix), str(tmp_path / "out.pt")])
    refused(result, tmp_path, before, str(path), needle)
