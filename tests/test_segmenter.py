"""PriorRegularizedSegmenter: shapes, loss, metrics, search, persistence and bad input.

Tiny ``small_cnn`` (width 4) priors and 12x12 / 13x11 images; a few epochs per fit.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.model_selection import GridSearchCV
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit
from skorch.history import History
from torch import nn

from sklearn_bayes_transfer import ConfigError, DataError, Prior
from sklearn_bayes_transfer.augment import Augment
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.batchnorm import batchnorm_buffers
from sklearn_bayes_transfer.data import JointTransform, Preprocess, SegmentationDataset
from sklearn_bayes_transfer.heads import DeepLabV3Head, FCNHead, SegmentationModel
from sklearn_bayes_transfer.metrics import mean_iou, miou_scorer
from sklearn_bayes_transfer.modelfile import load_model, save_model
from sklearn_bayes_transfer.segmenter import (
    IGNORE_TARGET,
    EpochMeanIoU,
    PriorRegularizedSegmenter,
)

CLASSES = (0, 3, 7)  # non-contiguous ids, so label <-> index mix-ups show




def make_prior(rank: int = 2, seed: int = 0) -> Prior:
    """A small_cnn (width 4) prior around random weights, with a random low-rank part."""
    with torch.random.fork_rng():  # leaves the caller's seed in charge of the head's initialisation
        torch.manual_seed(seed)
        base = Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01)
    factor = 0.05 * torch.randn(rank, base.n_params, generator=torch.Generator().manual_seed(seed))
    return Prior(base.mean, base.variance, factor, names=base.names, shapes=base.shapes,
                 buffers=base.buffers, meta=base.meta)


def make_squares(n: int = 12, size: tuple[int, int] = (12, 12), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images with one bright rectangle each; class 3 at intensity 1.0, class 7 at 0.5."""
    rng = np.random.default_rng(seed)
    h, w = size
    X = 0.05 * rng.random((n, h, w)).astype(np.float32)
    masks = np.zeros((n, h, w), dtype=np.int64)
    for i in range(n):
        top, left = rng.integers(0, h - 5), rng.integers(0, w - 5)
        bottom, right = top + rng.integers(4, 6), left + rng.integers(4, 6)
        label = (3, 7)[i % 2]
        X[i, top:bottom, left:right] = 1.0 if label == 3 else 0.5
        masks[i, top:bottom, left:right] = label
    return X, masks


def segmenter(prior: Prior | None = None, **kwargs) -> PriorRegularizedSegmenter:
    options = dict(max_epochs=3, lr=0.1, batch_size=4, verbose=0)
    options.update(kwargs)
    return PriorRegularizedSegmenter(make_prior() if prior is None else prior, **options)


def fitted(X, masks, seed: int = 0, **kwargs) -> PriorRegularizedSegmenter:
    torch.manual_seed(seed)
    return segmenter(**kwargs).fit(X, masks)


# -- shapes and probabilities -------------------------------------------------------------------
@pytest.mark.parametrize("preprocess", ["auto", Preprocess(image_size=(8, 8), channels=1, mean=(0.2,), std=(0.3,))],
                         ids=["native-size", "resized-to-8x8"])
@pytest.mark.parametrize("head", ["fcn", "deeplabv3"])
def test_masks_come_back_at_the_odd_input_size(preprocess, head):
    X, masks = make_squares(n=8, size=(13, 11))
    seg = fitted(X, masks, preprocess=preprocess, head=head)
    proba = seg.predict_proba(X[:3])
    pred = seg.predict(X[:3])
    assert seg.classes_.tolist() == list(CLASSES)
    assert proba.shape == (3, 3, 13, 11)
    assert pred.shape == (3, 13, 11)
    # softmax over the class dimension (dim 1), not the last one (W = 11 != C = 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pred, np.asarray(CLASSES)[proba.argmax(axis=1)])


