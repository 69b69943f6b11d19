"""The validation split, the rare-label sampler, image loading and the datasets / collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, TINY_LABELS
from PIL import Image
from torch.utils.data import WeightedRandomSampler

from fuselabel.data import (
    FeatureDataset,
    ImageError,
    PairDataset,
    TextCollate,
    build_transform,
    load_rgb,
    make_sampler,
    oversampling_weights,
    stratified_split,
)
from fuselabel.encoders import create_tokenizer
from fuselabel.labels import label_vocabulary, labels_to_matrix
from fuselabel.records import Record, read_records

DATA_CONFIG = {
    "input_size": [3, 64, 64],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


def _synthetic_labels(n=3000, seed=0) -> np.ndarray:
    """Skewed multi-label rows like the course data: one dominant label, a long tail, 1-3 labels a row."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.75, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.01, 0.005])  # the last has ~15 rows
    y = rng.random((n, len(prior))) < prior
    y[~y.any(1), 0] = True
    return y.astype(np.uint8)


@pytest.fixture(scope="module")
def label_matrix():
    """The real training labels when ../shared is present, else a synthetic matrix of the same shape of skew."""
    csv = SHARED_DATA / "train.csv"
    if csv.is_file():
        sets = read_records(csv).label_sets
        return labels_to_matrix(sets, label_vocabulary(sets))
    return _synthetic_labels()


def test_stratified_split(label_matrix):
    n = len(label_matrix)
    train, val = stratified_split(label_matrix, 0.1, seed=42)
    again_train, again_val = stratified_split(label_matrix, 0.1, seed=42)
    other_train, other_val = stratified_split(label_matrix, 0.1, seed=7)

    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, other_val)
    for tr, va in ((train, val), (other_train, other_val)):
        assert np.intersect1d(tr, va).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(n))
        assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # sorted, no repeats
        assert abs(len(va) / n - 0.1) < 0.02
        counts = label_matrix.sum(0)
        common = counts >= 10
        assert common.any()
        assert (label_matrix[tr][:, common].sum(0) > 0).all()
        assert (label_matrix[va][:, common].sum(0) > 0).all()
        # Each label's share of the validation rows stays close to its share overall.
        share = label_matrix[va].sum(0) / np.maximum(counts, 1)
        assert np.all(np.abs(share[common] - len(va) / n) < 0.1)


def test_stratified_split_small_inputs():
    y = np.eye(4, dtype=np.uint8)[np.arange(40) % 4]
    train, val = stratified_split(y, 0.25, seed=0)
    assert abs(len(val) - 10) <= 1 and set(np.argmax(y[val], 1)) == {0, 1, 2, 3}  # iterstrat rounds loosely
    with pytest.raises(ValueError, match="at least two"):
        stratified_split(y[:1], 0.1)


def test_oversampling_weights():
    y = np.zeros((100, 3), dtype=np.uint8)
    y[:, 0] = 1  # everyone: common
    y[:10, 1] = 1  # rare
    y[:2, 2] = 1  # rarest
    w = oversampling_weights(y, power=0.5)
    assert w.shape == (100,)
    assert w.mean() == pytest.approx(1.0)
    assert w[0] > w[5] > w[50]  # rarest > rare > common only
    assert w[50] == pytest.approx(w[99])
    full = oversampling_weights(y, power=1.0)
    assert full[0] / full[50] == pytest.approx(50.0)  # 1/0.02 against 1/1
    np.testing.assert_allclose(oversampling_weights(y, power=0.0), np.ones(100))

    # A row with no label at all weighs like the commonest label, not zero or infinity.
    y[99] = 0
    w = oversampling_weights(y, power=0.5)
    assert np.isfinite(w).all() and w[99] == pytest.approx(w[50])


