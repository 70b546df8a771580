"""Resumable runs: a prior fit or a fine-tune killed (SIGKILL) at any moment and resumed gives the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_folder, write_prior
from sklearn_bayes_transfer.cli.app import app
from skorch.callbacks import Callback
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior, PriorRegularizedClassifier, load_model
from sklearn_bayes_transfer.checkpoint import CHECKPOINT_FILE, FitCheckpoint
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.exceptions import (
    CheckpointError,
    ConfigError,
    OutputExistsError,
)
from sklearn_bayes_transfer.fitter import PriorFitter
from sklearn_bayes_transfer.swag import SwagCollector

runner = CliRunner()
SETTINGS = dict(backbone="small_cnn", backbone_kwargs={"width": 4}, max_epochs=6, swag_start=2, rank=3,
                batch_size=64, random_state=0)

# The child fits with a checkpoint directory and SIGKILLs itself at a chosen moment: at an optimizer
# step (inside an epoch) or inside the n-th checkpoint write, after half the file is on disk.
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from sklearn_bayes_transfer import checkpoint
    from sklearn_bayes_transfer.datasets import load_digits_images
    from sklearn_bayes_transfer.fitter import PriorFitter
    settings, where, when, folder = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)  # as the tests run: float sums are bit-exact for one thread count
    count = [0]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "step":
        step = torch.optim.SGD.step
        def killing_step(self, *args, **kwargs):
            count[0] += 1
            if count[0] == when:
                die()
            return step(self, *args, **kwargs)
        torch.optim.SGD.step = killing_step
    else:
        save = torch.save
        def killing_save(obj, f, *args, **kwargs):
            count[0] += 1
            save(obj, f, *args, **kwargs)
            if count[0] == when:
                with open(f, "r+b") as handle:
                    handle.truncate(os.path.getsize(f) // 2)
                die()
        checkpoint.torch.save = killing_save
    X, y = load_digits_images()
    PriorFitter(**settings, checkpoint_dir=folder).fit(X[:200], y[:200])
""")


def _data():
    X, y = load_digits_images()
    return X[:200], y[:200]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    fitter = PriorFitter(**SETTINGS, checkpoint_dir=folder).fit(*_data())
    return fitter.prior_


def _assert_same_prior(a: Prior, b: Prior) -> None:
    for name in ("mean", "variance", "factor"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.buffers.keys() == b.buffers.keys()
    for key in a.buffers:
        assert torch.equal(a.buffers[key], b.buffers[key]), key


def test_checkpointing_does_not_change_the_prior(uninterrupted):
    plain = PriorFitter(**SETTINGS).fit(*_data()).prior_
    _assert_same_prior(plain, uninterrupted)


@pytest.mark.parametrize("where, when", [
    ("step", 2),    # epoch 1, nothing saved yet
    ("step", 11),   # epoch 3 (4 steps per epoch), inside SWAG collection
    ("save", 4),    # while writing the checkpoint of epoch 4: the epoch-3 one must survive
    ("step", 24),   # the last step of the last epoch
])
def test_a_killed_run_resumes_to_the_uninterrupted_prior(tmp_path, uninterrupted, where, when):
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SETTINGS), where, str(when), str(tmp_path)],
                           check=False, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    if where == "save":
        assert list(tmp_path.glob(f".{CHECKPOINT_FILE}.*.tmp")), "the killed write should leave its temporary file"
        saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
        assert saved["epochs"] == when - 1  # the previous complete checkpoint
    resumed = PriorFitter(**SETTINGS, checkpoint_dir=tmp_path, resume=True).fit(*_data())
    _assert_same_prior(resumed.prior_, uninterrupted)
    assert len(resumed.history_) == SETTINGS["max_epochs"]
    assert not list(tmp_path.glob(f".{CHECKPOINT_FILE}.*.tmp"))  # stale temporaries are cleared


def test_simclr_resumes_bit_for_bit(tmp_path):
    settings = {**SETTINGS, "source_task": "simclr", "max_epochs": 4, "rank": 2}
    X, _ = _data()
    reference = PriorFitter(**settings).fit(X).prior_

    def stop_after_two(self):
        if self.n_snapshots == 1:
            raise KeyboardInterrupt
        return collect(self)

    collect = SwagCollector.collect
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SwagCollector, "collect", lambda self, params=None: stop_after_two(self))
        with pytest.raises(KeyboardInterrupt, match="resume=True"):
            PriorFitter(**settings, checkpoint_dir=tmp_path).fit(X)
    _assert_same_prior(PriorFitter(**settings, checkpoint_dir=tmp_path, resume=True).fit(X).prior_, reference)


