"""The named presets: partial settings over ``Config``'s defaults, each with the line ``--help`` shows for it."""

from __future__ import annotations

from typing import Any


class Preset(dict):
    """A named partial set of settings over ``Config``'s defaults (a plain mapping of key to value, so a user reads
    exactly what it changes), with the one line ``--help`` shows for it in ``description``."""

    def __init__(self, description: str, **settings: Any) -> None:
        super().__init__(settings)
        self.description = description


# What the fine-tuning presets share: both encoders train on late fusion, photos cropped at random
_FINETUNE = dict(regime="finetune", kind="late", image_crop_pct=None, augment="seed")


def _schedule(*, epochs: int, batch_size: int, lr: float, lr_image: float, lr_text: float) -> dict:
    """A fine-tuning run's length, batch and the learning rates of the heads and of each encoder."""
    return dict(epochs=epochs, batch_size=batch_size, lr=lr, lr_image=lr_image, lr_text=lr_text)


PRESETS: dict[str, Preset] = {
    "cpu-fast": Preset(
        "frozen Lite0 features, the whole photo at Lite0's own 224 px: the quickest sensible model on a laptop",
        image_model="tf_efficientnet_lite0",
        image_size=None,
        regime="frozen",
        epochs=30,
    ),
    # fp32 encoders: what the int8 default is measured against (docs/results.md)
    "cpu": Preset(
        "frozen encoders in fp32, weights stored in fp16 (the default before int8: half its prediction speed)",
        regime="frozen",
        image_quant="none",
        text_quant="none",
        save_dtype="fp16",
    ),
    # 1.4x the extraction time of "cpu"
    "cpu-best": Preset(
        "the whole photo upsampled to 384 px: the best frozen figure measured",
        regime="frozen",
        kind="late",
        image_size=384,
        image_crop_pct=1.0,
        threshold_method="global",
        image_quant="none",
        text_quant="none",
        save_dtype="fp16",
    ),
    # The heads train on the int8 features they will see. On an AVX2 CPU: 2.0x the default's prediction speed,
    # held-out mean F1 within 0.001 of it over three seeds (docs/results.md).
    "cpu-int8": Preset(
        "both encoders in int8 on any machine (image static, calibrated on training photos; text dynamic): the "
        "default on a CPU",
        regime="frozen",
        image_quant="int8",
        text_quant="int8",
        save_dtype="int8",
    ),
    # augmentation does the zooming
    "gpu-best": Preset(
        "fine-tuning at the backbone's own 260 px with random resized crops (a GPU)",
        **_FINETUNE,
        image_size=260,
        **_schedule(epochs=12, batch_size=128, lr=1e-3, lr_image=3e-4, lr_text=5e-5),
        precision="bf16-mixed",
        image_cache="memory",
    ),
    "seed": Preset(
        "the course seed: EfficientNet-B3 + ALBERT-base, Table 1 settings (needs their weights, hub or local)",
        **_FINETUNE,
        image_model="efficientnet_b3",
        image_size=None,
        text_model="albert-base-v2",
        late_combine="union",
        **_schedule(epochs=10, batch_size=32, lr=1e-4, lr_image=1e-4, lr_text=2e-5),
        threshold_method="balanced",
    ),
}