def test_make_sampler():
    y = _synthetic_labels(200)
    assert make_sampler(y, "none", 0.5, seed=1) is None
    sampler = make_sampler(y, "oversample", 0.5, seed=1)
    assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == 200
    assert list(sampler) == list(make_sampler(y, "oversample", 0.5, seed=1))
    drawn = np.array(list(sampler))
    rare = np.flatnonzero(y[:, -3:].any(1))
    assert np.isin(drawn, rare).mean() > len(rare) / len(y)  # rare rows are over-represented


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("RGB", "PNG")],
)
def test_load_rgb_converts_any_mode(tmp_path, mode, fmt):
    rgb = Image.new("RGB", (30, 20), (200, 60, 20))
    if mode == "I;16":
        img = Image.new("I;16", (30, 20), 300)
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = rgb.convert(mode)
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, fmt)
    with Image.open(path) as check:
        assert check.mode == mode or (mode == "I;16" and check.mode.startswith("I"))
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode in ("RGB", "RGBA", "P"):
        assert np.abs(np.asarray(out)[5, 5].astype(int) - [200, 60, 20]).max() <= 8


def test_load_rgb_on_png_named_jpg(tmp_path):
    path = tmp_path / "7.jpg"
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(path, "PNG")  # contents decide, not the extension
    assert load_rgb(path).mode == "RGB"


def test_tiny_dataset_reads_back(tiny_dataset):
    image_dir, csv = tiny_dataset
    records = read_records(csv)
    assert len(records) == 48 and records.labelled
    assert '"no parking, ever"' in records.records[2].caption
    assert "\n" in records.records[3].caption
    with Image.open(image_dir / "0.jpg") as a, Image.open(image_dir / "1.jpg") as b:
        assert (a.mode, b.mode) == ("L", "CMYK")
    assert label_vocabulary(records.label_sets) == sorted(TINY_LABELS, key=int)


def test_pair_dataset(tiny_dataset):
    image_dir, csv = tiny_dataset
    records = read_records(csv).records[:6]
    labels = np.eye(6, 4, dtype=np.float32)
    ds = PairDataset(records, image_dir, build_transform(DATA_CONFIG, train=False), labels)
    assert len(ds) == 6
    for i in range(6):  # greyscale and CMYK rows included
        item = ds[i]
        assert item["pixels"].shape == (3, 64, 64) and item["pixels"].dtype == torch.float32
        assert item["image_present"] == 1.0 and item["caption"] == records[i].caption and item["index"] == i
        torch.testing.assert_close(item["labels"], torch.as_tensor(labels[i]))
    train_ds = PairDataset(records, image_dir, build_transform(DATA_CONFIG, train=True, augment="trivial"))
    assert train_ds[0]["pixels"].shape == (3, 64, 64) and "labels" not in train_ds[0]
    no_images = PairDataset(records, image_dir, None, load_images=False)
    assert "pixels" not in no_images[0] and "image_present" not in no_images[0]


def test_pair_dataset_missing_and_unreadable_images(tiny_dataset):
    image_dir, csv = tiny_dataset
    records = read_records(csv).records[:6]
    (image_dir / records[4].image_id).unlink()
    (image_dir / records[5].image_id).write_bytes(b"not a jpeg at all")
    transform = build_transform(DATA_CONFIG, train=False)

    strict = PairDataset(records, image_dir, transform)
    with pytest.raises(ImageError) as err:
        strict[4]
    message = str(err.value)
    assert str(image_dir / records[4].image_id) in message and "missing" in message
    assert f"CSV line {records[4].line}" in message and "caption_only" in message
    with pytest.raises(ImageError, match=rf"unreadable.*CSV line {records[5].line}"):
        strict[5]

    for train in (False, True):
        lenient = PairDataset(
            records, image_dir, build_transform(DATA_CONFIG, train=train), missing_images="caption_only"
        )
        for i in (4, 5):
            item = lenient[i]
            assert item["image_present"] == 0.0 and item["caption"] == records[i].caption
            assert item["pixels"].shape == (3, 64, 64) and not item["pixels"].any()
        # A batch mixing present and missing images stacks.
        batch = TextCollate(None)([lenient[i] for i in range(6)])
        assert batch["pixels"].shape == (6, 3, 64, 64)
        np.testing.assert_array_equal(batch["image_present"].numpy(), [1, 1, 1, 1, 0, 0])