def test_other_settings_are_refused_naming_the_setting(tmp_path, uninterrupted):
    X, y = _data()
    PriorFitter(**{**SETTINGS, "max_epochs": 5}, checkpoint_dir=tmp_path).fit(X, y)
    with pytest.raises(CheckpointError, match=r"rank=3, but this run has rank=2"):
        PriorFitter(**{**SETTINGS, "max_epochs": 5, "rank": 2}, checkpoint_dir=tmp_path, resume=True).fit(X, y)
    with pytest.raises(CheckpointError, match=r"n_source_examples=200, but this run has n_source_examples=150"):
        PriorFitter(**{**SETTINGS, "max_epochs": 5}, checkpoint_dir=tmp_path, resume=True).fit(X[:150], y[:150])
    with pytest.raises(CheckpointError, match="backbone_kwargs"):
        PriorFitter(**{**SETTINGS, "max_epochs": 5, "backbone_kwargs": {"width": 8}}, checkpoint_dir=tmp_path,
                    resume=True).fit(X, y)
    # The device, the log and the workers may change between the run and its resumption.
    PriorFitter(**{**SETTINGS, "max_epochs": 5}, verbose=0, device="cpu", checkpoint_dir=tmp_path,
                resume=True).fit(X, y)


def test_unusable_checkpoints_and_directories(tmp_path):
    X, y = _data()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match=r"checkpoint '.*checkpoint.pt' is not a readable torch file"):
        PriorFitter(**SETTINGS, checkpoint_dir=folder, resume=True).fit(X, y)
    torch.save({"weights": torch.zeros(2)}, folder / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="is not a sklearn-bayes-transfer checkpoint"):
        PriorFitter(**SETTINGS, checkpoint_dir=folder, resume=True).fit(X, y)
    with pytest.raises(OutputExistsError, match="already holds a checkpoint.*resume"):
        PriorFitter(**SETTINGS, checkpoint_dir=folder).fit(X, y)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        PriorFitter(**SETTINGS, checkpoint_dir=a_file).fit(X, y)
    with pytest.raises(ConfigError, match="resume=True needs checkpoint_dir"):
        PriorFitter(**SETTINGS, resume=True).fit(X, y)
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match="is not writable"):
            PriorFitter(**SETTINGS, checkpoint_dir=locked).fit(X, y)