def test_predicted_logits_are_upsampled_from_the_resized_input():
    X, masks = make_squares(n=6, size=(13, 11))
    pre = Preprocess(image_size=(8, 8), channels=1, mean=(0.2,), std=(0.3,))
    seg = fitted(X, masks, preprocess=pre)
    seg.module_.eval()
    with torch.no_grad():
        small = seg.module_(pre(torch.from_numpy(X[:2, None])))
    assert small.shape[-2:] == (8, 8)
    expected = torch.softmax(F.interpolate(small, size=(13, 11), mode="bilinear", align_corners=False), dim=1)
    np.testing.assert_allclose(seg.predict_proba(X[:2]), expected.numpy(), atol=1e-5)


def test_segmentation_model_output_size_and_heads():
    backbone = get_backbone("small_cnn", width=4)
    for head in (FCNHead(16, 5), DeepLabV3Head(16, 5)):
        net = SegmentationModel(backbone, head)
        assert net(torch.zeros(2, 1, 13, 11)).shape == (2, 5, 13, 11)


# -- loss and targets -----------------------------------------------------------------------------
def test_targets_are_encoded_and_ignored_pixels_marked():
    X, masks = make_squares(n=4)
    masks[0, 0, :3] = 255
    seg = fitted(X, masks, max_epochs=1)
    _, yt = seg._prepare_Xy(X, torch.from_numpy(masks))
    expected = np.select([masks == 0, masks == 3, masks == 7, masks == 255], [0, 1, 2, IGNORE_TARGET], -1)
    np.testing.assert_array_equal(yt.numpy(), expected)


def test_loss_is_mean_cross_entropy_over_counted_pixels():
    X, masks = make_squares(n=4)
    seg = fitted(X, masks, max_epochs=1)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    target[0, 1:3] = IGNORE_TARGET
    counted = target != IGNORE_TARGET
    log_p = torch.log_softmax(logits, dim=1)
    nll = -log_p.gather(1, target.clamp_min(0)[:, None])[:, 0]
    expected = nll[counted].mean()
    assert float(seg.get_loss(logits, target, training=False)) == pytest.approx(float(expected), rel=1e-6)


def test_masks_are_resized_nearest_when_the_prior_resizes():
    X, masks = make_squares(n=4, size=(12, 12))
    pre = Preprocess(image_size=(6, 6), channels=1, mean=(0.2,), std=(0.3,))
    seg = fitted(X, masks, preprocess=pre, max_epochs=1)
    Xt, yt = seg._prepare_Xy(X, torch.from_numpy(masks))
    assert tuple(Xt.shape) == (4, 1, 6, 6)
    # 12 -> 6 with nearest-exact keeps every second pixel, starting at index 1
    expected = np.select([masks == 0, masks == 3, masks == 7], [0, 1, 2])[:, 1::2, 1::2]
    np.testing.assert_array_equal(yt.numpy(), expected)


def test_the_prior_covers_the_backbone_and_the_rest_is_head():
    X, masks = make_squares(n=8)
    seg = fitted(X, masks)
    backbone_ids = {id(p) for p in seg.module_.backbone.parameters()}
    head_ids = {id(p) for p in seg.module_.head.parameters()}
    assert {id(p) for p in seg.prior_params_} == backbone_ids
    assert {id(p) for p in seg.head_params_} == head_ids
    assert all(np.isfinite(seg.history[:, "prior_nll"])) and seg.history[-1, "prior_nll"] > 0


def test_standard_finetuning_starts_at_the_prior_mean_without_penalty():
    X, masks = make_squares(n=4)
    prior = make_prior()
    seg = segmenter(prior, prior_structure="none", max_epochs=1, lr=0.0).fit(X, masks)
    start = torch.cat([p.detach().reshape(-1) for p in seg.module_.backbone.parameters()])
    torch.testing.assert_close(start, prior.mean)
    assert seg.penalty_ is None
    seg.set_params(lr=0.1).fit(X, masks)
    assert seg.history[-1, "prior_nll"] == 0.0


