"""Prior fitting and fine-tuning launched with two CPU processes (torchrun, gloo): the one-process results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_folder, write_prior
from sklearn_bayes_transfer.cli.app import app
from torch import nn
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior, PriorRegularizedClassifier, load_model
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.distributed import reduce_batchnorm_
from sklearn_bayes_transfer.exceptions import ConfigError
from sklearn_bayes_transfer.fitter import PriorFitter

pytest.importorskip("accelerate")
runner = CliRunner()

# A BatchNorm-free backbone, fixed data order: one process with batch 64 and two with 32 each must
# take the same steps.
FIT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    from sklearn_bayes_transfer.datasets import load_digits_images
    from sklearn_bayes_transfer.fitter import PriorFitter
    torch.set_num_threads(1)
    X, y = load_digits_images()
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    fitter = PriorFitter(backbone=backbone, max_epochs=4, swag_start=2, rank=2, batch_size=64, shuffle=False,
                         random_state=0, device="cpu").fit(X[:256], y[:256])
    fitter.save_prior(sys.argv[1], overwrite=False)
""")


def _torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], check=False, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_two_processes_learn_the_one_process_prior(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(FIT)
    two = _torchrun(str(script), str(tmp_path / "two.pt"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], check=False, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = Prior.load(tmp_path / "one.pt"), Prior.load(tmp_path / "two.pt")
    assert (a.meta["n_processes"], b.meta["n_processes"]) == (1, 2)
    torch.testing.assert_close(b.mean, a.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.variance, a.variance, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(b.factor, a.factor, rtol=1e-3, atol=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.py", "one.pt", "two.pt"]  # nothing half-written


def test_fit_prior_command_under_torchrun_writes_one_file_and_checkpoint(tmp_path):
    data = write_folder(tmp_path / "imgs", 8)
    common = ["-m", "sklearn_bayes_transfer.cli", "fit-prior", "--data", str(data), "--backbone", "small_cnn",
              "--backbone-kwargs", '{"width": 4}', "--max-epochs", "4", "--rank", "2", "--batch-size", "8",
              "--device", "cpu", "--quiet"]
    run = _torchrun(*common, "--out", str(tmp_path / "p.pt"), "--checkpoint-dir", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1, run.stdout  # the main process reports
    prior = Prior.load(tmp_path / "p.pt")
    assert prior.meta["n_processes"] == 2 and prior.buffers  # BatchNorm statistics reduced and stored
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint.pt"]
    # The two-process checkpoint resumes in one process (the batch is the same global batch).
    again = runner.invoke(app, [*common[2:], "--out", str(tmp_path / "q.pt"), "--checkpoint-dir",
                                str(tmp_path / "run"), "--resume"])
    assert again.exit_code == 0, again.output
    torch.testing.assert_close(Prior.load(tmp_path / "q.pt").mean, prior.mean)


def _pool_worker(rank: int, port: int, shares: list[np.ndarray], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layer = nn.BatchNorm1d(3)
        share = torch.as_tensor(shares[rank], dtype=torch.float32)
        layer.running_mean.copy_(share.mean(0))
        layer.running_var.copy_(share.var(0, unbiased=False))
        reduce_batchnorm_(layer, len(share))
        if rank == 0:
            torch.save({"mean": layer.running_mean, "var": layer.running_var}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_batchnorm_statistics_are_pooled_over_the_processes(tmp_path):
    rng = np.random.default_rng(0)
    shares = [rng.normal(1.0, 2.0, (7, 3)), rng.normal(-3.0, 0.5, (13, 3))]  # unequal shares
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_pool_worker, args=(port, shares, str(tmp_path / "out.pt")), nprocs=2)
    pooled = torch.load(tmp_path / "out.pt", weights_only=True)
    union = np.concatenate(shares)
    np.testing.assert_allclose(pooled["mean"].numpy(), union.mean(0), rtol=1e-5)
    np.testing.assert_allclose(pooled["var"].numpy(), union.var(0), rtol=1e-5)


def test_launched_without_accelerate_or_with_an_uneven_batch(monkeypatch):
    X, y = load_digits_images()
    small = dict(backbone="small_cnn", backbone_kwargs={"width": 4}, max_epochs=2, swag_start=0, rank=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # not installed
    with pytest.raises(ConfigError, match=r"launched with 2 processes.*pip install 'sklearn-bayes-transfer\[distributed\]'"):
        PriorFitter(**small).fit(X[:64], y[:64])
    monkeypatch.delenv("WORLD_SIZE")

    class TwoProcesses:  # what PriorFitter reads of an Accelerator before training
        num_processes = 2

        def prepare(self, *args):
            return args

        def unwrap_model(self, model):
            return model

    with pytest.raises(ConfigError, match="batch_size=33 cannot be split over 2 processes; use a multiple of 2"):
        PriorFitter(**small, batch_size=33, accelerator=TwoProcesses()).fit(X[:64], y[:64])
    with pytest.raises(ConfigError, match="accelerator=.* expected None or an object with prepare"):
        PriorFitter(**small, accelerator="yes").fit(X[:64], y[:64])


FINETUNE = textwrap.dedent("""
    import copy, sys
    import torch
    from torch import nn
    from sklearn_bayes_transfer import Prior, PriorRegularizedClassifier
    from sklearn_bayes_transfer.backbones import BackboneWithHead
    from sklearn_bayes_transfer.datasets import load_digits_images
    from sklearn_bayes_transfer.distributed import is_main_process
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    X, y = load_digits_images()
    clf = PriorRegularizedClassifier(Prior.from_module(mlp, variance=0.01),
                                     module=BackboneWithHead(copy.deepcopy(mlp), nn.Linear(16, 10)), max_epochs=5,
                                     batch_size=32, augment="none", iterator_train__shuffle=False, verbose=0,
                                     random_state=0, prior_scale=sys.argv[2]).fit(X[:256], y[:256])
    if is_main_process():
        torch.save({"state": clf.module_.state_dict(), "scale": clf.prior_scale_}, sys.argv[1])
""")


@pytest.mark.parametrize("prior_scale", ["auto", "evidence"])
def test_two_processes_fine_tune_as_one(tmp_path, prior_scale):
    script = tmp_path / "finetune.py"
    script.write_text(FINETUNE)
    two = _torchrun(str(script), str(tmp_path / "two.pt"), prior_scale)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt"), prior_scale], check=False,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert b["scale"] == pytest.approx(a["scale"], rel=1e-4)
    for key, value in a["state"].items():
        torch.testing.assert_close(b["state"][key], value, rtol=1e-4, atol=1e-6)


def test_finetune_command_under_torchrun_writes_one_model(tmp_path):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 8)
    run = _torchrun("-m", "sklearn_bayes_transfer.cli", "finetune", "--prior", str(prior), "--data", str(data),
                    "--out", str(tmp_path / "m.pt"), "--max-epochs", "3", "--batch-size", "8", "--device", "cpu",
                    "--quiet", "--checkpoint-dir", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1, run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "m.pt", "prior.pt", "run"]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint.pt"]
    X, _ = load_image_folder(data, image_size=(8, 8))
    assert load_model(tmp_path / "m.pt").predict(X).shape == (len(X),)


def test_what_cannot_run_on_several_processes_says_so(tmp_path, monkeypatch):
    prior = write_prior(tmp_path / "prior.pt")
    data = write_folder(tmp_path / "imgs", 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["tune", "--prior", str(prior), "--data", str(data)],
                    ["compare", "--prior", str(prior), "--data", str(data), "--test", str(data)]):
        one_line_error(runner.invoke(app, command), f"{command[0]} was launched with 2 processes", "--n-jobs")
    X, y = load_digits_images()
    with pytest.raises(ConfigError, match="inference='sgld' cannot train on 2 processes"):
        PriorRegularizedClassifier(Prior.load(prior), inference="sgld").fit(X[:32], y[:32])
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ConfigError, match=r"launched with 2 processes.*pip install"):
        PriorRegularizedClassifier(Prior.load(prior)).fit(X[:32], y[:32])