def test_feature_dataset_shapes():
    feats = {"image": np.random.rand(5, 16), "text": np.random.rand(5, 8)}
    labels = np.random.rand(5, 3) > 0.5
    ds = FeatureDataset(feats, labels, np.array([1, 0, 1, 1, 1]))
    assert len(ds) == 5
    item = ds[1]
    assert item["image_feat"].shape == (16,) and item["text_feat"].shape == (8,)
    assert item["image_feat"].dtype == torch.float32 and item["labels"].dtype == torch.float32
    assert item["labels"].shape == (3,) and item["image_present"] == 0.0
    only_text = FeatureDataset({"text": np.zeros((4, 8))})
    assert len(only_text) == 4 and "labels" not in only_text[0] and only_text[0]["image_present"] == 1.0
    batch = torch.utils.data.default_collate([ds[i] for i in range(5)])
    assert batch["image_feat"].shape == (5, 16) and batch["labels"].shape == (5, 3)


def test_text_collate_dynamic_padding():
    tok = create_tokenizer("minilm-l6")
    captions = ["a dog", "a red car parked beside a tall tree in the afternoon sun", "kite"]
    recs = [Record(f"{i}.jpg", c, ("1",), i + 2) for i, c in enumerate(captions)]
    ds = PairDataset(recs, None, None, np.ones((3, 2), np.float32), load_images=False)
    lengths = [len(tok(c)["input_ids"]) for c in captions]

    batch = TextCollate(tok, max_length=64)([ds[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, max(lengths))  # padded to the batch's longest, not to 64
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].shape == (3, 2) and batch["index"].tolist() == [0, 1, 2]

    short = TextCollate(tok, max_length=64)([ds[0], ds[2]])
    assert short["input_ids"].shape == (2, max(lengths[0], lengths[2]))

    cut = TextCollate(tok, max_length=5)([ds[i] for i in range(3)])
    assert cut["input_ids"].shape == (3, 5)
    assert cut["attention_mask"].sum(1).tolist() == [min(n, 5) for n in lengths]
    assert cut["input_ids"][1, -1].item() == tok.sep_token_id  # truncation keeps the closing [SEP]

    assert "input_ids" not in TextCollate(None)([ds[0]])


class _WordIds:
    """A stand-in tokenizer: "w7" -> id 7, padded with -1, so a batch shows exactly which words were kept."""

    def __call__(self, captions, **_):
        ids = [[int(w[1:]) for w in c.split()] for c in captions]
        width = max(map(len, ids))
        t = torch.tensor([row + [-1] * (width - len(row)) for row in ids])
        return {"input_ids": t, "attention_mask": (t >= 0).long()}


def _kept_words(seed: int, epochs: int = 2) -> list[list[frozenset]]:
    """Per epoch, the words each of 4 one-row batches kept, from a loader with 2 workers (batches alternate)."""
    caption = " ".join(f"w{i}" for i in range(40))
    rows = [{"caption": caption, "labels": torch.zeros(1)} for _ in range(4)]
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=1,
        num_workers=2,
        collate_fn=TextCollate(_WordIds(), word_dropout=0.5, seed=3),
        generator=torch.Generator().manual_seed(seed),
    )
    return [[frozenset(b["input_ids"][b["input_ids"] >= 0].tolist()) for b in loader] for _ in range(epochs)]


def test_word_dropout_stream_is_per_worker_and_per_epoch():
    first, second = _kept_words(seed=0)
    assert all(0 < len(kept) < 40 for kept in first + second)
    # Batches 0 and 1 are the first draws of workers 0 and 1: one copied generator would drop the same words.
    assert first[0] != first[1]
    # Workers are started afresh each epoch; their streams must not start over.
    assert first[0] != second[0] and first[1] != second[1]
    # Still a function of the seeds: the same loader seed gives the same words, another seed others.
    assert _kept_words(seed=0) == [first, second]
    assert _kept_words(seed=1)[0] != first


@pytest.mark.parametrize("augment", ["seed", "none", "trivial", "randaugment", "colorjitter"])
def test_build_transform_sizes(augment):
    img = Image.new("RGB", (90, 50), (10, 200, 30))
    for train in (False, True):
        x = build_transform(DATA_CONFIG, train=train, augment=augment)(img)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
