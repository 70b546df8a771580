"""The default fine-tuning recipe: step budget, schedule, shuffled batches, augmentation, BatchNorm
statistics, the default prior scale and the image size a prior records."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback

from sklearn_bayes_transfer import (
    ConfigError,
    Prior,
    PriorFitter,
    PriorRegularizedClassifier,
)
from sklearn_bayes_transfer.augment import Augment, augment_batch, random_affine
from sklearn_bayes_transfer.backbones import get_backbone
from sklearn_bayes_transfer.datasets import load_digits_images
from sklearn_bayes_transfer.recipe import (
    AUTO_SCALE_DECADES,
    TrainLoader,
    epochs_for_steps,
    resolve_prior_scale,
    warmup_cosine_factor,
)
from sklearn_bayes_transfer.segmenter import PriorRegularizedSegmenter


@pytest.fixture(scope="module")
def digits():
    return load_digits_images()


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    return Prior.from_module(get_backbone("small_cnn", width=4), variance=0.01,
                             meta={"preprocess": {"image_size": [8, 8], "channels": 1, "mean": [0.3], "std": [0.3]}})


class LearningRates(Callback):
    """The first parameter group's learning rate at every training step."""

    def on_train_begin(self, net, **kwargs):
        self.lrs = []

    def on_batch_begin(self, net, training=False, **kwargs):
        if training:
            self.lrs.append(net.optimizer_.param_groups[0]["lr"])


# -- step budget and schedule ----------------------------------------------------------------------------
def test_epochs_follow_the_step_budget(digits, prior):
    X, y = digits[0][:100], digits[1][:100]
    record = LearningRates()
    clf = PriorRegularizedClassifier(prior, min_steps=60, verbose=0, random_state=0,
                                     callbacks=[("lrs", record)]).fit(X, y)
    # 100 images in batches of 32: the last batch of 4 (< 32 / 4) is dropped, 3 steps per epoch.
    plan = clf.training_plan_
    assert (plan.steps_per_epoch, plan.epochs, plan.steps, plan.n_train) == (3, 20, 60, 100)
    assert len(clf.history) == 20 and len(record.lrs) == 60
    assert epochs_for_steps(3, 500) == 167 and epochs_for_steps(1563, 500) == 1
    # max_epochs, when given, wins.
    assert PriorRegularizedClassifier(prior, max_epochs=2, verbose=0).fit(X, y).training_plan_.epochs == 2


def test_the_schedule_is_linear_warm_up_then_cosine_as_torch_computes_it(digits, prior):
    X, y = digits[0][:64], digits[1][:64]
    record = LearningRates()
    PriorRegularizedClassifier(prior, min_steps=40, lr=0.2, warmup=0.1, verbose=0, random_state=0,
                               callbacks=[("lrs", record)]).fit(X, y)
    # The same schedule from torch's own schedulers.
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=0.2)
    warm = 4
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warm, total_iters=warm - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40 - warm)], milestones=[warm])
    expected = []
    for _ in range(40):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    np.testing.assert_allclose(record.lrs, expected, rtol=1e-6)
    assert warmup_cosine_factor(0, 10, 0.0) == 1.0 and warmup_cosine_factor(99, 10, 0.2) > 0


def test_constant_schedule_and_base_rate_restored(digits, prior):
    X, y = digits[0][:64], digits[1][:64]
    record = LearningRates()
    PriorRegularizedClassifier(prior, min_steps=10, lr=0.03, lr_schedule="constant", verbose=0,
                               callbacks=[("lrs", record)]).fit(X, y)
    assert record.lrs == [0.03] * 10
    cosine = PriorRegularizedClassifier(prior, min_steps=10, lr=0.03, verbose=0).fit(X, y)
    assert cosine.optimizer_.param_groups[0]["lr"] == 0.03  # partial_fit starts a new schedule from it