def test_fit_prior_command_resumes(tmp_path):
    data = write_folder(tmp_path / "imgs", 8)
    run = tmp_path / "run"
    common = ["fit-prior", "--data", str(data), "--backbone", "small_cnn", "--backbone-kwargs", '{"width": 4}',
              "--max-epochs", "4", "--rank", "2", "--batch-size", "8", "--device", "cpu", "--quiet"]
    first = runner.invoke(app, [*common, "--out", str(tmp_path / "a.pt"), "--checkpoint-dir", str(run)])
    assert first.exit_code == 0, first.output
    assert (run / CHECKPOINT_FILE).is_file()
    shown = runner.invoke(app, ["inspect", str(run / CHECKPOINT_FILE), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert info["epochs_done"] == 4 and info["settings"]["rank"] == 2 and "train_loss" in info["last_epoch"]
    assert "epochs done" in runner.invoke(app, ["inspect", str(run / CHECKPOINT_FILE)]).stdout
    # The finished run resumed: no epoch left, the same prior exported again.
    again = runner.invoke(app, [*common, "--out", str(tmp_path / "b.pt"), "--checkpoint-dir", str(run), "--resume"])
    assert again.exit_code == 0, again.output
    _assert_same_prior(Prior.load(tmp_path / "a.pt"), Prior.load(tmp_path / "b.pt"))
    one_line_error(runner.invoke(app, [*common, "--out", str(tmp_path / "c.pt"), "--checkpoint-dir", str(run)]),
                   "already holds a checkpoint", "--resume")
    assert not (tmp_path / "c.pt").exists()
    one_line_error(runner.invoke(app, [*common, "--out", str(tmp_path / "c.pt"), "--checkpoint-dir", str(run),
                                       "--resume", "--rank", "3"]), "rank=2", "rank=3")
    one_line_error(runner.invoke(app, [*common, "--out", str(tmp_path / "c.pt"), "--resume"]),
                   "--resume needs --checkpoint-dir")
    fresh = runner.invoke(app, [*common, "--out", str(tmp_path / "c.pt"), "--checkpoint-dir", str(run), "--force"])
    assert fresh.exit_code == 0, fresh.output
    _assert_same_prior(Prior.load(tmp_path / "a.pt"), Prior.load(tmp_path / "c.pt"))


# -- fine-tunes (FitCheckpoint, finetune --checkpoint-dir) ----------------------------------------------
class _StopAfter(Callback):
    """Ctrl-C at the end of an epoch, after that epoch's checkpoint."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epochs:
            raise KeyboardInterrupt


def _fine_tune(prior, folder, *, resume=False, extra=(), **params):
    settings = dict(max_epochs=6, batch_size=16, random_state=0, verbose=0) | params
    callbacks = [("checkpoint", FitCheckpoint(folder, resume=resume)), *extra]
    return PriorRegularizedClassifier(prior, callbacks=callbacks, **settings)


@pytest.mark.parametrize("prior_scale", ["auto", "evidence"])
def test_a_fine_tune_resumes_to_the_uninterrupted_fit(tmp_path, prior_scale):
    prior = Prior.load(write_prior(tmp_path / "prior.pt"))
    X, y = load_digits_images()
    X, y = X[:120], y[:120]
    reference = _fine_tune(prior, tmp_path / "a", prior_scale=prior_scale).fit(X, y)
    with pytest.raises(KeyboardInterrupt, match="partly trained"):
        _fine_tune(prior, tmp_path / "b", prior_scale=prior_scale, extra=[("stop", _StopAfter(4))]).fit(X, y)
    resumed = _fine_tune(prior, tmp_path / "b", resume=True, prior_scale=prior_scale).fit(X, y)
    assert len(resumed.history) == 6 and resumed.prior_scale_ == reference.prior_scale_
    np.testing.assert_array_equal(resumed.predict_proba(X), reference.predict_proba(X))
    if prior_scale == "evidence":
        assert resumed.evidence_trace_ == reference.evidence_trace_ and len(reference.evidence_trace_) == 4
    # A finished fine-tune resumed: no epoch left, the same model (BatchNorm statistics recomputed again).
    again = _fine_tune(prior, tmp_path / "a", resume=True, prior_scale=prior_scale).fit(X, y)
    np.testing.assert_array_equal(again.predict_proba(X), reference.predict_proba(X))


def test_fine_tune_checkpoints_refuse_what_they_cannot_resume(tmp_path):
    prior = Prior.load(write_prior(tmp_path / "prior.pt"))
    X, y = load_digits_images()
    X, y = X[:64], y[:64]
    _fine_tune(prior, tmp_path / "run", max_epochs=2).fit(X, y)
    with pytest.raises(CheckpointError, match=r"lr=0.05, but this run has lr=0.1"):
        _fine_tune(prior, tmp_path / "run", resume=True, max_epochs=2, lr=0.1).fit(X, y)
    with pytest.raises(CheckpointError, match=r"n_train=64, but this run has n_train=48"):
        _fine_tune(prior, tmp_path / "run", resume=True, max_epochs=2).fit(X[:48], y[:48])
    with pytest.raises(CheckpointError, match="prior"):
        other = Prior.load(write_prior(tmp_path / "other.pt", width=8))
        _fine_tune(other, tmp_path / "run", resume=True, max_epochs=2).fit(X, y)
    with pytest.raises(OutputExistsError, match="already holds a checkpoint"):
        _fine_tune(prior, tmp_path / "run", max_epochs=2).fit(X, y)
    with pytest.raises(CheckpointError, match="inference='swag' cannot be resumed"):
        _fine_tune(prior, tmp_path / "swag", max_epochs=4, inference="swag", n_samples=2).fit(X, y)


FINETUNE_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from sklearn_bayes_transfer.cli.app import app
    torch.set_num_threads(1)
    when, count = int(sys.argv[1]), [0]
    step = torch.optim.SGD.step
    def killing_step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == when:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args, **kwargs)
    torch.optim.SGD.step = killing_step
    app(sys.argv[2:])
""")


def test_finetune_command_killed_and_resumed(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 8)
    common = ["finetune", "--prior", str(prior), "--data", str(data), "--max-epochs", "5", "--batch-size", "8",
              "--device", "cpu", "--quiet"]
    whole = runner.invoke(app, [*common, "--out", str(tmp_path / "a.pt"), "--checkpoint-dir", str(tmp_path / "a")])
    assert whole.exit_code == 0, whole.output
    killed = subprocess.run([sys.executable, "-c", FINETUNE_CHILD, "8", *common, "--out", str(tmp_path / "b.pt"),
                             "--checkpoint-dir", str(tmp_path / "b")], check=False, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "b.pt").exists() and (tmp_path / "b" / CHECKPOINT_FILE).exists()
    resumed = runner.invoke(app, [*common, "--out", str(tmp_path / "b.pt"), "--checkpoint-dir", str(tmp_path / "b"),
                                  "--resume"])
    assert resumed.exit_code == 0, resumed.output
    X, _ = load_image_folder(data, image_size=(8, 8))
    np.testing.assert_array_equal(load_model(tmp_path / "b.pt").predict_proba(X),
                                  load_model(tmp_path / "a.pt").predict_proba(X))
    one_line_error(runner.invoke(app, [*common, "--out", str(tmp_path / "c.pt"), "--checkpoint-dir",
                                       str(tmp_path / "b")]), "already holds a checkpoint")
    one_line_error(runner.invoke(app, [*common, "--out", str(tmp_path / "c.pt"), "--checkpoint-dir",
                                       str(tmp_path / "b"), "--resume", "--lr", "0.2"]), "lr=0.05", "lr=0.2")
    one_line_error(runner.invoke(app, [*common, "--out", str(tmp_path / "c.pt"), "--resume"]),
                   "--resume needs --checkpoint-dir")
    assert not (tmp_path / "c.pt").exists()
