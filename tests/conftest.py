"""Shared fixtures: the real COMP5329 data when present, and a tiny synthetic data set.

Everything here runs offline. Hugging Face is put in offline mode before anything imports it:
without it, a name that is not cached locally (e.g. ``albert-base-v2``) is retried against the
hub for about a minute before the offline fallback is taken.
"""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported (it reads these once, at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that busy-wait at every barrier burn whole cores whenever another process shares the
# machine (on a busy 2-core box the fine-tuning tests took 5-8x the CPU time); read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The real data, beside the repository; FUSELABEL_TEST_DATA points the tests elsewhere (or at nothing).
SHARED_DATA = Path(
    os.environ.get("FUSELABEL_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared/data/comp5329"
)

# The browser tests drive Debian's chromium (Playwright's own browser downloads are not used), headless.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (Debian: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def browser():
    """Headless chromium, one a test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# Synthetic labels, in the course's style (integer tokens), each with a colour and a caption word.
TINY_LABELS = {
    "1": ((230, 40, 40), "person"),
    "2": ((40, 200, 40), "dog"),
    "3": ((40, 60, 230), "car"),
    "4": ((230, 210, 40), "kite"),
}
TINY_ROWS = 48
FILLER = ["a photo of", "there is", "picture showing", "we can see", "an image with"]


def shared_data_or_skip(what: str) -> Path:
    """The real data folder (``SHARED_DATA``: train.csv and data/), or skip, saying ``what`` is skipped and why.

    Every test on the real data goes through here, so ``FUSELABEL_TEST_DATA`` moves them all at once.
    """
    if not (SHARED_DATA / "train.csv").is_file() or not (SHARED_DATA / "data").is_dir():
        pytest.skip(f"{what}: no real data at {SHARED_DATA} (set FUSELABEL_TEST_DATA to the course data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Anything that forgets ``cache_dir`` still stays out of the real ~/.cache/fuselabel."""
    old = os.environ.get("FUSELABEL_CACHE")
    os.environ["FUSELABEL_CACHE"] = str(tmp_path_factory.mktemp("fuselabel-cache"))
    yield
    if old is None:
        os.environ.pop("FUSELABEL_CACHE", None)
    else:
        os.environ["FUSELABEL_CACHE"] = old


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> str:
    """A feature / ONNX cache shared by the tests of one session (keys include the weights, so no clashes)."""
    return str(tmp_path_factory.mktemp("cache"))


def tiny_label_sets(n: int = TINY_ROWS) -> list[tuple[str, ...]]:
    """Deterministic label sets: every label on about half of the rows, one or two labels a row."""
    keys = list(TINY_LABELS)
    sets = []
    for i in range(n):
        first = keys[i % 4]
        second = keys[(i // 4) % 4]
        sets.append(tuple(sorted({first, second}, key=int)) if i % 3 else (first,))
    return sets


def _image_for(labels, i: int, size: int = 40) -> Image.Image:
    colour = np.mean([TINY_LABELS[lab][0] for lab in labels], axis=0)
    rng = np.random.default_rng(i)
    pixels = np.clip(colour + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_tiny_dataset(root: Path, n: int = TINY_ROWS) -> tuple[Path, Path]:
    """Write ``n`` image+caption rows under ``root``; returns (image_dir, csv_path).

    Images are 40x40 JPEGs whose colour is the mean of their labels' colours; captions name their
    labels' words. Row 0 is a greyscale ('L') JPEG, row 1 a CMYK JPEG, row 2's caption holds unescaped
    inner quotes (as the course CSV does) and row 3's caption a line break.
    """
    image_dir = root / "data"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = ["ImageID,Labels,Caption"]
    for i, labels in enumerate(tiny_label_sets(n)):
        image_id = f"{i}.jpg"
        img = _image_for(labels, i)
        if i == 0:
            img = img.convert("L")
        elif i == 1:
            img = img.convert("CMYK")
        img.save(image_dir / image_id, "JPEG", quality=90)
        words = " and a ".join(TINY_LABELS[lab][1] for lab in labels)
        caption = f"{FILLER[i % len(FILLER)]} a {words}"
        if i == 2:
            caption = f'A {words} next to a sign that reads "no parking, ever" today'
        elif i == 3:
            caption = f"{caption}\nin the afternoon"
        lines.append(f'{image_id},{" ".join(labels)},"{caption}"')
    csv_path = root / "train.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return image_dir, csv_path


@pytest.fixture
def tiny_dataset(tmp_path) -> tuple[Path, Path]:
    """(image_dir, csv_path) of 48 synthetic labelled rows in the course CSV format."""
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_dataset_session(tmp_path_factory) -> tuple[Path, Path]:
    """The same rows as ``tiny_dataset``, written once per session for tests that only read them."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


class RepeatBatch:
    """A dataset that is one ready-made batch, ``n`` times: what overfitting and loss tests need."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


# A tiny FuseLabel: frozen packaged Lite0 at 64 px, a one-layer MiniLM, two epochs (seconds on a CPU).
TINY_SETTINGS = dict(
    preset="cpu-fast",
    image_size=64,
    epochs=2,
    batch_size=16,
    val_fraction=0.25,
    num_workers=0,
    accelerator="cpu",
    hidden_dim=32,
    text_config_overrides={"num_hidden_layers": 1},
    # the fp32 encoders these tests were written for; the int8 default on a CPU has its own tests (test_int8.py)
    image_quant="none",
    text_quant="none",
    save_dtype="fp16",
)


# The same tiny model as ``fuselabel train`` flags (the encoders' quantisation left to the machine's default).
TINY_CLI_TRAIN = [
    "--preset",
    "cpu-fast",
    "--image-size",
    "64",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--val-fraction",
    "0.25",
    "--num-workers",
    "0",
    "--accelerator",
    "cpu",
    "--set",
    "hidden_dim=32",
    "--set",
    "text_config_overrides={num_hidden_layers: 1}",
]


def tiny_cli_train(*extra: str, epochs: int = 2) -> list[str]:
    """``TINY_CLI_TRAIN`` for ``epochs`` epochs, with ``extra`` flags after it."""
    flags = list(TINY_CLI_TRAIN)
    flags[flags.index("--epochs") + 1] = str(epochs)
    return [*flags, *extra]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, session_cache):
    """(folder, image_dir, csv): the tiny data set and a FuseLabel trained on it, saved in ``folder / "model"``."""
    from fuselabel import FuseLabel

    root = tmp_path_factory.mktemp("tiny-model")
    image_dir, csv = make_tiny_dataset(root)
    FuseLabel(**TINY_SETTINGS, cache_dir=session_cache).fit(csv, images=image_dir, out=root / "model", progress=False)
    return root, image_dir, csv