def test_swag_collects_at_the_base_rate_after_the_schedule(digits, prior):
    X, y = digits[0][:64], digits[1][:64]
    record = LearningRates()
    clf = PriorRegularizedClassifier(prior, max_epochs=8, lr=0.05, inference="swag", n_samples=2, verbose=0,
                                     random_state=0, callbacks=[("lrs", record)]).fit(X, y)
    # 2 steps per epoch; the schedule covers the 4 epochs before sampling, SWAG collects at lr.
    assert clf.training_plan_.schedule_epochs == 4
    assert record.lrs[:8] != [0.05] * 8 and record.lrs[8:] == [0.05] * 8
    assert clf.history[-1, "posterior_samples"] == 4 and clf.samples_.shape[0] == 2


def test_recipe_arguments_are_checked(digits, prior):
    X, y = digits[0][:20], digits[1][:20]
    for params, needle in [({"warmup": 1.0}, "warmup=1.0"), ({"lr_schedule": "step"}, "lr_schedule='step'"),
                           ({"batchnorm": "frozen"}, "batchnorm='frozen'"), ({"min_steps": 0}, "min_steps=0"),
                           ({"max_epochs": 0}, "max_epochs=0"), ({"augment": "heavy"}, "augment='heavy'"),
                           ({"prior_scale": "big"}, "prior_scale='big'"), ({"prior_scale": -1.0}, "prior_scale=-1.0")]:
        with pytest.raises(ConfigError, match=needle):
            PriorRegularizedClassifier(prior, verbose=0, **params).fit(X, y)


# -- optimizer defaults -------------------------------------------------------------------------------------
def test_sgd_momentum_defaults(digits, prior):
    X, y = digits[0][:20], digits[1][:20]
    fit = lambda **kw: PriorRegularizedClassifier(prior, max_epochs=1, verbose=0, **kw).fit(X, y)  # noqa: E731
    assert fit().optimizer_.param_groups[0]["momentum"] == 0.9
    assert fit(optimizer__momentum=0.5).optimizer_.param_groups[0]["momentum"] == 0.5
    assert fit(inference="sgld", sample_start=0.0, sgld_cycles=1, n_samples=1).optimizer_.param_groups[0][
        "momentum"] == 0.0
    assert "momentum" not in fit(optimizer=torch.optim.Adam).optimizer_.param_groups[0]


# -- batches --------------------------------------------------------------------------------------------------
def test_train_loader_shuffles_and_drops_a_tiny_last_batch():
    data = torch.utils.data.TensorDataset(torch.arange(100.0))
    assert len(TrainLoader(data, batch_size=32)) == 3       # 4 left over: dropped
    assert len(TrainLoader(data, batch_size=30)) == 4       # 10 left over: kept
    assert len(TrainLoader(data, batch_size=200)) == 1      # one partial batch is all there is
    assert len(TrainLoader(data, batch_size=32, drop_last=False)) == 4
    torch.manual_seed(0)
    first = next(iter(TrainLoader(data, batch_size=100)))[0]
    assert sorted(first.tolist()) == list(range(100)) and first.tolist() != list(range(100))
    assert next(iter(TrainLoader(data, batch_size=100, shuffle=False)))[0].tolist() == list(range(100))


# -- augmentation -------------------------------------------------------------------------------------------
def test_random_affine_without_motion_is_the_identity_or_a_flip():
    images = torch.rand(6, 2, 7, 5)
    masks = torch.randint(0, 4, (6, 7, 5))
    same, same_masks = random_affine(images, masks, max_shift=0, min_shift_pixels=0, max_scale=0, max_rotation=0)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    assert torch.equal(same_masks, masks)
    flipped, flipped_masks = random_affine(images, masks, max_shift=0, min_shift_pixels=0, max_scale=0,
                                           max_rotation=0, hflip=True, generator=torch.Generator().manual_seed(3))
    for i in range(6):
        mirror = torch.allclose(flipped[i], images[i].flip(-1), atol=1e-5)
        assert mirror or torch.allclose(flipped[i], images[i], atol=1e-5)
        assert torch.equal(flipped_masks[i], masks[i].flip(-1) if mirror else masks[i])


