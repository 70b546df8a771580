"""Resumable prior fitting: a run killed (SIGKILL) at any moment and resumed gives the uninterrupted prior."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import one_line_error, write_folder
from sklearn_bayes_transfer.cli.app import app
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.checkpoint import CHECKPOINT_FILE
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
    import json
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
