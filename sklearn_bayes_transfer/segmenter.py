"""``PriorRegularizedSegmenter``: semantic segmentation fine-tuned with a learned prior.

The network is the prior's backbone (rebuilt from its metadata, initialised at the prior mean)
followed by a new segmentation head on the backbone's last feature maps; its logits are
upsampled bilinearly to the input size. The loss is the per-pixel cross-entropy (mean over the
pixels that are not ``ignore_index``) plus the prior terms of
:class:`~sklearn_bayes_transfer.regularized.PriorRegularizedMixin`, with ``N`` the number of
training *images*: each image counts as one example.

Masks hold class ids in the user's values (``0..C-1``, or any integers); internally they are
encoded to indices of ``classes_`` with ignored pixels set to :data:`IGNORE_TARGET`, the
cross-entropy's default ``ignore_index``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from skorch import NeuralNet
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit, unpack_data
from torch import nn

from ._validation import Integral, Interval, Options, as_numpy
from .augment import augment_batch
from .data import JointTransform, as_image_tensor, as_mask_tensor, resize_masks
from .exceptions import ConfigError, DataError
from .heads import (
    DeepLabV3Head,
    FCNHead,
    SegmentationHead,
    SegmentationModel,
    build_segmentation_head,
    resize_logits,
)
from .metrics import IGNORE_TARGET, encode_masks, mean_iou_from_confusion, miou_scorer
from .recipe import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MIN_STEPS,
    DEFAULT_WARMUP,
    TrainLoader,
)
from .regularized import PriorRegularizedMixin

__all__ = [
    "EpochMeanIoU",
    "IGNORE_TARGET",
    "PriorRegularizedSegmenter",
    "SegmentationHead",
]



class EpochMeanIoU(Callback):
    """Mean IoU of one epoch's training (or validation) batches, recorded as ``train_miou``
    (``valid_miou``) in ``history``.

    It sums a pixel confusion matrix over the logits each step has already computed: no second
    pass over the data, and no logits kept (they would be N x classes x H x W). Training batches are
    scored as the network saw them, in training mode and augmented, as skorch's cached
    ``EpochScoring`` scores them. Classes absent from both truth and prediction are left out of the
    mean (:func:`~sklearn_bayes_transfer.metrics.mean_iou_from_confusion`).

    Parameters
    ----------
    on_train : bool
        Score the training batches (``train_miou``), else the validation batches (``valid_miou``).
    """

    def __init__(self, on_train: bool) -> None:
        self.on_train = on_train

    def on_epoch_begin(self, net: Any, **kwargs: Any) -> None:
        self.confusion_: torch.Tensor | None = None

    def on_batch_end(self, net: Any, batch: Any = None, training: bool = False, y_pred: Any = None,
                     **kwargs: Any) -> None:
        if training != self.on_train or y_pred is None:
            return
        _, truth = unpack_data(batch)
        n = len(net.classes_)
        with torch.no_grad():
            predicted = resize_logits(y_pred, tuple(truth.shape[-2:])).argmax(dim=1)
            truth = truth.to(predicted.device)
            counted = truth != IGNORE_TARGET
            counts = torch.bincount(truth[counted] * n + predicted[counted], minlength=n * n).reshape(n, n)
        self.confusion_ = counts if self.confusion_ is None else self.confusion_ + counts

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        confusion = getattr(self, "confusion_", None)
        if confusion is None:
            return
        confusion = confusion.cpu().numpy()
        value = mean_iou_from_confusion(confusion) if confusion.sum() else float("nan")
        net.history.record(f"{'train' if self.on_train else 'valid'}_miou", value)


class PriorRegularizedSegmenter(PriorRegularizedMixin, NeuralNet):
    """Semantic segmenter fine-tuned with ``pixel cross-entropy + prior negative log-density``.

    With only ``prior`` given, the backbone is rebuilt from the prior's metadata, initialised at
    the prior mean (with the prior's BatchNorm statistics), and a new segmentation head is put
    on its last feature maps (``backbone.forward_features``); the logits are upsampled to the
    input size. The loss per batch is

        mean pixel cross-entropy + 0.5 * r^T (prior_scale * Sigma + prior_eps * I)^{-1} r / N
                                 + 0.5 * head_weight_decay * |w_head|^2 / N

    with ``r`` the backbone weights minus the prior mean and ``N`` the number of training images.
    Pixels whose mask value is ``ignore_index`` count in neither the loss nor :meth:`score`.

    Parameters
    ----------
    prior : Prior, str or path, default=None
        The prior (or a prior file). ``None`` needs ``module`` and means plain fine-tuning.
    module : nn.Module class or instance, default=None
        Your own network mapping images ``(N, C, H, W)`` to logits ``(N, n_classes, h, w)``
        (upsampled to the input size if ``(h, w)`` differs). ``None`` builds
        :class:`SegmentationModel` from the prior's backbone and ``head``.
    classes : int or sequence of int, default=None
        The class ids the masks use, in the order of ``predict_proba``'s channels; an int ``C``
        means ``0..C-1``. ``None`` takes the ids found in the training masks (sorted). Give them
        when a class may be missing from the training masks.
    ignore_index : int or None, default=255
        Mask value of pixels to skip (borders, void); must not be a class id. ``None``: none.
    head : {"fcn", "deeplabv3"}, default="fcn"
        See :class:`SegmentationHead`.
    max_epochs, min_steps, lr, lr_schedule, warmup, batch_size, batchnorm
        The training recipe, as in :class:`~sklearn_bayes_transfer.PriorRegularizedClassifier`.
    prior_scale, prior_scale_bounds, prior_eps, prior_structure, head_weight_decay, prior_update, factor_dtype
        As in :class:`~sklearn_bayes_transfer.PriorRegularizedClassifier`. With
        ``prior_scale="evidence"`` each image's likelihood is its mean pixel log-likelihood, as
        in the loss.
    preprocess : "auto", None, Preprocess or dict, default="auto"
        Input preprocessing. ``"auto"`` applies the prior's recorded channels and normalisation
        (or ones fitted on the training images if the prior has none) but keeps each image's
        size: a fully convolutional network reads any size, and shrinking a 512 x 512 tile to a
        prior's 32 x 32 would lose the detail masks need. A Preprocess or dict with an
        ``image_size`` resizes: masks are then resized with nearest-neighbour for training and
        predictions come back at each input's own size.
    augment : {"light", "light-flip", "none"}, JointTransform or callable, default="light"
        Augmentation of training batches, applied to images and masks alike (masks resampled
        with nearest neighbours): small random shifts, zooms and rotations (no flips), the same
        plus left-right flips, or none (see :class:`~sklearn_bayes_transfer.augment.Augment`).
        A :class:`~sklearn_bayes_transfer.data.JointTransform`'s padding is always marked as
        ignored. Another callable receives each preprocessed image ``(C, H, W)`` and its mask
        ``(H, W)`` encoded as indices of ``classes_`` with ignored pixels equal to
        :data:`IGNORE_TARGET`, and must keep that encoding.
    inference : {"map", "swag", "sgld", "laplace"}, default="map"
        ``"map"``: predict with the fitted weights. ``"swag"``: collect a SWAG posterior over the
        whole network during the last part of fine-tuning and average ``predict_proba`` (per
        pixel) over ``n_samples`` draws from it. ``"sgld"``: run stochastic-gradient Langevin
        dynamics on the same loss over the last part, with a cyclical step size, and average over
        ``n_samples`` iterates. ``"laplace"``: draws from the Laplace posterior after MAP
        fine-tuning. See :mod:`sklearn_bayes_transfer.bayes`.
    n_samples : int, default=20
        Posterior samples averaged by ``predict_proba`` (SWAG draws or SGLD iterates).
    sample_start : float, default=0.5
        Fraction of ``max_epochs`` trained before SWAG collection or SGLD sampling starts.
    sample_every : int, default=1
        Epochs between SWAG snapshots or SGLD samples.
    sgld_temperature : float, default=1.0
        SGLD temperature ``T >= 0``: 1 samples the posterior, < 1 a cold posterior, 0 adds no noise.
    sgld_cycles : int, default=4
        Cosine step size cycles over the SGLD phase; samples come from the low half of each.
    sample_lr : float, optional
        Learning rate of SWAG collection, and the top of SGLD's cycles (default: ``lr``).
    inference_device : str, default="cpu"
        Where the samples (``samples_``, float32 ``(n_samples, n_parameters)``) are kept.
    random_state : int, optional
        Seeds the SGLD noise and the SWAG draws (``None``: drawn from torch's global generator,
        so ``torch.manual_seed`` makes a fit reproducible).
    criterion, optimizer, train_split, callbacks, device, ...
        As in :class:`skorch.NeuralNet`. The criterion gets ``ignore_index`` set for you.
        ``train_split`` defaults to ``None`` (train on all images); a validation split must not
        be stratified (masks have no single label per image).

    Attributes
    ----------
    classes_ : ndarray
        The class ids, in the order of ``predict_proba``'s channels.
    prior_ : Prior or None
    preprocess_ : Preprocess or None
    n_train_ : int
        Number of training images of the last fit (the ``N`` of the loss).
    prior_scale_, evidence_trace_, prior_update_, training_plan_
        As in :class:`~sklearn_bayes_transfer.PriorRegularizedClassifier`.
    module_ : nn.Module
    samples_, sample_buffers_ : torch.Tensor
        With ``inference`` ``"swag"``, ``"sgld"`` or ``"laplace"``: the posterior samples over
        ``module_.parameters()`` and their BatchNorm statistics (see
        :class:`~sklearn_bayes_transfer.PriorRegularizedClassifier`).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_bayes_transfer import Prior
    >>> from sklearn_bayes_transfer.backbones import get_backbone
    >>> prior = Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01)
    >>> rng = np.random.default_rng(0)
    >>> X = rng.random((6, 13, 11)).astype("float32")
    >>> masks = (X > 0.5).astype(np.int64) * 7           # class ids 0 and 7
    >>> seg = PriorRegularizedSegmenter(prior, max_epochs=2, verbose=0).fit(X, masks)
    >>> seg.classes_.tolist(), seg.predict(X[:2]).shape, seg.predict_proba(X[:2]).shape
    ([0, 7], (2, 13, 11), (2, 2, 13, 11))
    """

    _resize_to_prior = False

    def __init__(
        self,
        prior=None,
        module=None,
        *args: Any,
        criterion=nn.CrossEntropyLoss,
        train_split=None,
        classes=None,
        ignore_index: int | None = 255,
        head: str = "fcn",
        max_epochs: int | None = None,
        lr: float = DEFAULT_LR,
        batch_size: int = DEFAULT_BATCH_SIZE,
        iterator_train=TrainLoader,
        min_steps: int = DEFAULT_MIN_STEPS,
        lr_schedule: str = "cosine",
        warmup: float = DEFAULT_WARMUP,
        augment: Any = "light",
        batchnorm: str = "recompute",
        prior_scale: float | str = "auto",
        prior_scale_bounds: tuple[float, float] | None = None,
        prior_eps: float = 0.0,
        prior_structure: str = "lowrank",
        head_weight_decay: float = 1.0,
        prior_update: str = "auto",
        factor_dtype: str | None = None,
        preprocess: Any = "auto",
        inference: str = "map",
        n_samples: int = 20,
        sample_start: float = 0.5,
        sample_every: int = 1,
        sgld_temperature: float = 1.0,
        sgld_cycles: int = 4,
        sample_lr: float | None = None,
        inference_device: str = "cpu",
        random_state: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, *args, criterion=criterion, train_split=train_split, max_epochs=max_epochs, lr=lr,
                         batch_size=batch_size, iterator_train=iterator_train, **kwargs)
        self.prior = prior
        self.min_steps = min_steps
        self.lr_schedule = lr_schedule
        self.warmup = warmup
        self.augment = augment
        self.batchnorm = batchnorm
        self.classes = classes
        self.ignore_index = ignore_index
        self.head = head
        self.prior_scale = prior_scale
        self.prior_scale_bounds = prior_scale_bounds
        self.prior_eps = prior_eps
        self.prior_structure = prior_structure
        self.head_weight_decay = head_weight_decay
        self.prior_update = prior_update
        self.factor_dtype = factor_dtype
        self.preprocess = preprocess
        self.inference = inference
        self.n_samples = n_samples
        self.sample_start = sample_start
        self.sample_every = sample_every
        self.sgld_temperature = sgld_temperature
        self.sgld_cycles = sgld_cycles
        self.sample_lr = sample_lr
        self.inference_device = inference_device
        self.random_state = random_state


    # -- hyperparameters -------------------------------------------------------------------------
    _parameter_constraints: dict[str, list[Any]] = {
        "ignore_index": [None, Interval(Integral, None, None)],
        "head": [Options(SegmentationHead)],
    }

    def _check_segmenter_params(self) -> None:
        if "ignore_index" in self.get_params_for("criterion"):
            raise ConfigError("set ignore_index on the segmenter (ignore_index=...), not criterion__ignore_index: "
                              "the criterion sees encoded masks, whose ignored pixels the segmenter marks itself")
        split = self.train_split
        if isinstance(split, ValidSplit) and split.stratified:
            raise ConfigError("a stratified validation split needs one label per image, but masks have one per "
                              "pixel; use train_split=ValidSplit(cv, stratified=False)")

    # -- masks -----------------------------------------------------------------------------------
    def _fit_classes(self, masks: torch.Tensor) -> None:
        """Learn ``classes_`` from the training masks, or check the given ``classes``."""
        ignore = self.ignore_index
        if self.classes is None:
            values = torch.unique(masks).numpy()
            classes = values[values != ignore] if ignore is not None else values
            if len(classes) < 2:
                found = ", ".join(str(v) for v in values.tolist())
                raise DataError(f"the training masks hold {len(classes)} class id(s) besides ignore_index={ignore} "
                                f"(values found: {found}); segmentation needs at least two classes; pass "
                                "classes=[...] if some are missing from these masks")
        else:
            classes = _given_classes(self.classes)
            if ignore is not None and ignore in set(classes.tolist()):
                raise ConfigError(f"ignore_index={ignore} is also one of classes={classes.tolist()}; choose an ignore "
                                  "value that no class uses")
        self.classes_fitted_ = classes

    def _encode(self, masks: torch.Tensor) -> torch.Tensor:
        """Mask values -> indices of ``classes_``; ``ignore_index`` -> :data:`IGNORE_TARGET`."""
        encoded = torch.from_numpy(encode_masks(masks.numpy(), self.classes_, self.ignore_index,
                                                where=lambda n: f"mask y[{n}]"))
        counted = (encoded != IGNORE_TARGET).flatten(1).any(1)
        if not bool(counted.all()):
            first = int((~counted).nonzero()[0])
            raise DataError(f"mask y[{first}] has no pixel of any class (all ignore_index={self.ignore_index}), so "
                            "it gives no training signal and a batch of such masks has an undefined loss; drop it")
        return encoded

    # -- inputs ----------------------------------------------------------------------------------
    def _prepare_Xy(self, X: Any, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images and encoded masks at the preprocessed size."""
        Xt = self._prepare_X(X)
        yt = resize_masks(self._encode(masks), tuple(Xt.shape[-2:]))
        return Xt, yt

    # -- sklearn / skorch entry points -----------------------------------------------------------
    def fit(self, X, y=None, **fit_params):
        """Fine-tune on images ``X`` and masks ``y``.

        Parameters
        ----------
        X : array-like
            Images ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (or a list of them), or a
            torch Dataset of ``(image, mask)`` pairs with ``y=None`` (read once into memory; use
            ``augment`` for random transforms).
        y : array-like of int, shape (N, H, W)
            Class ids per pixel, same height and width as the images (or ``(N, 1, H, W)``).
            Colour masks are refused: convert colours to class ids first.

        Raises
        ------
        DataError
            For masks that do not match their images (the index of the first mismatching pair is
            named), RGB masks, or mask values outside ``classes`` (the value is named).
        ConfigError
            For invalid hyperparameters.
        """
        return super().fit(X, y, **fit_params)

    def _fit_inputs(self, X: Any, y: Any) -> tuple[Any, Any]:
        X, y = _pairs_from_dataset(X, y)
        if y is None:
            raise DataError("y is required: pass masks (N, H, W) of class ids, or a Dataset of (image, mask) pairs")
        return X, _checked_masks(X, y)

    def _learn_targets(self, X: Any, masks: Any) -> Any:
        self._check_segmenter_params()
        self._fit_classes(masks)
        return masks

    def initialize_criterion(self):
        super().initialize_criterion()
        if hasattr(self.criterion_, "ignore_index"):
            self.criterion_.ignore_index = IGNORE_TARGET
        return self

    def _augment_batch(self, augment: Any, X: Any, y: Any) -> tuple[Any, Any]:
        if isinstance(augment, JointTransform):
            # Padding must be ignored in the encoded targets, whatever value the user chose.
            augment = JointTransform(augment.crop_size, hflip=augment.hflip, ignore_index=IGNORE_TARGET,
                                     generator=augment.generator)
        return augment_batch(augment, X, y)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        n_classes = len(self.classes_)
        if y_pred.dim() != 4 or y_pred.shape[1] != n_classes:
            raise ConfigError(f"the module returned logits of shape {tuple(y_pred.shape)}; a segmenter's module must "
                              f"return (N, n_classes={n_classes}, H, W)")
        return super().get_loss(resize_logits(y_pred, tuple(y_true.shape[-2:])), y_true, X=X, training=training)

    #: Each image's likelihood is its mean pixel log-likelihood, as in the loss.
    _likelihood_positions = "mean"

    def _likelihood_logits(self, output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return resize_logits(output, tuple(inputs.shape[-2:]))

    def _task_loss(self, y_pred, y_true, X=None, training=False):
        if not bool((y_true != IGNORE_TARGET).any()):
            # A random crop can hold ignored pixels only: the batch has nothing to learn from. The
            # criterion's mean over zero pixels would be 0/0 = NaN and stop training as diverged.
            return y_pred.sum() * 0.0
        return super()._task_loss(y_pred, y_true, X=X, training=training)

    @property
    def _default_callbacks(self):
        return [*super()._default_callbacks, ("train_miou", EpochMeanIoU(on_train=True)),
                ("valid_miou", EpochMeanIoU(on_train=False))]

    def _get_predict_nonlinearity(self):
        if isinstance(self.predict_nonlinearity, str) and self.predict_nonlinearity == "auto":
            self.check_is_fitted()
            # skorch's 'auto' takes the softmax over the last dimension; classes are dimension 1 here.
            return partial(torch.softmax, dim=1)
        return super()._get_predict_nonlinearity()

    def _proba(self, Xt: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """The network's class probabilities for preprocessed ``Xt``, upsampled to ``size``."""
        nonlin = self._get_predict_nonlinearity()
        out = []
        for logits in self.forward_iter(Xt, training=False, device=self.device):
            logits = logits[0] if isinstance(logits, tuple) else logits
            # Upsample the logits, not the probabilities, so argmax sees the interpolated scores.
            out.append(nonlin(resize_logits(logits, size)).cpu().numpy())
        return np.concatenate(out, axis=0)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(N, C, H, W)`` at the inputs' size, channels in the order of ``classes_``.

        With ``inference`` ``"swag"`` or ``"sgld"``, the average over the posterior samples.
        """
        self._check_fitted()
        X, _ = _pairs_from_dataset(X, None, images_only=True)
        X = self._validate_X(X, reset=False)
        size = _image_size(X)
        Xt = self._prepare_X(X)
        return self._bayes_average(lambda: self._proba(Xt, size))

    def score(self, X, y, sample_weight=None) -> float:
        """Mean intersection over union of ``predict(X)`` against masks ``y`` (``ignore_index`` skipped).

        See :func:`sklearn_bayes_transfer.metrics.mean_iou`; classes absent from both truth and
        prediction are left out of the mean.
        """
        if sample_weight is not None:
            raise ConfigError("score does not support sample_weight: mean IoU pools the pixels of all images")
        X, y = _pairs_from_dataset(X, y)
        return miou_scorer(self, X, _checked_masks(X, y).numpy())


    # -- the default network ---------------------------------------------------------------------
    def _build_head(self, backbone: nn.Module) -> nn.Module:
        return build_segmentation_head(self.head, _feature_channels(backbone, self._example_input()),
                                       len(self.classes_))

    @classmethod
    def assemble_network(cls, backbone: nn.Module, head: nn.Module) -> nn.Module:
        return SegmentationModel(backbone, head)

    # -- model files (see sklearn_bayes_transfer.modelfile) --------------------------------------
    def head_spec(self) -> dict[str, Any]:
        """The fitted head as plain values, for a model file."""
        head = getattr(self.module_, "head", None)
        kinds = {FCNHead: SegmentationHead.FCN, DeepLabV3Head: SegmentationHead.DEEPLABV3}
        if type(head) not in kinds:
            raise ConfigError(f"a model file can describe the segmentation heads {[k.value for k in kinds.values()]}, "
                              f"not a {type(head).__name__}; pickle this estimator instead")
        return {"kind": kinds[type(head)].value, "in_channels": head.in_channels, "n_classes": head.n_classes}

    @classmethod
    def head_from_spec(cls, spec: dict[str, Any], backbone: nn.Module) -> nn.Module:
        """A new head from :meth:`head_spec`'s description."""
        try:
            return build_segmentation_head(spec["kind"], int(spec["in_channels"]), int(spec["n_classes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid segmentation head spec {spec!r} ({type(exc).__name__}: {exc})") from None


# -- helpers ----------------------------------------------------------------------------------------
def _given_classes(classes: Any) -> np.ndarray:
    if isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        if classes < 2:
            raise ConfigError(f"classes={classes} is not valid; segmentation needs at least 2 classes")
        return np.arange(int(classes))
    array = np.asarray(classes)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ConfigError(f"classes must be an int or a 1-D sequence of integer class ids, got {classes!r}")
    if len(np.unique(array)) != len(array):
        raise ConfigError(f"classes={array.tolist()} lists a class id twice")
    if len(array) < 2:
        raise ConfigError(f"classes={array.tolist()} is not valid; segmentation needs at least 2 classes")
    return array.astype(np.int64)


def _feature_channels(backbone: nn.Module, example: torch.Tensor) -> int:
    """Channels of ``backbone.forward_features``: its ``feature_channels``, else measured."""
    if not callable(getattr(backbone, "forward_features", None)):
        raise ConfigError(f"backbone {type(backbone).__name__} has no forward_features(x) returning feature maps "
                          "(N, C, h, w), which a segmentation head needs; pass module=... (your own network)")
    channels = getattr(backbone, "feature_channels", None)
    if isinstance(channels, int):
        return channels
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            maps = backbone.forward_features(example)
    finally:
        backbone.train(was_training)
    if maps.dim() != 4:
        raise ConfigError(f"backbone {type(backbone).__name__}.forward_features returned shape {tuple(maps.shape)}, "
                          "expected feature maps (N, C, h, w)")
    return int(maps.shape[1])


def _pairs_from_dataset(X: Any, y: Any, *, images_only: bool = False) -> tuple[Any, Any]:
    """A torch Dataset of images or ``(image, mask)`` pairs -> lists of arrays (read once)."""
    if not isinstance(X, torch.utils.data.Dataset) or isinstance(X, torch.Tensor):
        return X, y
    if getattr(X, "transform", None) is not None:
        raise ConfigError(f"the {type(X).__name__} given has a transform, which would be applied once when it is "
                          "read; pass the random transform to the segmenter as augment=... instead")
    items = [X[i] for i in range(len(X))]
    pairs = all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items)
    if images_only:
        return [as_numpy(item[0] if pairs else item) for item in items], None
    if y is not None or not pairs:
        raise DataError("pass a Dataset of (image, mask) pairs with y=None, or arrays X and y")
    return [as_numpy(image) for image, _ in items], [as_numpy(mask) for _, mask in items]


def _image_size(X: Any) -> tuple[int, int]:
    """Height and width of the images (one size for all; lists of other sizes are refused later)."""
    first = as_image_tensor(X[:1])
    return int(first.shape[2]), int(first.shape[3])


def _mask_hw(shape: tuple[int, ...], where: str) -> tuple[int, int]:
    """Height and width of one mask of ``shape``; colour masks are refused with a clear message."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        if shape[0] == 1:
            return shape[1], shape[2]
        if shape[2] == 1:
            return shape[0], shape[1]
        if shape[0] in (3, 4) or shape[2] in (3, 4):
            raise DataError(f"{where} has shape {shape}, which looks like an RGB(A) colour image; masks must hold "
                            "one class id per pixel, (N, H, W): convert each colour to its class id first")
    raise DataError(f"{where} has shape {shape}; masks must be (N, H, W) (or (N, 1, H, W)) class ids")


def _checked_masks(X: Any, y: Any) -> torch.Tensor:
    """Masks as an int64 tensor ``(N, H, W)``, checked against the images pair by pair."""
    n_images, n_masks = len(X), len(y)
    if n_images != n_masks:
        raise DataError(f"X holds {n_images} images but y holds {n_masks} masks; give one mask per image")
    per_item = isinstance(X, (list, tuple)) or isinstance(y, (list, tuple))
    y_shape = None if per_item else tuple(np.shape(y))
    if y_shape is not None and len(y_shape) != 3 and len(y_shape) != 4:
        raise DataError(f"y has shape {y_shape}; masks must be (N, H, W) (or (N, 1, H, W)) class ids")
    first_hw = None
    for i in range(n_images if per_item else min(n_images, 1)):
        where = f"mask y[{i}]" if per_item else "y"
        mask_hw = _mask_hw(tuple(np.shape(y[i])) if per_item else y_shape[1:], where)
        image_hw = _image_size([X[i]] if per_item else X[:1])
        if image_hw != mask_hw:
            raise DataError(f"image X[{i}] is {image_hw[0]}x{image_hw[1]} but its mask y[{i}] is "
                            f"{mask_hw[0]}x{mask_hw[1]} (height x width); a mask must have its image's size")
        first_hw = first_hw or image_hw
        if image_hw != first_hw:
            raise DataError(f"images and masks in a list must all have one size to be stacked: X[0] is "
                            f"{first_hw[0]}x{first_hw[1]} but X[{i}] is {image_hw[0]}x{image_hw[1]}; resize them "
                            "first (e.g. load_segmentation_folder(..., image_size=...))")
    if per_item:
        y = np.stack([as_numpy(m).reshape(_mask_hw(np.shape(m), "mask")) for m in y])
    elif len(y_shape) == 4 and y_shape[3] == 1 and y_shape[1] != 1:
        y = y[..., 0]
    return as_mask_tensor(y)