def test_light_augmentation_moves_images_and_keeps_mask_values():
    images = torch.rand(8, 1, 8, 8)
    masks = torch.randint(0, 3, (8, 8, 8))
    masks[0, 0] = -100  # the ignored marker survives resampling
    a, ma = random_affine(images, masks, generator=torch.Generator().manual_seed(0))
    b, mb = random_affine(images, masks, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(ma, mb)          # reproducible
    assert not torch.allclose(a, images)
    assert set(ma.unique().tolist()) <= {-100, 0, 1, 2} and ma.dtype == masks.dtype
    # Edges repeat: values stay within each image's range (zeros would not be background).
    assert float(a.min()) >= float(images.min()) - 1e-6 and float(a.max()) <= float(images.max()) + 1e-6


def test_only_training_batches_are_augmented(digits, prior):
    X, y = digits[0][:32], digits[1][:32]
    seen = []

    class Inputs(Callback):
        def on_train_begin(self, net, **kwargs):
            net.module_.register_forward_pre_hook(lambda module, args: seen.append((module.training,
                                                                                      args[0].clone())))

    clf = PriorRegularizedClassifier(prior, max_epochs=1, batch_size=32, batchnorm="running", verbose=0,
                                     random_state=0, iterator_train__shuffle=False,
                                     callbacks=[("inputs", Inputs())]).fit(X, y)
    prepared = clf._prepare_X(X)
    (training, batch), = seen
    assert training and batch.shape == prepared.shape and not torch.allclose(batch, prepared)
    seen.clear()
    clf.predict_proba(X)
    assert not seen[0][0] and torch.equal(seen[0][1], prepared)
    # A callable is applied to every training image.
    calls = []
    PriorRegularizedClassifier(prior, max_epochs=1, batch_size=32, verbose=0,
                               augment=lambda image: calls.append(image.shape) or image).fit(X, y)
    assert calls == [(1, 8, 8)] * 32
    assert augment_batch(Augment.NONE, prepared)[0] is prepared


# -- BatchNorm statistics -------------------------------------------------------------------------------------
def test_batchnorm_statistics_are_recomputed_over_the_training_images(digits, prior):
    X, y = digits[0][:64], digits[1][:64]
    clf = PriorRegularizedClassifier(prior, min_steps=20, batch_size=32, verbose=0, random_state=0).fit(X, y)
    bn = clf.module_.backbone.features[1]
    inputs = []
    probe = copy.deepcopy(clf.module_).train()
    probe.backbone.features[1].register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    prepared = clf._prepare_X(X)
    with torch.no_grad():
        for start in (0, 32):  # the prediction batches, unaugmented, in order
            probe(prepared[start:start + 32])
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-4, atol=1e-5)
    running = PriorRegularizedClassifier(prior, min_steps=20, batch_size=32, batchnorm="running", verbose=0,
                                         random_state=0).fit(X, y)
    assert not torch.allclose(running.module_.backbone.features[1].running_mean, means.mean(0), atol=1e-3)


def test_eval_mode_agrees_with_train_mode_on_resized_real_digits(digits):
    """Issue #11: 100 real digits resized (8x8 -> 16x16), batches of 32 (a last batch of 4): eval-mode
    predictions on the training images match the train-mode network's within a point."""
    X, y = digits
    fitter = PriorFitter(backbone="small_cnn", backbone_kwargs={"width": 8}, max_epochs=6, rank=2, image_size=16,
                         batch_size=64, random_state=0).fit(X[y < 5][:300], y[y < 5][:300])
    Xt, yt = X[y >= 5][:100], y[y >= 5][:100]
    clf = PriorRegularizedClassifier(fitter.prior_, prior_structure="none", min_steps=200, verbose=0,
                                     random_state=0).fit(Xt, yt)
    assert clf.preprocess_.image_size == (16, 16)
    train_mode = copy.deepcopy(clf.module_).train()
    with torch.no_grad():
        batch_statistics = clf.classes_[train_mode(clf._prepare_X(Xt)).argmax(1).numpy()]
    eval_mode = clf.predict(Xt)
    assert np.mean(batch_statistics == eval_mode) >= 0.99
    assert abs(np.mean(batch_statistics == yt) - np.mean(eval_mode == yt)) <= 0.01