def test_it_learns_the_rectangles():
    X, masks = make_squares(n=16, seed=0)
    X_test, masks_test = make_squares(n=8, seed=1)
    seg = fitted(X, masks, max_epochs=None, prior_scale=1e4, head_weight_decay=1e-3)  # the default recipe
    before = fitted(X, masks, max_epochs=1, lr=1e-6).score(X_test, masks_test)
    after = seg.score(X_test, masks_test)
    # held-out canvases; an untrained head scores about 0.03-0.3
    assert after > 0.55 and after > before + 0.25


def test_epoch_mean_iou_matches_metrics():
    """The per-epoch mIoU, summed batch by batch, equals mean_iou over all the epoch's pixels."""
    rng = np.random.default_rng(0)
    net = type("Net", (), {"classes_": np.array([0, 3, 7, 9]), "history": History()})()
    net.history.new_epoch()
    callback = EpochMeanIoU(on_train=True)
    callback.on_epoch_begin(net)
    truths, preds = [], []
    for n in (3, 2):
        logits = torch.as_tensor(rng.normal(size=(n, 4, 5, 6)), dtype=torch.float32)
        truth = torch.as_tensor(rng.integers(0, 3, (n, 5, 6)))  # class index 3 never true
        truth[0, 0, :4] = IGNORE_TARGET
        callback.on_batch_end(net, batch=(torch.zeros(n, 1, 5, 6), truth), training=True, y_pred=logits)
        callback.on_batch_end(net, batch=(torch.zeros(n, 1, 5, 6), 1 - truth), training=False, y_pred=-logits)
        truths.append(truth.numpy())
        preds.append(logits.argmax(1).numpy())
    callback.on_epoch_end(net)
    expected = mean_iou(np.concatenate(truths), np.concatenate(preds), 4, ignore_index=IGNORE_TARGET)
    assert net.history[-1, "train_miou"] == pytest.approx(expected, abs=1e-12)



def test_the_segmenter_logs_mean_iou_per_epoch():
    X, masks = make_squares(n=8)
    seg = fitted(X, masks, max_epochs=2, train_split=ValidSplit(4, stratified=False))
    assert all(0.0 <= seg.history[i, key] <= 1.0 for i in (0, 1) for key in ("train_miou", "valid_miou"))


# -- metrics and search ---------------------------------------------------------------------------
def test_score_is_mean_iou_of_the_prediction():
    X, masks = make_squares(n=8)
    masks[1, :2] = 255  # ignored rows
    seg = fitted(X, masks, max_epochs=4)
    pred = seg.predict(X)
    counted = masks != 255
    ious = []
    for c in CLASSES:  # hand computation: IoU over counted pixels, classes present somewhere
        inter = np.sum((masks == c) & (pred == c) & counted)
        union = np.sum(((masks == c) | (pred == c)) & counted)
        if union:
            ious.append(inter / union)
    index = {c: i for i, c in enumerate(CLASSES)}
    encode = np.vectorize(lambda v: index.get(int(v), 255))
    assert seg.score(X, masks) == pytest.approx(np.mean(ious), abs=1e-12)
    assert seg.score(X, masks) == pytest.approx(mean_iou(encode(masks), encode(pred), 3, ignore_index=255))


def test_grid_search_over_prior_scale_with_the_miou_scorer():
    X, masks = make_squares(n=8)
    torch.manual_seed(0)
    search = GridSearchCV(segmenter(max_epochs=2), {"prior_scale": [1e-2, 1e3]}, scoring=miou_scorer, cv=2)
    search.fit(X, masks)
    scores = search.cv_results_["mean_test_score"]
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    best = search.best_estimator_
    assert best.prior_scale == search.best_params_["prior_scale"]
    assert search.score(X, masks) == pytest.approx(best.score(X, masks))
    assert search.predict(X[:2]).shape == (2, 12, 12)


