"""The LightningModule: one training step for every model kind and both regimes.

Lightning owns the loop, devices, mixed precision, checkpoints and DDP; this file only says
what a step computes and which parameters learn at which rate.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from .calibration import score_validation
from .config import Config
from .losses import build_loss, probabilities
from .network import FuseLabelNet

# The batch flag that says a row has the input a one-modality head reads.
PRESENCE_KEYS = {"image": "image_present", "text": "caption_present"}


def hide_modalities(batch: dict, share: float, generator: torch.Generator) -> dict:
    """Modality dropout: ``share`` of the rows lose their photo or their caption (one of the two, evenly).

    A hidden photo looks exactly like a caption-only row (``image_present`` 0, features or pixels zeroed);
    a hidden caption sets ``caption_present`` 0 and zeroes cached text features (the network zeroes those it
    computes). Rows that already lack a photo keep their caption, so no row is left with nothing. The batch
    given is not changed: a new dict is returned.
    """
    n = len(batch["labels"])
    device = batch["labels"].device
    hide = torch.rand(n, generator=generator) < share
    photo = torch.rand(n, generator=generator) < 0.5
    image_present = batch["image_present"].bool().cpu() if "image_present" in batch else torch.ones(n, dtype=torch.bool)
    caption_present = (
        batch["caption_present"].bool().cpu() if "caption_present" in batch else torch.ones(n, dtype=torch.bool)
    )
    hide_photo = hide & photo & image_present
    hide_caption = hide & ~photo & image_present
    out = dict(batch)
    out["image_present"] = (image_present & ~hide_photo).float().to(device)
    out["caption_present"] = (caption_present & ~hide_caption).float().to(device)
    for key, hidden in (("image_feat", hide_photo), ("pixels", hide_photo), ("text_feat", hide_caption)):
        if key in out:
            keep = (~hidden).to(device=device, dtype=out[key].dtype)
            out[key] = out[key] * keep.view(-1, *([1] * (out[key].dim() - 1)))
    return out


class FuseLabelModule(L.LightningModule):
    """The network, its loss and optimiser settings, and which encoders train: what Lightning fits.

    Holds the ``FuseLabelNet`` being trained, the run's ``Config``, the loss (with per-label weights), the
    per-head validation probabilities of the epoch under way, and ``val_calibration``: the last validation
    epoch's tuned fusion and thresholds, whose mean F1 (``val_f1``) picks the checkpoint and stops training.
    """

    def __init__(self, net: FuseLabelNet, config: Config, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.net = net
        self.config = config
        # pos_weight: per-label positive weights (multilabel) or per-class weights (multiclass), see losses
        self.criterion = build_loss(config.loss, pos_weight=pos_weight, task=config.task, **config.loss_kwargs)
        self._val_rows: list[dict[str, torch.Tensor]] = []
        self.trainable = {"image": False, "text": False}
        self.val_calibration = None
        self._dropout_generator: torch.Generator | None = None

    def set_trainable(self, image: bool, text: bool) -> None:
        """Frozen encoders take no gradient and stay in eval mode (BatchNorm statistics untouched)."""
        self.trainable = {"image": image, "text": text}
        for name, enc in (("image", self.net.image_encoder), ("text", self.net.text_encoder)):
            if enc is not None:
                enc.requires_grad_(self.trainable[name])

    @property
    def frozen_encoders(self) -> list[str]:
        return [
            f"net.{k}_encoder."
            for k, v in self.trainable.items()
            if not v and getattr(self.net, f"{k}_encoder") is not None
        ]

    def train(self, mode: bool = True):
        super().train(mode)
        for name, enc in (("image", self.net.image_encoder), ("text", self.net.text_encoder)):
            if enc is not None and not self.trainable[name]:
                enc.eval()
        return self

    def on_after_batch_transfer(self, batch, dataloader_idx):
        # With the image cache (fuselabel.image_cache) rows arrive as cache indices; pixels are made on the device.
        source = getattr(self, "image_source", None)
        if source is not None and isinstance(batch, dict) and "cache_index" in batch and "pixels" not in batch:
            batch = source.materialize(batch, train=self.training)
        return batch

    def _loss(self, logits: dict, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        total = 0.0
        for name, out in logits.items():
            # A one-modality head learns only from rows that have its input (caption-only rows, hidden inputs).
            present = batch.get(PRESENCE_KEYS.get(name))
            if present is not None and not bool(present.all()):
                keep = present.bool()
                if not keep.any():
                    continue
                out, target = out[keep], labels[keep]
            else:
                target = labels
            total = total + self.criterion(out.float(), target)
        return total

    def hide_modalities(self, batch: dict) -> dict:
        """Modality dropout on one training batch; unchanged unless ``modality_dropout`` > 0 and both inputs are used."""
        share = self.config.modality_dropout
        if share <= 0 or not (self.config.uses_image and self.config.uses_text):
            return batch
        if self._dropout_generator is None:
            # Seeded per rank: a run repeats, and DDP ranks hide different rows.
            self._dropout_generator = torch.Generator().manual_seed(self.config.seed + self.global_rank)
        return hide_modalities(batch, share, self._dropout_generator)

    def training_step(self, batch, batch_idx):
        batch = self.hide_modalities(batch)
        loss = self._loss(self.net(batch), batch)
        self.log(
            "train_loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=len(batch["labels"]),
            sync_dist=False,
        )
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.net(batch)
        loss = self._loss(logits, batch)
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["labels"]), sync_dist=True)
        n = len(batch["labels"])
        ones = torch.ones(n, device=batch["labels"].device)
        row = {f"part_{k}": probabilities(v, self.config.task).detach().float() for k, v in logits.items()}
        row["labels"] = batch["labels"].detach()
        row["image_present"] = batch.get("image_present", ones).detach().float()
        row["caption_present"] = batch.get("caption_present", ones).detach().float()
        self._val_rows.append(row)

    def on_validation_epoch_end(self):
        if not self._val_rows:
            return
        rows = {k: torch.cat([r[k] for r in self._val_rows]) for k in self._val_rows[0]}
        self._val_rows.clear()
        if self.trainer.world_size > 1:
            rows = {k: self.all_gather(v).reshape(-1, *v.shape[1:]) for k, v in rows.items()}
        rows = {k: v.cpu().numpy() for k, v in rows.items()}
        # Checkpoints and early stopping follow the figure the model folder records: the prediction path's
        # fusion and decision rule, tuned on these rows as calibration tunes them (runtime.fuse, thresholds).
        self.val_calibration = score_validation(
            self.config,
            rows["labels"],
            {k.removeprefix("part_"): v for k, v in rows.items() if k.startswith("part_")},
            rows["image_present"] > 0.5,
            rows["caption_present"] > 0.5,
        )
        self.log("val_f1", self.val_calibration.mean_f1, prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        cfg = self.config
        groups = [{"params": [p for p in self.net.head.parameters() if p.requires_grad], "lr": cfg.lr}]
        for name, lr in (("image", cfg.lr_image), ("text", cfg.lr_text)):
            enc = getattr(self.net, f"{name}_encoder")
            if enc is not None and self.trainable[name]:
                groups.append({"params": [p for p in enc.parameters() if p.requires_grad], "lr": lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, total // 20)

        def schedule(step: int) -> float:
            # Linear warm-up, then cosine decay to 5 % of the peak.
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
