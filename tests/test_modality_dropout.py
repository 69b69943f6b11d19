"""Modality dropout: training rows whose photo or caption is hidden, so fusion learns to cope with one input.

The networks are random-init and tiny (a 64 px Lite0 and a one-layer 32-wide text encoder); batches are
cached features, as the frozen regime trains on.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import RepeatBatch
from torch.utils.data import DataLoader

from fuselabel import Config
from fuselabel.module import FuseLabelModule
from fuselabel.network import FuseLabelNet

ROWS, LABELS = 64, 3
TINY_TEXT = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)


def _module(kind: str, share: float, seed: int = 7) -> FuseLabelModule:
    config = Config(
        kind=kind,
        image_model="tf_efficientnet_lite0",
        image_size=64,
        image_pretrained=False,
        text_pretrained=False,
        text_config_overrides=TINY_TEXT,
        hidden_dim=16,
        dropout=0.0,
        modality_dropout=share,
        seed=seed,
        accelerator="cpu",
        num_workers=0,
        batch_size=ROWS,
    )
    return FuseLabelModule(FuseLabelNet(config, num_labels=LABELS), config)


def _batch(module: FuseLabelModule) -> dict:
    g = torch.Generator().manual_seed(0)
    net = module.net
    return {
        "image_feat": torch.randn(ROWS, net.image_encoder.num_features, generator=g) + 3.0,
        "text_feat": torch.randn(ROWS, net.text_encoder.num_features, generator=g) + 3.0,
        "image_present": torch.ones(ROWS),
        "labels": (torch.rand(ROWS, LABELS, generator=g) < 0.5).float(),
    }


def _hidden(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image_present"] == 0, batch["caption_present"] == 0


def test_hidden_rows_differ_per_step_and_have_zero_features():
    module = _module("late", 0.5)
    batch = _batch(module)
    original = {k: v.clone() for k, v in batch.items()}
    steps = [module.hide_modalities(batch) for _ in range(3)]
    masks = [torch.stack(_hidden(b)) for b in steps]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    for b in steps:
        photo, caption = _hidden(b)
        # About half the rows lose one input, never both.
        assert 12 <= int((photo | caption).sum()) <= 52, int((photo | caption).sum())
        assert photo.any() and caption.any() and not (photo & caption).any()
        assert (b["image_feat"][photo] == 0).all() and (b["text_feat"][caption] == 0).all()
        torch.testing.assert_close(b["image_feat"][~photo], batch["image_feat"][~photo])
        torch.testing.assert_close(b["text_feat"][~caption], batch["text_feat"][~caption])
    for k, v in original.items():  # the loader's batch itself is left alone
        torch.testing.assert_close(batch[k], v)


def test_same_seed_hides_same_rows_and_rows_without_photo_keep_caption():
    a, b = _module("early", 0.5, seed=3), _module("early", 0.5, seed=3)
    batch = _batch(a)
    batch["image_present"][:8] = 0
    for _ in range(2):
        ha, hb = a.hide_modalities(batch), b.hide_modalities(batch)
        torch.testing.assert_close(ha["caption_present"], hb["caption_present"])
        torch.testing.assert_close(ha["image_present"], hb["image_present"])
        assert (ha["caption_present"][:8] == 1).all() and (ha["image_present"][:8] == 0).all()


@pytest.mark.parametrize("kind", ["image", "text"])
def test_single_modality_models_are_left_alone(kind):
    config = Config(
        kind=kind,
        modality_dropout=0.5,
        image_pretrained=False,
        text_pretrained=False,
        image_model="tf_efficientnet_lite0",
        image_size=64,
        text_config_overrides=TINY_TEXT,
        hidden_dim=16,
    )
    module = FuseLabelModule(FuseLabelNet(config, num_labels=LABELS), config)
    batch = {"labels": torch.zeros(4, LABELS), "image_present": torch.ones(4)}
    assert module.hide_modalities(batch) is batch


def test_zero_share_changes_nothing():
    module = _module("late", 0.0)
    batch = _batch(module)
    assert module.hide_modalities(batch) is batch


def test_late_loss_ignores_each_head_on_rows_missing_its_input():
    module = _module("late", 0.5)
    batch = module.hide_modalities(_batch(module))
    photo, caption = _hidden(batch)
    with torch.no_grad():
        logits = module.net(batch)
    base = module._loss(logits, batch)
    g = torch.Generator().manual_seed(1)
    scrambled = {k: v.clone() for k, v in logits.items()}
    scrambled["image"][photo] = 10 * torch.randn(int(photo.sum()), LABELS, generator=g)
    scrambled["text"][caption] = 10 * torch.randn(int(caption.sum()), LABELS, generator=g)
    torch.testing.assert_close(module._loss(scrambled, batch), base)
    # ... while the rows that keep their input still count.
    kept = {k: v.clone() for k, v in logits.items()}
    kept["image"][~photo] += 5.0
    assert abs(float(module._loss(kept, batch) - base)) > 1e-3
    kept = {k: v.clone() for k, v in logits.items()}
    kept["text"][~caption] += 5.0
    assert abs(float(module._loss(kept, batch) - base)) > 1e-3


def test_early_fusion_ignores_hidden_inputs():
    module = _module("early", 0.5)
    module.net.eval()
    batch = module.hide_modalities(_batch(module))
    photo, caption = _hidden(batch)
    other = dict(batch)
    # Features that leak through on hidden rows would change the logits of those rows.
    other["image_feat"] = batch["image_feat"] + 5.0 * photo[:, None]
    other["text_feat"] = batch["text_feat"] + 5.0 * caption[:, None]
    with torch.no_grad():
        torch.testing.assert_close(module.net(other)["early"], module.net(batch)["early"])
        # A caption flag of 0 alone (features left in place) hides the caption as well.
        raw = dict(_batch(module), caption_present=batch["caption_present"])
        shifted = dict(raw, text_feat=raw["text_feat"] + 5.0 * torch.randn(raw["text_feat"].shape))
        torch.testing.assert_close(module.net(shifted)["early"][caption], module.net(raw)["early"][caption])
        assert not torch.allclose(module.net(shifted)["early"][~caption], module.net(raw)["early"][~caption])


def _fit_losses(kind: str, share: float) -> list[float]:
    L.seed_everything(0, verbose=False)
    module = _module(kind, share)
    module.set_trainable(image=False, text=False)
    seen: list[float] = []

    class Log(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Log()],
    )
    trainer.fit(module, DataLoader(RepeatBatch(_batch(module), 6), batch_size=None))
    return seen


@pytest.mark.parametrize("kind", ["late", "early"])
def test_training_with_dropout_repeats(kind):
    a, b = _fit_losses(kind, 0.5), _fit_losses(kind, 0.5)
    assert len(a) == 6 and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # The same fixed batch without dropout gives other losses: the training step did hide inputs.
    assert not np.allclose(a, _fit_losses(kind, 0.0), rtol=1e-4)
