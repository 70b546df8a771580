"""PriorFitter: learn a posterior over a backbone on a source task with SWAG, export it as a prior.

The source task is supervised classification (a linear head) or SimCLR self-supervision (two
augmented views, NT-Xent loss, an MLP projector; :mod:`~sklearn_bayes_transfer.simclr`). The head or projector is trained with the
backbone but is not part of the prior. After training, the SWAG mean is loaded into the
backbone, BatchNorm running statistics are recomputed for it on the (unaugmented) source data,
and the posterior is exported in the convention of ``docs/design.md``, ``Sigma = diag(variance) + F^T F``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNet
from skorch.callbacks import Callback, ProgressBar
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ._device import resolve_device, seeded
from ._validation import HasMethods, Integral, Interval, Options, Real, check_params, qualified_name
from ._version import __version__
from .backbones import (
    BackboneWithHead,
    backbone_arguments,
    backbone_meta,
    feature_dim_of,
    get_backbone,
)
from .checkpoint import (
    EpochCheckpoint,
    prepare_checkpoint_dir,
    read_checkpoint,
    restore_net,
)
from .data import Preprocess, as_image_tensor, load_image_folder, prepare_images
from .distributed import (
    accelerated,
    is_main_process,
    launched_processes,
    make_accelerator,
    reduce_batchnorm_,
)
from .exceptions import ConfigError, DataError, TrainingDivergedError
from .optim import OptimizerName, optimizer_arguments
from .prior import Prior
from .simclr import NTXentLoss, SimCLRAugment, TwoViewDataset
from .swag import CollectUnit, SwagCallback, SwagSchedule

__all__ = ["PriorFitter", "SourceTask"]

# Up to this many images (evenly spaced) estimate the normalisation of a lazily loaded dataset.
_PREPROCESS_SAMPLE = 2048


class SourceTask(str, Enum):
    """What the backbone learns on the source data.

    - ``"supervised"``: classification of ``y`` with a linear head;
    - ``"simclr"``: contrastive self-supervision (no labels needed), NT-Xent over two augmented
      views of each image, through an MLP projector.
    """

    SUPERVISED = "supervised"
    SIMCLR = "simclr"



# -- data adapters --------------------------------------------------------------------------------
class _PreparedDataset(Dataset):
    """A user dataset's images as preprocessed float tensors, with encoded targets (or 0)."""

    def __init__(self, dataset: Dataset, preprocess: Preprocess | None, codes: np.ndarray | None) -> None:
        self.dataset = dataset
        self.preprocess = preprocess
        self.codes = codes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = _image_of(self.dataset[index], index)
        if self.preprocess is not None:
            x = self.preprocess(x)
        return x, int(self.codes[index]) if self.codes is not None else 0


def _image_of(item: Any, index: int) -> torch.Tensor:
    x = item[0] if isinstance(item, (tuple, list)) else item
    try:
        return as_image_tensor(x[None])[0]
    except (TypeError, IndexError) as exc:
        raise DataError(f"dataset item {index} does not hold an image array or tensor ({exc})") from None


def _recording_size(preprocess: Preprocess, size: Any) -> Preprocess:
    """``preprocess`` with the source images' size recorded when it has none: downstream data is
    resized to what the backbone saw (``docs/recipe.md``). Resizing to its own size changes nothing."""
    if preprocess.image_size is not None:
        return preprocess
    return dataclasses.replace(preprocess, image_size=(int(size[0]), int(size[1])))


def _label_of(item: Any, index: int) -> Any:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"supervised fitting needs labels, but dataset item {index} is not an (image, label) "
                        "pair; pass y, or use source_task='simclr'")
    label = item[1]
    return label.item() if hasattr(label, "item") else label


class _FiniteLoss(Callback):
    """Stop with a clear message when a training loss stops being finite."""

    def on_batch_end(self, net: Any, batch: Any = None, training: bool = False, **kwargs: Any) -> None:
        loss = kwargs.get("loss")
        if training and loss is not None and not bool(torch.isfinite(loss.detach())):
            epoch = len(net.history)
            raise TrainingDivergedError(f"the source training loss became {float(loss.detach())} in epoch {epoch}; "
                                        f"lower lr (now {net.lr}) or swag_lr, or increase batch_size")