# -- persistence and other inputs -----------------------------------------------------------------
def test_pickle_round_trip_predicts_the_same():
    X, masks = make_squares(n=6)
    seg = fitted(X, masks, prior_scale=10.0)
    again = pickle.loads(pickle.dumps(seg))
    np.testing.assert_array_equal(again.predict_proba(X), seg.predict_proba(X))
    assert again.classes_.tolist() == list(CLASSES) and again.prior_scale == 10.0
    again.partial_fit(X, masks)
    assert len(again.history) == len(seg.history) + seg.max_epochs


@pytest.mark.parametrize("head", ["fcn", "deeplabv3"])
def test_model_file_round_trip(tmp_path, head):
    X, masks = make_squares(n=6, size=(13, 11))
    pre = Preprocess(image_size=(8, 8), channels=1, mean=(0.2,), std=(0.3,))
    seg = fitted(X, masks, head=head, preprocess=pre, ignore_index=9)
    loaded = load_model(save_model(seg, tmp_path / "seg.pt"))
    assert type(loaded) is PriorRegularizedSegmenter and loaded.prior is None
    assert loaded.classes_.tolist() == list(CLASSES) and loaded.ignore_index == 9 and loaded.head == head
    np.testing.assert_allclose(loaded.predict_proba(X), seg.predict_proba(X), atol=1e-6)
    np.testing.assert_array_equal(loaded.predict(X), seg.predict(X))
    assert loaded.score(X, masks) == seg.score(X, masks)