# -- prior scale and image size ----------------------------------------------------------------------------
def test_auto_prior_scale_is_the_reference_scale_times_a_thousand(digits, prior):
    X, y = digits[0][:20], digits[1][:20]
    clf = PriorRegularizedClassifier(prior, max_epochs=1, verbose=0).fit(X, y)
    assert AUTO_SCALE_DECADES == 3
    assert clf.prior_scale_ == pytest.approx(prior.reference_scale() * 1e3)
    assert clf.penalty_.scale == pytest.approx(clf.prior_scale_)
    assert PriorRegularizedClassifier(prior, max_epochs=1, prior_scale=5.0, verbose=0).fit(X, y).prior_scale_ == 5.0
    assert PriorRegularizedClassifier(prior, max_epochs=1, prior_structure="none", verbose=0).fit(
        X, y).prior_scale_ is None
    zero = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(zero.weight)
    torch.nn.init.zeros_(zero.bias)
    centred = Prior.from_module(zero, variance=0.01)
    assert centred.reference_scale() == 0.0 and resolve_prior_scale("auto", centred) == 1.0


def test_a_prior_records_the_size_its_backbone_saw(digits):
    X, y = digits
    fit = lambda **kw: PriorFitter(backbone="small_cnn", backbone_kwargs={"width": 4}, max_epochs=2, swag_start=0,  # noqa: E731
                                   rank=2, batch_size=256, random_state=0, **kw).fit(X[:300], y[:300]).prior_
    assert fit().meta["preprocess"]["image_size"] == [8, 8]
    assert fit(image_size=12).meta["preprocess"]["image_size"] == [12, 12]
    given = {"image_size": None, "channels": 1, "mean": [0.3], "std": [0.3]}
    assert fit(preprocess=given).meta["preprocess"]["image_size"] is None  # a given preprocess is kept as is


def test_classifier_resizes_to_the_prior_segmenter_keeps_the_size(prior):
    rng = np.random.default_rng(0)
    X = rng.random((8, 12, 12)).astype(np.float32)
    clf = PriorRegularizedClassifier(prior, max_epochs=1, verbose=0).fit(X, np.arange(8) % 2)
    assert clf.preprocess_.image_size == (8, 8) and clf.input_shape_ == (1, 8, 8)
    seg = PriorRegularizedSegmenter(prior, max_epochs=1, verbose=0).fit(X, (X > 0.5).astype(np.int64))
    assert seg.preprocess_.image_size is None and seg.input_shape_ == (1, 12, 12)
    assert seg.preprocess_.mean == (0.3,) and seg.preprocess_.std == (0.3,)


class _KeepTrainSplit(Callback):
    def on_epoch_begin(self, net, dataset_train=None, **kwargs):
        self.dataset_ = dataset_train


def test_early_stopping_ends_a_fit_with_the_best_weights_and_their_statistics(prior, digits):
    from skorch.callbacks import EarlyStopping
    from skorch.dataset import ValidSplit

    from sklearn_bayes_transfer.batchnorm import batchnorm_buffers, batchnorm_inputs, recompute_batchnorm

    X, y = digits
    stop, keep = EarlyStopping(patience=1, load_best=True), _KeepTrainSplit()
    clf = PriorRegularizedClassifier(prior, max_epochs=60, lr=0.5, verbose=0, random_state=0,
                                     train_split=ValidSplit(0.3, stratified=True, random_state=0),
                                     callbacks=[("stop", stop), ("keep", keep)])
    clf.fit(X[:100], y[:100])  # skorch's EarlyStopping raises KeyboardInterrupt: a finished fit, not Ctrl-C
    assert len(clf.history) < 60 and stop.best_epoch_ < len(clf.history)
    # The weights kept are the best epoch's, with BatchNorm statistics recomputed for them: doing it
    # again changes nothing.
    before = {k: v.clone() for k, v in batchnorm_buffers(clf.module_)}
    recompute_batchnorm(clf, batchnorm_inputs(keep.dataset_, int(clf.batch_size), torch.Generator().manual_seed(0)))
    for key, value in batchnorm_buffers(clf.module_):
        torch.testing.assert_close(value, before[key])