# -- the estimator ---------------------------------------------------------------------------------
class PriorFitter(BaseEstimator):
    """Learn a SWAG posterior over a backbone on a source task and export it as a prior.

    Training runs ``max_epochs`` epochs of SGD with momentum at ``lr``; from epoch ``swag_start`` on
    the learning rate follows ``swag_schedule`` around ``swag_lr`` and a SWAG snapshot of the
    backbone's weights is taken every ``collect_every`` epochs (or steps). At the end the SWAG
    mean is loaded into the backbone, BatchNorm statistics are recomputed for it on the source
    images (unaugmented), and :attr:`prior_` is built with
    ``variance = 0.5 * clamp(diag, var_clamp)`` and ``factor = Dev^T / sqrt(2 (rank - 1))``.

    Parameters
    ----------
    backbone : str or nn.Module, default="resnet18"
        A registered backbone name (see :func:`~sklearn_bayes_transfer.backbones.list_backbones`)
        or an ``nn.Module`` returning ``(N, feature_dim)`` features (it is copied, never
        modified). A module that is not registered can be used, but the prior then records its
        class name only and downstream code must be given the module again.
    backbone_kwargs : dict, optional
        Arguments for a registered backbone. ``in_channels`` defaults to the channels of the
        (preprocessed) images and, for ResNets, ``small_input`` to ``True`` for images of at most
        64 pixels a side.
    source_task : {"supervised", "simclr"}, default="supervised"
        See :class:`SourceTask`.
    max_epochs : int, default=30
        Total training epochs, collection included.
    lr : float, default=0.05
        Learning rate before collection (and the top of cosine cycles).
    optimizer : {"sgd", "adam", "fop"} or torch.optim.Optimizer class, default="sgd"
        See :class:`~sklearn_bayes_transfer.optim.OptimizerName`.
    momentum, weight_decay : float, default=0.9, 5e-4
        SGD settings.
    batch_size : int, default=128
        Images per optimizer step. Launched with several processes, each process takes an equal
        share of every batch (``batch_size`` must be a multiple of the process count), so the run
        does what one process with this batch size does.
    shuffle : bool, default=True
        Shuffle the source images every epoch. ``False`` keeps their order, which makes runs with
        different process counts comparable step by step.
    swag_start : int, optional
        Epochs of ordinary training before SWAG collection starts; by default half of ``max_epochs``.
    swag_lr : float, default=0.01
        Learning rate during collection (the low end of cosine cycles).
    swag_schedule : {"constant", "cosine"}, default="constant"
        Learning rate schedule during collection, see :class:`~sklearn_bayes_transfer.swag.SwagSchedule`.
    rank : int, default=10
        Number ``K >= 2`` of deviation columns in the low-rank factor. At least ``rank`` snapshots
        must be collected.
    collect_every : int, default=1
        Take a snapshot every this many ``collect_unit``.
    collect_unit : {"epoch", "step"}, default="epoch"
    var_clamp : float, default=1e-8
        Lower clamp of the raw SWAG diagonal (the stored variance of a clamped weight is half).
    simclr_temperature : float, default=0.5
        NT-Xent temperature of SimCLR.
    projection_dim : int, default=64
        Output size of the SimCLR projector.
    augment_flip : bool, default=True
        Random horizontal flips in SimCLR views.
    augment_noise : float, default=0.1
        Standard deviation of the Gaussian noise added to SimCLR views (normalised units).
    image_size : int or (int, int), optional
        Resize images to this size; by default they keep their size. Either way the size the
        backbone saw is recorded in ``prior_.meta["preprocess"]``, and downstream estimators and
        commands resize their images to it.
    preprocess : Preprocess or dict, optional
        Fixed preprocessing (recorded as given); by default the per-channel mean and std are
        fitted on ``X``. Recorded in ``prior_.meta["preprocess"]`` either way.
    device : str, default="cpu"
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).
    random_state : int or None, default=0
        Seeds torch's RNG (initialisation, shuffling, augmentation) for the duration of ``fit``;
        the caller's RNG state is restored afterwards. ``None`` uses the current state.
    num_workers : int, default=0
        DataLoader worker processes for training.
    accelerator : accelerate.Accelerator, optional
        Train through it (skorch's ``AccelerateMixin``). By default one is made, with
        ``split_batches=True``, when the run was launched with several processes (``torchrun``,
        ``accelerate launch``: ``WORLD_SIZE > 1``), and none in a plain run. Then SWAG is collected
        from the all-reduced weights, BatchNorm statistics at the SWAG mean are reduced over every
        process's share of the source set, and only the main process writes checkpoints and the
        prior file (``docs/resume.md``).
    checkpoint_dir : str or path, optional
        Write a checkpoint there at the end of every epoch (atomically: weights, optimizer state,
        RNG states, history and the SWAG moments). A run killed at any moment loses at most one
        epoch: fit again with ``resume=True``. See ``docs/resume.md``.
    resume : bool, default=False
        Continue from the checkpoint in ``checkpoint_dir`` (a fresh start if there is none). The
        result is the one an uninterrupted run gives (bit for bit on the CPU with a fixed seed).
        Without it, a directory that holds a checkpoint is refused rather than overwritten.
    verbose : int, default=0
        ``> 0`` prints one line per epoch and shows a progress bar.

    Attributes
    ----------
    prior_ : Prior
        The exported prior over the backbone's parameters.
    history_ : skorch.history.History
        Per-epoch training record (``train_loss``, ``swag_snapshots``, ...).
    net_ : skorch.NeuralNet
        The trained net; its ``module_.backbone`` holds the SWAG mean with recomputed BatchNorm
        statistics.
    backbone_ : nn.Module
        That backbone.
    preprocess_ : Preprocess
        Preprocessing applied to the source images.
    classes_ : numpy.ndarray
        Source class labels (supervised only).

    Examples
    --------
    >>> from sklearn_bayes_transfer.datasets import load_digits_images
    >>> X, y = load_digits_images()
    >>> fitter = PriorFitter(backbone="small_cnn", backbone_kwargs={"width": 4}, max_epochs=3,
    ...                      swag_start=1, rank=2, batch_size=256).fit(X[:300], y[:300])
    >>> fitter.prior_.rank, fitter.prior_.meta["source_task"]
    (2, 'supervised')
    >>> fitter.save_prior("digits_prior.pt")                       # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        backbone_kwargs: Mapping[str, Any] | None = None,
        source_task: SourceTask | str = "supervised",
        max_epochs: int = 30,
        lr: float = 0.05,
        optimizer: str | type = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 128,
        shuffle: bool = True,
        swag_start: int | None = None,
        swag_lr: float = 0.01,
        swag_schedule: SwagSchedule | str = "constant",
        rank: int = 10,
        collect_every: int = 1,
        collect_unit: CollectUnit | str = "epoch",
        var_clamp: float = 1e-8,
        simclr_temperature: float = 0.5,
        projection_dim: int = 64,
        augment_flip: bool = True,
        augment_noise: float = 0.1,
        image_size: int | tuple[int, int] | None = None,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        device: str = "cpu",
        random_state: int | None = 0,
        num_workers: int = 0,
        accelerator: Any = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        verbose: int = 0,
    ) -> None:
        self.backbone = backbone
        self.backbone_kwargs = backbone_kwargs
        self.source_task = source_task
        self.max_epochs = max_epochs
        self.lr = lr
        self.optimizer = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.swag_start = swag_start
        self.swag_lr = swag_lr
        self.swag_schedule = swag_schedule
        self.rank = rank
        self.collect_every = collect_every
        self.collect_unit = collect_unit
        self.var_clamp = var_clamp
        self.simclr_temperature = simclr_temperature
        self.projection_dim = projection_dim
        self.augment_flip = augment_flip
        self.augment_noise = augment_noise
        self.image_size = image_size
        self.preprocess = preprocess
        self.device = device
        self.random_state = random_state
        self.num_workers = num_workers
        self.accelerator = accelerator
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.verbose = verbose

    # -- validation --------------------------------------------------------------------------------
    #: Constraints of the hyperparameters, checked by :meth:`fit` (as scikit-learn's are).
    _parameter_constraints: dict[str, list[Any]] = {
        "backbone": [str, nn.Module],
        "backbone_kwargs": [None, Mapping],
        "source_task": [Options(SourceTask)],
        "max_epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "optimizer": [Options(OptimizerName), type],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "weight_decay": [Interval(Real, 0, None)],
        "batch_size": [Interval(Integral, 1, None)],
        "shuffle": [bool],
        "swag_start": [None, Interval(Integral, 0, None)],
        "swag_lr": [Interval(Real, 0, None, closed="neither")],
        "swag_schedule": [Options(SwagSchedule)],
        "rank": [Interval(Integral, 2, None)],  # the low-rank covariance divides by rank - 1
        "collect_every": [Interval(Integral, 1, None)],
        "collect_unit": [Options(CollectUnit)],
        "var_clamp": [Interval(Real, 0, None, closed="neither")],
        "simclr_temperature": [Interval(Real, 0, None, closed="neither")],
        "projection_dim": [Interval(Integral, 1, None)],
        "augment_flip": [bool],
        "augment_noise": [Interval(Real, 0, None)],
        "preprocess": [None, Preprocess, Mapping],
        "device": [str, torch.device],
        "random_state": [None, Interval(Integral, 0, None)],
        "num_workers": [Interval(Integral, 0, None)],
        "accelerator": [None, HasMethods(["prepare", "unwrap_model"])],
        "checkpoint_dir": [None, str, os.PathLike],
        "resume": [bool],
        "verbose": [Interval(Integral, 0, None), bool],
    }

    # -- validation --------------------------------------------------------------------------------
    def _validate_params(self) -> SourceTask:
        check_params(self.get_params(deep=False), self._parameter_constraints, hints={
            "rank": "SWAG needs rank >= 2 deviation columns, as the low-rank covariance divides by rank - 1; "
                    "typical values are 5 to 20"})
        task = SourceTask(self.source_task)
        if self._swag_start() >= self.max_epochs:
            raise ConfigError(f"swag_start={self._swag_start()} leaves no epoch for SWAG collection with "
                              f"max_epochs={self.max_epochs}; use swag_start < max_epochs")
        if task is SourceTask.SIMCLR and self.batch_size < 2:
            raise ConfigError("SimCLR needs batch_size >= 2: the other images of a batch are the negatives")
        if isinstance(self.backbone, nn.Module) and self.backbone_kwargs:
            raise ConfigError("backbone_kwargs only apply to a registered backbone name; the nn.Module given "
                              "as backbone is used as it is")
        return task

    def _swag_start(self) -> int:
        return int(self.max_epochs) // 2 if self.swag_start is None else int(self.swag_start)

    # -- data ---------------------------------------------------------------------------------------
    def _wanted_channels(self) -> int | None:
        if isinstance(self.backbone, str):
            channels = dict(self.backbone_kwargs or {}).get("in_channels")
            return channels if channels in (1, 3) else None
        return None

    def _fixed_preprocess(self) -> Preprocess | None:
        if self.preprocess is None or isinstance(self.preprocess, Preprocess):
            return self.preprocess
        if isinstance(self.preprocess, Mapping):
            return Preprocess.from_meta(self.preprocess)
        raise ConfigError(f"preprocess must be a Preprocess, a dict from Preprocess.to_meta(), or None; "
                          f"got {type(self.preprocess).__name__}")

    def _prepare_data(self, X: Any, y: Any, task: SourceTask) -> tuple[Dataset, Preprocess, np.ndarray | None]:
        """Return (clean dataset of (image, class code), preprocessing, classes or None)."""
        supervised = task is SourceTask.SUPERVISED
        if isinstance(X, (str, os.PathLike)):
            X, folder_labels = load_image_folder(X, labeled=supervised, image_size=self.image_size,
                                                 channels=self._wanted_channels())
            y = folder_labels if y is None else y
        if isinstance(X, Dataset) and not isinstance(X, torch.Tensor):
            return self._prepare_dataset(X, y, supervised)
        fixed = self._fixed_preprocess()
        preprocess = fixed or Preprocess.fit(X, image_size=self.image_size, channels=self._wanted_channels())
        images = prepare_images(X, preprocess).cpu()
        if fixed is None:
            preprocess = _recording_size(preprocess, images.shape[-2:])
        classes, codes = self._encode(y, images.shape[0], supervised)
        targets = torch.as_tensor(codes if codes is not None else np.zeros(images.shape[0]), dtype=torch.int64)
        return TensorDataset(images, targets), preprocess, classes

    def _prepare_dataset(self, dataset: Dataset, y: Any, supervised: bool
                         ) -> tuple[Dataset, Preprocess, np.ndarray | None]:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise DataError("the dataset is empty; pass at least two images")
        own = getattr(dataset, "preprocess", None)
        fixed = self._fixed_preprocess()
        if isinstance(own, Preprocess):
            # The dataset already normalises its images: record that pipeline, do not apply it twice.
            if fixed is not None and fixed != own:
                raise ConfigError("the dataset applies its own preprocess, which differs from the preprocess "
                                  "hyperparameter; give it in one place only")
            preprocess, apply = own, None
        else:
            if fixed is None:
                picks = np.unique(np.linspace(0, n - 1, min(n, _PREPROCESS_SAMPLE)).astype(int))
                sample = [_image_of(dataset[int(i)], int(i)) for i in picks]
                fixed = Preprocess.fit(sample, image_size=self.image_size, channels=self._wanted_channels())
                fixed = _recording_size(fixed, sample[0].shape[-2:])
            preprocess, apply = fixed, fixed
        labels = None
        if supervised:
            if y is not None:
                labels = y
            elif getattr(dataset, "targets", None) is not None:
                # torchvision-style datasets (and ours): targets index into classes, when given.
                targets = np.asarray(dataset.targets)  # type: ignore[attr-defined]
                names = getattr(dataset, "classes", None)
                labels = np.asarray(names, dtype=object)[targets] if names else targets
            else:
                labels = [_label_of(dataset[i], i) for i in range(n)]
        classes, codes = self._encode(labels, n, supervised)
        return _PreparedDataset(dataset, apply, codes), preprocess, classes

    @staticmethod
    def _encode(y: Any, n: int, supervised: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        if n < 2:
            raise DataError(f"source training needs at least 2 images, got {n}")
        if not supervised:
            return None, None
        if y is None:
            raise DataError("source_task='supervised' needs labels y (or an image folder with one subfolder "
                            "per class); for unlabeled images use source_task='simclr'")
        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
        if y.ndim != 1 or y.shape[0] != n:
            raise DataError(f"y must hold one label per image: got shape {y.shape} for {n} images")
        classes, codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise DataError(f"supervised source training needs at least 2 classes, but every label is "
                            f"{classes[0].tolist()!r}; add images of other classes, or use source_task='simclr' "
                            "(self-supervised, no labels)")
        return classes, codes.astype(np.int64)

    # -- model --------------------------------------------------------------------------------------
    def _build_backbone(self, preprocess: Preprocess, example: torch.Tensor) -> tuple[nn.Module, int]:
        if isinstance(self.backbone, nn.Module):
            backbone = copy.deepcopy(self.backbone)
        else:
            kwargs = dict(self.backbone_kwargs or {})
            accepted = backbone_arguments(self.backbone) or ()
            if "in_channels" in accepted:
                kwargs.setdefault("in_channels", preprocess.channels)
            if "small_input" in accepted:
                kwargs.setdefault("small_input", max(example.shape[-2:]) <= 64)
            backbone = get_backbone(self.backbone, **kwargs)
        name = getattr(backbone, "backbone_name", type(backbone).__name__)
        try:
            dim = feature_dim_of(backbone, example)
            was_training = backbone.training
            backbone.eval()
            with torch.no_grad():
                out = backbone(example[:2])
            backbone.train(was_training)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ConfigError(f"backbone {name!r} cannot process the source images of shape "
                              f"{tuple(example.shape[1:])} ({first}); check in_channels / image_size") from None
        if out.dim() != 2 or out.shape[1] != dim:
            raise ConfigError(f"backbone {name!r} returned features of shape {tuple(out.shape)}, expected "
                              f"(N, {dim}); forward() must return pooled (N, feature_dim) features")
        return backbone, dim

    def _build_head(self, task: SourceTask, dim: int, n_classes: int) -> nn.Module:
        if task is SourceTask.SUPERVISED:
            return nn.Linear(dim, n_classes)
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, int(self.projection_dim)))

    def _swag_callback(self) -> SwagCallback:
        return SwagCallback(start=self._swag_start(), collect_every=int(self.collect_every),
                            unit=self.collect_unit, rank=int(self.rank), lr=float(self.swag_lr),
                            schedule=self.swag_schedule, var_clamp=float(self.var_clamp))

    def _make_net(self, module: nn.Module, task: SourceTask, swag: SwagCallback, device: str,
                  drop_last: bool, checkpoint: EpochCheckpoint | None = None, accelerator: Any = None) -> NeuralNet:
        callbacks: list[tuple[str, Callback]] = [("swag", swag), ("finite_loss", _FiniteLoss())]
        main = accelerator is None or accelerator.is_main_process
        if self.verbose and main:
            callbacks.append(("progress", ProgressBar()))
        if checkpoint is not None:
            callbacks.append(("checkpoint", checkpoint))  # last: it saves what the others left
        criterion_kwargs = {"criterion__temperature": float(self.simclr_temperature)} if task is SourceTask.SIMCLR else {}
        # Several processes: skorch's AccelerateMixin (DDP), which places the module and the batches itself.
        net_class, placement = (NeuralNet, {"device": device}) if accelerator is None else \
            (accelerated(NeuralNet), {"device": None, "accelerator": accelerator,
                                      # print, not the accelerator's: it honours verbose (0 off the main process)
                                      "callbacks__print_log__sink": print})
        return net_class(
            module,
            criterion=NTXentLoss if task is SourceTask.SIMCLR else nn.CrossEntropyLoss,
            lr=float(self.lr),
            **optimizer_arguments(self.optimizer, momentum=float(self.momentum),
                                  weight_decay=float(self.weight_decay)),
            max_epochs=int(self.max_epochs),
            batch_size=int(self.batch_size),
            train_split=None,
            iterator_train__shuffle=bool(self.shuffle),
            iterator_train__drop_last=drop_last,
            iterator_train__num_workers=int(self.num_workers),
            callbacks=callbacks,
            verbose=int(self.verbose) if main else 0,
            **placement,
            **criterion_kwargs,
        )

    # -- fit ---------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> PriorFitter:
        """Train on the source data and export :attr:`prior_`.

        Parameters
        ----------
        X : array-like, torch Dataset or path
            Images ``(N, H, W)`` or ``(N, C, H, W)`` (any float dtype, or ``uint8`` scaled by
            1/255); a torch ``Dataset`` of images or ``(image, label)`` pairs (loaded lazily); or
            the path of an image folder (one subfolder per class; for SimCLR any images below it).
        y : array-like of shape (N,), optional
            Class labels for ``source_task="supervised"`` (any hashable type); ignored by SimCLR.

        Raises
        ------
        ConfigError
            For invalid hyperparameters, including a run that cannot collect ``rank`` snapshots.
        DataError
            For unusable data (one class, no images, unreadable files).
        TrainingDivergedError
            If the training loss becomes NaN or infinite.
        KeyboardInterrupt
            If training is interrupted (Ctrl-C); no prior is exported.
        """
        task = self._validate_params()
        device = resolve_device(self.device)
        for attr in ("prior_", "history_", "net_", "backbone_", "preprocess_", "classes_"):
            self.__dict__.pop(attr, None)
        accelerator = self._make_accelerator(device)
        with seeded(self.random_state, device):
            clean, preprocess, classes = self._prepare_data(X, y, task)
            example = torch.stack([clean[i][0] for i in range(min(2, len(clean)))])
            backbone, dim = self._build_backbone(preprocess, example)
            module = BackboneWithHead(backbone, self._build_head(task, dim, len(classes) if classes is not None else 0))
            train = clean if task is SourceTask.SUPERVISED else TwoViewDataset(
                clean, SimCLRAugment(hflip=bool(self.augment_flip), noise=float(self.augment_noise)))
            # A last batch of one image breaks BatchNorm in training mode (one value per channel).
            drop_last = len(clean) % int(self.batch_size) == 1
            swag = self._swag_callback()
            settings = self._run_settings(len(clean), classes)
            checkpoint = self._checkpoint(swag, settings)
            # Read (and checked against these settings) before anything else can complain.
            resumed = read_checkpoint(checkpoint.path, settings) if checkpoint is not None and self.resume else None
            net = self._make_net(module, task, swag, device, drop_last, checkpoint, accelerator)
            net.initialize()
            planned = self._check_snapshot_plan(swag, len(net.get_iterator(train, training=True)))
            if resumed is not None:
                restore_net(net, resumed, checkpoint.path)
                swag.load_state_dict(resumed["extra"]["swag"], net)
            self.net_ = net
            remaining = int(self.max_epochs) - len(net.history)
            if remaining > 0:
                net.partial_fit(train, None, epochs=remaining)
            if accelerator is not None:
                net._unwrap_accelerator()  # skorch unwraps at the end of training; a finished run resumed has none
            done = sum(1 for row in net.history if "train_loss" in row)
            if done < self.max_epochs or swag.collector_ is None or swag.collector_.n_snapshots < planned:
                # skorch ends training quietly on Ctrl-C; a prior from a cut-short run is not exported.
                kept = f"; the checkpoint in '{self.checkpoint_dir}' keeps them: fit with resume=True to continue" \
                    if checkpoint is not None else ""
                raise KeyboardInterrupt(f"training interrupted after {done} of {self.max_epochs} epochs; "
                                        f"no prior was exported{kept}")
            prior = self._export(net, swag, clean, preprocess, classes, task, device, accelerator)
        self.backbone_ = net.module_.backbone
        self.history_ = net.history
        self.preprocess_ = preprocess
        if classes is not None:
            self.classes_ = classes
        self.prior_ = prior
        return self

    def _make_accelerator(self, device: str) -> Any:
        """The accelerator given, or one for a run launched with several processes, or None."""
        accelerator = self.accelerator
        if accelerator is None and launched_processes() > 1:
            accelerator = make_accelerator(device)
        if accelerator is not None and int(self.batch_size) % accelerator.num_processes:
            raise ConfigError(f"batch_size={self.batch_size} cannot be split over {accelerator.num_processes} "
                              f"processes; use a multiple of {accelerator.num_processes}")
        return accelerator

    # -- checkpoints ---------------------------------------------------------------------------------
    def _run_settings(self, n_examples: int, classes: np.ndarray | None) -> dict[str, Any]:
        """What a resumed run must share with the checkpointed one: every setting that shapes the
        result (not the device, the workers or the log), the data size and the classes."""
        ignored = {"device", "num_workers", "verbose", "checkpoint_dir", "resume", "accelerator"}
        settings = {k: v for k, v in self.get_params(deep=False).items() if k not in ignored}
        if isinstance(self.backbone, nn.Module):
            settings["backbone"] = type(self.backbone).__name__
            settings["backbone_parameters"] = sum(p.numel() for p in self.backbone.parameters())
        if isinstance(self.preprocess, Preprocess):
            settings["preprocess"] = self.preprocess.to_meta()
        if isinstance(self.optimizer, type):
            settings["optimizer"] = qualified_name(self.optimizer)
        settings["n_source_examples"] = int(n_examples)
        settings["classes"] = None if classes is None else [str(c) for c in classes]
        return settings

    def _checkpoint(self, swag: SwagCallback, settings: dict[str, Any]) -> EpochCheckpoint | None:
        if self.checkpoint_dir is None:
            if self.resume:
                raise ConfigError("resume=True needs checkpoint_dir: the directory of the run to continue")
            return None
        path = prepare_checkpoint_dir(self.checkpoint_dir, resume=bool(self.resume))
        return EpochCheckpoint(path, settings, extra_state=lambda net: {"swag": swag.state_dict()})

    def _check_snapshot_plan(self, swag: SwagCallback, steps_per_epoch: int) -> int:
        planned = swag.planned_snapshots(int(self.max_epochs), steps_per_epoch)
        if planned < self.rank:
            raise ConfigError(
                f"this run would collect {planned} SWAG snapshot(s) (max_epochs={self.max_epochs}, "
                f"swag_start={self._swag_start()}, collect_every={self.collect_every} "
                f"{CollectUnit(self.collect_unit).value}(s), {steps_per_epoch} step(s) per epoch) but "
                f"rank={self.rank} needs at least {self.rank}; to get more, train more epochs after "
                "swag_start, lower swag_start, or use a smaller collect_every (or collect_unit='step'); "
                "or lower the rank")
        return planned

    def _export(self, net: NeuralNet, swag: SwagCallback, clean: Dataset, preprocess: Preprocess,
                classes: np.ndarray | None, task: SourceTask, device: str, accelerator: Any = None) -> Prior:
        backbone = net.module_.backbone
        swag.collector_.apply_mean()
        share: Dataset = clean
        if accelerator is not None and accelerator.num_processes > 1:
            # Every process recomputes the statistics on its share of the source set; then they are pooled.
            share = Subset(clean, range(accelerator.process_index, len(clean), accelerator.num_processes))
            device = str(accelerator.device)
        per_process = max(int(self.batch_size) // (accelerator.num_processes if accelerator else 1), 1)
        # A last batch of one image breaks BatchNorm in training mode (one value per channel).
        loader = DataLoader(share, batch_size=per_process, shuffle=False, num_workers=int(self.num_workers),
                            drop_last=len(share) % per_process == 1)
        update_bn(loader, backbone, device=torch.device(device))
        reduce_batchnorm_(backbone, len(share))
        # num_batches_tracked is kept so that backbone.load_state_dict(..., strict=True) works.
        buffers = {name: b.detach().cpu().clone() for name, b in backbone.named_buffers()}
        meta = self._meta(net, backbone, preprocess, classes, task, len(clean))
        meta["n_processes"] = accelerator.num_processes if accelerator is not None else 1
        return swag.to_prior(buffers=buffers, meta=meta)

    def _meta(self, net: NeuralNet, backbone: nn.Module, preprocess: Preprocess, classes: np.ndarray | None,
              task: SourceTask, n_examples: int) -> dict[str, Any]:
        described = backbone_meta(backbone)
        meta: dict[str, Any] = {}
        if described is None:
            meta.update(backbone=type(backbone).__name__, backbone_kwargs={},
                        backbone_note="custom nn.Module, not in the backbone registry: pass the same module "
                                      "to downstream estimators")
        else:
            meta.update(described)
        meta.update(
            source_task=task.value, preprocess=preprocess.to_meta(), library_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            max_epochs=int(self.max_epochs), lr=float(self.lr), momentum=float(self.momentum),
            weight_decay=float(self.weight_decay), batch_size=int(self.batch_size),
            random_state=None if self.random_state is None else int(self.random_state), n_source_examples=int(n_examples),
            final_train_loss=float(net.history[-1, "train_loss"]),
            batchnorm="running statistics recomputed for the SWAG mean on the unaugmented source data",
        )
        if classes is not None:
            meta.update(n_classes=len(classes), classes=[str(c) for c in classes])
        else:
            meta.update(simclr_temperature=float(self.simclr_temperature), projection_dim=int(self.projection_dim),
                        augment={"crop_scale": [0.5, 1.0], "hflip": bool(self.augment_flip),
                                 "noise": float(self.augment_noise)})
        return meta

    def save_prior(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write :attr:`prior_` atomically to ``path`` (an interrupted write leaves no file).

        In a run launched with several processes only the main process writes; the others return
        ``path`` at once.

        Raises
        ------
        OutputExistsError
            If ``path`` exists and ``overwrite`` is ``False``.
        """
        check_is_fitted(self, "prior_")
        if not is_main_process():
            return Path(path)
        return self.prior_.save(path, overwrite=overwrite)