def test_bayesian_model_averaging_over_pixels():
    X, masks = make_squares(n=6, size=(13, 11))
    seg = fitted(X, masks, inference="swag", n_samples=3, max_epochs=4, sample_lr=0.05, random_state=0)
    proba = seg.predict_proba(X[:2])
    net = seg.module_.eval()
    saved = [t.detach().clone() for t in net.state_dict().values()]
    inputs = seg._prepare_X(X[:2])
    expected = 0.0
    with torch.no_grad():
        for weights, stats in zip(seg.samples_, seg.sample_buffers_):
            torch.nn.utils.vector_to_parameters(weights, net.parameters())
            torch.nn.utils.vector_to_parameters(stats, [b for _, b in batchnorm_buffers(net)])
            expected = expected + torch.softmax(net(inputs), dim=1) / len(seg.samples_)
        for t, value in zip(net.state_dict().values(), saved):
            t.copy_(value)
    assert len(seg.samples_) == 3 and proba.shape == (2, 3, 13, 11)
    np.testing.assert_allclose(proba, expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(seg.predict(X[:2]), np.asarray(CLASSES)[proba.argmax(axis=1)])
    assert not np.allclose(proba, seg.set_params(inference="map").predict_proba(X[:2]), atol=1e-4)


def test_a_dataset_of_pairs_fits_like_arrays():
    X, masks = make_squares(n=6)
    from_arrays = fitted(X, masks)
    from_dataset = fitted(SegmentationDataset(X[:, None], masks), None)
    np.testing.assert_allclose(from_dataset.predict_proba(X), from_arrays.predict_proba(X), atol=1e-6)
    with pytest.raises(ConfigError, match="augment="):
        fitted(SegmentationDataset(X, masks, transform=JointTransform(crop_size=8)), None)


def test_channels_last_inputs_and_single_channel_masks():
    X, masks = make_squares(n=6)
    seg = fitted(X[..., None], masks[:, None])
    assert seg.predict(X[..., None]).shape == (6, 12, 12)


def test_augment_pads_with_ignored_pixels_and_only_in_training():
    X, masks = make_squares(n=4)
    crop = JointTransform(crop_size=(16, 14), hflip=False, ignore_index=255,
                          generator=torch.Generator().manual_seed(0))
    seen = []

    class Shapes(Callback):
        def on_train_begin(self, net, **kwargs):
            net.module_.register_forward_pre_hook(
                lambda module, args: seen.append((module.training, tuple(args[0].shape[-2:]))))

    seg = fitted(X, masks, augment=crop, max_epochs=1, callbacks=[("shapes", Shapes())])
    # Training batches were cropped (padded) to 16 x 14; the BatchNorm update and predict see the images.
    assert (True, (16, 14)) in seen
    seen.clear()
    assert seg.predict(X).shape == (4, 12, 12)
    assert seen and all(size == (12, 12) for _, size in seen)
    # The padding is marked as ignored in the encoded masks, whatever ignore_index the transform had.
    Xt, yt = seg._prepare_Xy(X, torch.from_numpy(masks))
    image, mask = seg._augment_batch(crop, Xt[:1], yt[:1])
    assert tuple(image.shape) == (1, 1, 16, 14) and tuple(mask.shape) == (1, 16, 14)
    assert (mask[0, 12:] == IGNORE_TARGET).all() and (mask[0, :, 12:] == IGNORE_TARGET).all()
    torch.testing.assert_close(mask[0, :12, :12], yt[0])
    small = JointTransform(crop_size=8, generator=torch.Generator().manual_seed(0))
    seg = fitted(X, masks, augment=small, max_epochs=2)
    assert seg.predict(X).shape == (4, 12, 12)


def test_light_augmentation_moves_images_and_masks_together():
    X, masks = make_squares(n=4)
    seg = fitted(X, masks, max_epochs=1)
    Xt, yt = seg._prepare_Xy(X, torch.from_numpy(masks))
    torch.manual_seed(0)
    images, warped = seg._augment_batch(Augment.LIGHT, Xt, yt)
    assert images.shape == Xt.shape and warped.shape == yt.shape and warped.dtype == yt.dtype
    assert not torch.equal(images, Xt)
    # Each square keeps its class: the warped mask's class-7 pixels are the bright ones of the warped image.
    bright = images[:, 0] > images[:, 0].mean(dim=(1, 2), keepdim=True)
    assert float(((warped != 0) == bright).float().mean()) > 0.95


def test_crops_of_ignored_pixels_only_do_not_stop_training():
    # Rectangles on an ignored background: many 4 x 4 crops see ignored pixels only.
    X, masks = make_squares(n=4)
    masks[masks == 0] = 255
    crop = JointTransform(crop_size=4, hflip=False, generator=torch.Generator().manual_seed(0))
    seg = fitted(X, masks, augment=crop, max_epochs=6, batch_size=2, classes=[3, 7])
    task = [b["task_loss"] for epoch in seg.history for b in epoch["batches"]]
    assert 0.0 in task and all(np.isfinite(task))
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    loss = seg.get_loss(logits, torch.full((2, 3, 3), IGNORE_TARGET), training=True)
    loss.backward()
    assert torch.isfinite(loss) and float(logits.grad.abs().max()) == 0.0


def test_user_module_with_low_resolution_logits():
    class Coarse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    X, masks = make_squares(n=6)
    torch.manual_seed(0)
    seg = PriorRegularizedSegmenter(module=Coarse, max_epochs=2, verbose=0).fit(X, masks)
    assert seg.penalty_ is None and seg.predict_proba(X[:2]).shape == (2, 3, 12, 12)


def test_given_classes_allow_ids_absent_from_training():
    X, masks = make_squares(n=4)
    seg = fitted(X, masks, classes=[0, 3, 7, 9], max_epochs=1)
    assert seg.predict_proba(X[:1]).shape == (1, 4, 12, 12)
    seg = fitted(np.stack([X[0], X[0]]), np.stack([masks[0] * 0, masks[0] * 0 + 1]), classes=2, max_epochs=1)
    assert seg.classes_.tolist() == [0, 1]


# -- bad input --------------------------------------------------------------------------------------
def test_mask_and_image_sizes_must_match():
    X, masks = make_squares(n=4)
    with pytest.raises(DataError, match=r"image X\[0\] is 12x12 but its mask y\[0\] is 12x10"):
        fitted(X, masks[:, :, :10])
    images, maps = list(X), list(masks)
    maps[2] = maps[2][:11]
    with pytest.raises(DataError, match=r"image X\[2\] is 12x12 but its mask y\[2\] is 11x12"):
        fitted(images, maps)
    with pytest.raises(DataError, match="X holds 4 images but y holds 3 masks"):
        fitted(X, masks[:3])
    images[3], maps[2] = images[3][:, :9], masks[2]
    maps[3] = maps[3][:, :9]
    with pytest.raises(DataError, match=r"one size to be stacked: X\[0\] is 12x12 but X\[3\] is 12x9"):
        fitted(images, maps)


def test_mask_values_outside_the_classes_are_named():
    X, masks = make_squares(n=4)
    masks[2, 5, 6] = 5
    with pytest.raises(DataError, match=r"mask y\[2\] holds the value 5 \(row 5, column 6\)"):
        fitted(X, masks, classes=[0, 3, 7])
    with pytest.raises(DataError, match="label 5"):
        fitted(X, make_squares(n=4)[1], max_epochs=1).score(X, masks)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_rgb_masks_are_refused(layout):
    X, masks = make_squares(n=4)
    rgb = np.stack([masks] * 3, axis=-1 if layout == "channels_last" else 1)
    with pytest.raises(DataError, match="RGB"):
        fitted(X, rgb)


def test_bad_settings_are_refused():
    X, masks = make_squares(n=4)
    with pytest.raises(ConfigError, match="ignore_index=3 is also one of classes"):
        fitted(X, masks, classes=[0, 3, 7], ignore_index=3)
    with pytest.raises(ConfigError, match="stratified"):
        fitted(X, masks, train_split=ValidSplit(2, stratified=True))
    with pytest.raises(ConfigError, match="criterion__ignore_index"):
        fitted(X, masks, criterion__ignore_index=255)
    with pytest.raises(ConfigError, match="head="):
        fitted(X, masks, head="unet")
    with pytest.raises(DataError, match="at least two classes"):
        fitted(X, np.zeros_like(masks))
    empty = masks.copy()
    empty[1] = 255
    with pytest.raises(DataError, match=r"mask y\[1\] has no pixel of any class"):
        fitted(X, empty)


def test_a_module_with_the_wrong_number_of_outputs_is_named():
    X, masks = make_squares(n=4)
    seg = PriorRegularizedSegmenter(module=nn.Conv2d, module__in_channels=1, module__out_channels=2,
                                    module__kernel_size=1, max_epochs=1, verbose=0)
    with pytest.raises(ConfigError, match=r"n_classes=3"):
        seg.fit(X, masks)


class _SeenBatches(Callback):
    """The training batches as the callbacks receive them."""

    def on_train_begin(self, net, **kwargs):
        self.shapes_ = []

    def on_batch_end(self, net, batch=None, training=False, y_pred=None, **kwargs):
        if training:
            self.shapes_.append((tuple(batch[0].shape), tuple(batch[1].shape), tuple(y_pred.shape)))


def test_callbacks_and_train_miou_see_the_augmented_batch():
    # 8 x 8 crops of 12 x 12 images: the masks scored for train_miou must be the cropped ones the network saw.
    X, masks = make_squares(n=8)
    seen = _SeenBatches()
    crop = JointTransform(crop_size=8, hflip=False, generator=torch.Generator().manual_seed(0))
    seg = fitted(X, masks, augment=crop, max_epochs=1, callbacks=[("seen", seen)])
    assert seen.shapes_ and all(image[-2:] == (8, 8) and mask[-2:] == (8, 8) and logits[-2:] == (8, 8)
                                for image, mask, logits in seen.shapes_)
    assert np.isfinite(seg.history[-1, "train_miou"])
