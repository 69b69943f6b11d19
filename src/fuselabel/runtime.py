"""The one prediction path: rows of (photo, caption) -> features -> per-head probabilities -> fusion -> label sets.

Torch-free. What runs the encoders and the heads is an *engine*: eager PyTorch or onnxruntime
over a trained model folder (``fuselabel.engines``), or onnxruntime over an exported ONNX folder
(``fuselabel.onnx_folder``, which needs neither torch nor torchvision). Everything else is here (or in
``fuselabel.encoding``, the window loops), written once: caption handling, missing inputs, fusion and
thresholds, in chunks of bounded size so memory does not grow with the number of rows.

A row whose photo is missing or unreadable is predicted from its caption, a row with an empty
caption from its photo; each is flagged in ``Prediction.status``. A row with neither has no
probabilities (NaN) and no labels. ``strict=True`` makes any missing input an error naming the row.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .encoding import PIECE, WINDOW, Engine, image_window, over_windows
from .images import ImageError, ImageInput, pixel_table
from .thresholds import apply_argmax, apply_thresholds

log = logging.getLogger(__name__)

STATUSES = ("ok", "caption_only", "image_only", "no_input")


@dataclass
class Prediction:
    """What the model says about a batch of rows; every array has one row per input row."""

    probs: np.ndarray  # (n, L) fused probabilities; NaN where a row had no usable input
    parts: dict[str, np.ndarray]  # per-head probabilities: image / text (late), early, or one head
    predicted: np.ndarray  # (n, L) bool: the label sets
    image_present: np.ndarray  # (n,) bool
    caption_present: np.ndarray  # (n,) bool
    status: list[str]  # ok | caption_only | image_only | no_input
    image_errors: list[str | None] = field(default_factory=list)  # why a photo was unusable
    texts_cut: int = 0  # captions longer than the model's text length, cut to it
    # Whether the row's label set would differ without its photo / its caption (late fusion and one-input
    # models; None for early fusion, whose one head mixes both inputs and cannot be taken apart).
    image_changed: np.ndarray | None = None
    caption_changed: np.ndarray | None = None
    captions_read: list[CaptionReading | None] = field(default_factory=list)  # None: no caption, or not read

    def __len__(self) -> int:
        return len(self.status)

    @classmethod
    def concat(cls, chunks: Sequence[Prediction]) -> Prediction:
        first = chunks[0]
        return cls(
            probs=np.concatenate([c.probs for c in chunks]),
            parts={k: np.concatenate([c.parts[k] for c in chunks]) for k in first.parts},
            predicted=np.concatenate([c.predicted for c in chunks]),
            image_present=np.concatenate([c.image_present for c in chunks]),
            caption_present=np.concatenate([c.caption_present for c in chunks]),
            status=[s for c in chunks for s in c.status],
            image_errors=[e for c in chunks for e in c.image_errors],
            texts_cut=sum(c.texts_cut for c in chunks),
            image_changed=None if first.image_changed is None else np.concatenate([c.image_changed for c in chunks]),
            caption_changed=(
                None if first.caption_changed is None else np.concatenate([c.caption_changed for c in chunks])
            ),
            captions_read=[r for c in chunks for r in c.captions_read],
        )


@dataclass
class CaptionReading:
    """How much of one caption the model reads: its tokens (special ones included) against the text length,
    and its words (runs of non-space) wholly inside the part read."""

    tokens: int
    tokens_read: int
    max_tokens: int
    words: int
    words_read: int
    read_text: str  # the caption's start that the model reads

    @property
    def cut(self) -> bool:
        return self.tokens > self.tokens_read


def fuse(
    parts: dict[str, np.ndarray], combine: str, weight: float, image_present: np.ndarray, caption_present: np.ndarray
) -> np.ndarray:
    """One probability per label from per-head probabilities: late fusion's two rules and missing inputs.

    Rows missing an input are judged by the head that saw the other one; a head that saw nothing
    gives NaN, so such a row can never pass a threshold by accident.
    """
    image_present = np.asarray(image_present, bool)[:, None]
    caption_present = np.asarray(caption_present, bool)[:, None]
    if len(parts) == 1:
        ((name, p),) = parts.items()
        seen = {"image": image_present, "text": caption_present}.get(name, image_present | caption_present)
        return np.where(seen, p, np.nan).astype(np.float32)
    p_img, p_txt = parts["image"], parts["text"]
    # The union of two thresholded sets under one threshold t is exactly {max(p_img, p_txt) >= t},
    # so the max lets thresholds be tuned and stored like any other model's.
    both = np.maximum(p_img, p_txt) if combine == "union" else weight * p_img + (1 - weight) * p_txt
    fused = np.where(
        image_present & caption_present, both, np.where(image_present, p_img, np.where(caption_present, p_txt, np.nan))
    )
    return fused.astype(np.float32)


def inputs_read(kind: str, combine: str | None, weight: float | None) -> str:
    """Which inputs a model's decisions rest on: ``both``, ``caption only`` or ``photo only``.

    A weighted late fusion whose photo weight is 0 decides from the caption alone wherever a caption is given
    (and a weight of 1 from the photo alone); only a row missing that input falls back on the other head.
    """
    if kind in ("image", "text"):
        return "photo only" if kind == "image" else "caption only"
    if kind == "late" and combine == "weighted" and weight is not None:
        w = round(float(weight), 4)  # stored in fp16: 0.35 reads back as 0.350098
        return "caption only" if w == 0 else "photo only" if w == 1 else "both"
    return "both"


def describe_fusion(kind: str, combine: str, weight: float) -> dict:
    """How a model's heads make one probability, for a person reading the heads' figures: ``kind``,
    ``combine`` (late fusion's rule), ``image_weight`` (the photo head's share under ``weighted``), ``rule``,
    and ``reads`` (:func:`inputs_read`: ``caption only`` for a model whose photo weight is 0)."""
    combine = combine if kind == "late" else None
    weight = round(float(weight), 4) if combine == "weighted" else None
    rules = {
        "image": "the photo head alone",
        "text": "the caption head alone",
        "early": "one head over the photo's and the caption's features together",
    }
    if kind == "late":
        both = (
            "the larger of the photo head's and the caption head's probability"
            if combine == "union"
            else f"{weight:g} x the photo head's probability + {1 - weight:g} x the caption head's"
        )
        rules["late"] = f"{both}; with only one input given, that input's head alone"
    reads = inputs_read(kind, combine, weight)
    return {"kind": kind, "combine": combine, "image_weight": weight, "rule": rules[kind], "reads": reads}


def decide(probs: np.ndarray, thresholds: np.ndarray, ensure_nonempty: bool, task: str = "multilabel") -> np.ndarray:
    """Label sets from probabilities; rows without probabilities get no labels.

    ``task="multiclass"``: the most probable label alone, whatever the thresholds (the max of two
    softmaxes under ``union`` can put two labels over any threshold).
    """
    known = ~np.isnan(probs).any(axis=1)
    out = np.zeros(probs.shape, dtype=bool)
    if known.any():
        out[known] = (
            apply_argmax(probs[known])
            if task == "multiclass"
            else apply_thresholds(probs[known], thresholds, ensure_nonempty)
        )
    return out


def caption_given(caption) -> bool:
    return isinstance(caption, str) and bool(caption.strip())


def uses_image(kind: str) -> bool:
    return kind in ("image", "early", "late")


def uses_text(kind: str) -> bool:
    return kind in ("text", "early", "late")


class Predictor:
    """Chunked prediction over any engine: the only place rows become probabilities and label sets."""

    def __init__(
        self,
        engine: Engine,
        labels: Sequence[str],
        thresholds,
        ensure_nonempty: bool = True,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        strict: bool = False,
        chunk_size: int = 8 * WINDOW,
        task: str | None = None,
    ):
        self.engine = engine
        self.labels = list(labels)
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.ensure_nonempty = ensure_nonempty
        # The decision rule follows the model (its engine) unless a caller says otherwise.
        self.task = task or getattr(engine, "task", "multilabel")
        self.texts_cut = 0  # captions cut to the model's text length, over every call so far
        self.batch_size = batch_size or engine.image_batch  # photos a run: the engine's (encoding.ORT_IMAGE_BATCH)
        self.workers = workers
        self.strict = strict
        if PIECE % self.batch_size or chunk_size % WINDOW:  # runs at fixed positions of fixed windows
            raise ValueError(
                f"batch_size must divide {PIECE} and chunk_size be a multiple of {WINDOW} "
                f"(got {self.batch_size} and {chunk_size})"
            )
        self.chunk_size = chunk_size
        self._reader = None  # the engine's tokenizer without truncation, built on the first caption read
        self._reader_lock = getattr(engine, "_lock", None) or threading.Lock()

    def predict(
        self,
        images: Sequence[ImageInput] | None,
        captions: Sequence[str | None] | None,
        *,
        image_dir=None,
        row_names: Sequence[str] | None = None,
        read_captions: bool = True,
    ) -> Prediction:
        """One chunk of rows (callers keep chunks bounded; ``iter_predict`` does it for them). ``read_captions``
        False leaves ``captions_read`` empty: files of predictions, which do not show it, skip that tokenising."""
        kind = self.engine.kind
        n = len(images) if images is not None else len(captions)
        images = list(images) if images is not None else [None] * n
        captions = list(captions) if captions is not None else [None] * n
        if len(images) != len(captions):
            raise ValueError(f"images and captions differ in length ({len(images)} and {len(captions)})")
        feats: dict[str, np.ndarray] = {}
        errors: list[str | None] = [None] * n
        image_present = np.zeros(n, bool)
        caption_present = np.array([caption_given(c) for c in captions], bool)
        if not uses_text(kind):
            caption_present[:] = False
        table = pixel_table(self.engine.data_config) if uses_image(kind) else None
        cut_before = getattr(self.engine, "texts_cut", 0)

        def piece(lo: int, hi: int):
            # The photos of one piece on one worker, while the other workers take the next pieces. A window's
            # captions go with its first piece: the text encoder's batches, and so its numbers, are the window's.
            photos = images[lo:hi]
            image = image_window(self.engine, photos, image_dir, self.batch_size, table) if uses_image(kind) else None
            idx = np.flatnonzero(caption_present[lo : lo + WINDOW]) if lo % WINDOW == 0 else []
            text = self.engine.text_features([captions[lo + i] for i in idx]) if len(idx) else None
            return image, (idx, text)

        span = PIECE if uses_image(kind) else WINDOW
        for lo, (image, (idx, text)) in over_windows(piece, n, self.workers, size=span):
            if image is not None:
                f, p, e = image
                image_present[lo : lo + len(p)], errors[lo : lo + len(e)] = p, e
                if f is not None:
                    _rows_of(feats, "image_feat", n, f.shape[1])[lo : lo + len(f)] = f
            if text is not None:
                _rows_of(feats, "text_feat", n, text.shape[1])[lo + idx] = text
        texts_cut = getattr(self.engine, "texts_cut", 0) - cut_before
        if self.strict:
            self._check_strict(image_present, caption_present, errors, row_names, kind)
        self.texts_cut += texts_cut
        pred = self.predict_features(feats, image_present, caption_present, image_errors=errors, texts_cut=texts_cut)
        if read_captions:
            read = iter(self.read_captions([c for c, seen in zip(captions, caption_present) if seen]))
            pred.captions_read = [next(read) if seen else None for seen in caption_present]
        return pred

    def read_caption(self, caption: str) -> CaptionReading | None:
        """How much of ``caption`` this model reads (None: the model reads no captions)."""
        return self.read_captions([caption])[0]

    def read_captions(self, captions: Sequence[str]) -> list[CaptionReading | None]:
        """How much of each caption this model reads, tokenised in one call (all None: it reads no captions)."""
        length = getattr(self.engine, "max_length", None) or getattr(self.engine, "manifest", {}).get("text_max_length")
        if not uses_text(self.engine.kind) or getattr(self.engine, "tokenizer", None) is None or not length:
            return [None] * len(captions)
        if not captions:
            return []
        with self._reader_lock:  # a fast tokenizer is not safe from several threads at once
            if self._reader is None:
                self._reader = _untruncated(self.engine.tokenizer)
            encoded = self._reader(list(captions))
        return [None if e is None else _reading(c, *e, int(length)) for c, e in zip(captions, encoded)]

    def predict_features(
        self,
        feats: dict[str, np.ndarray],
        image_present,
        caption_present,
        *,
        image_errors: list | None = None,
        texts_cut: int = 0,
    ) -> Prediction:
        """The rest of the path from encoder features on (``image_feat``, ``text_feat``: rows already encoded,
        such as the frozen features training cached): heads in fixed windows, fusion, the decision rule."""
        kind = self.engine.kind
        image_present = np.asarray(image_present, bool)
        caption_present = np.asarray(caption_present, bool)
        n = len(image_present)
        inputs = self._complete(feats, n, image_present, caption_present)
        windows = [self.engine.heads({k: v[lo : lo + WINDOW] for k, v in inputs.items()}) for lo in range(0, n, WINDOW)]
        parts = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]} if n else {}
        probs = (
            fuse(parts, self.engine.late_combine, self.engine.late_weight, image_present, caption_present)
            if n
            else np.zeros((0, len(self.labels)), np.float32)
        )
        status = [_status(i, c, kind) for i, c in zip(image_present, caption_present)]
        predicted = decide(probs, self.thresholds, self.ensure_nonempty, self.task)
        image_changed, caption_changed = self._effects(parts, image_present, caption_present, predicted)
        return Prediction(
            probs=probs,
            parts=parts,
            predicted=predicted,
            image_changed=image_changed,
            caption_changed=caption_changed,
            image_present=image_present,
            caption_present=caption_present,
            status=status,
            image_errors=image_errors if image_errors is not None else [None] * n,
            texts_cut=texts_cut,
        )

    def _effects(self, parts: dict, image_present: np.ndarray, caption_present: np.ndarray, predicted: np.ndarray):
        """(photo changed the label set, caption changed it) per row: the heads' figures fused again as if that
        input were absent. None, None for early fusion, whose one head cannot be taken apart."""
        kind, none = self.engine.kind, np.zeros(len(predicted), bool)
        if kind == "early":
            return None, None
        if not len(predicted):
            return none, none

        def differs(image, caption) -> np.ndarray:
            probs = fuse(parts, self.engine.late_combine, self.engine.late_weight, image, caption)
            return (decide(probs, self.thresholds, self.ensure_nonempty, self.task) != predicted).any(axis=1)

        image_changed = image_present & differs(none, caption_present) if uses_image(kind) else none
        caption_changed = caption_present & differs(image_present, none) if uses_text(kind) else none
        return image_changed, caption_changed

    def _complete(self, feats: dict, n: int, image_present: np.ndarray, caption_present: np.ndarray) -> dict:
        """Every input the heads take, with zeros for what a row lacks (its head's answer is then unused)."""
        out = dict(feats)
        dims = self.engine.feature_dims
        if uses_image(self.engine.kind):
            out.setdefault("image_feat", np.zeros((n, dims["image"]), np.float32))
            out["image_present"] = image_present.astype(np.float32)
        if uses_text(self.engine.kind):
            out.setdefault("text_feat", np.zeros((n, dims["text"]), np.float32))
            out["caption_present"] = caption_present.astype(np.float32)
        return out

    def _check_strict(self, image_present, caption_present, errors, row_names, kind) -> None:
        for i in range(len(image_present)):
            name = row_names[i] if row_names is not None else f"row {i}"
            if uses_image(kind) and not image_present[i]:
                raise ImageError(
                    f"{name}: {errors[i]} (strict mode: every row needs its photo; drop --strict to "
                    "predict such rows from their caption)"
                )
            if uses_text(kind) and not caption_present[i]:
                raise ValueError(
                    f"{name}: empty caption (strict mode: every row needs its caption; drop --strict "
                    "to predict such rows from their photo)"
                )

    def iter_predict(
        self,
        rows: Iterable[tuple[ImageInput, str | None]],
        *,
        image_dir=None,
        names: Iterable[str] | None = None,
        chunk_size: int | None = None,
    ) -> Iterator[Prediction]:
        """Predictions for a stream of (photo, caption) rows, one bounded chunk at a time, in order."""
        size = chunk_size or self.chunk_size
        names_iter = iter(names) if names is not None else None
        chunk: list = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == size:
                yield self._chunk(chunk, image_dir, names_iter)
                chunk = []
        if chunk:
            yield self._chunk(chunk, image_dir, names_iter)

    def _chunk(self, chunk, image_dir, names_iter) -> Prediction:
        names = [next(names_iter) for _ in chunk] if names_iter is not None else None
        return self.predict([r[0] for r in chunk], [r[1] for r in chunk], image_dir=image_dir, row_names=names)


def _rows_of(feats: dict, key: str, n: int, dim: int) -> np.ndarray:
    """``feats[key]``, made (n, dim) zeros on first use (once: a chunk has 32 pieces, each of 2.6 MB zeros)."""
    if key not in feats:
        feats[key] = np.zeros((n, dim), np.float32)
    return feats[key]


def _untruncated(tokenizer):
    """captions -> [(token offsets, special-token flags)], uncut: a ``tokenizers.Tokenizer`` (exported folders) is
    copied without its truncation and padding; a Hugging Face tokenizer is asked not to cut (None for each caption
    where it is a slow one, which gives no offsets)."""
    if hasattr(tokenizer, "encode_batch"):
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(tokenizer.to_str())
        copy.no_truncation()
        copy.no_padding()
        return lambda captions: [(e.offsets, e.special_tokens_mask) for e in copy.encode_batch(captions)]

    if not getattr(tokenizer, "is_fast", False):  # only a fast tokenizer tells where its tokens lie
        return lambda captions: [None] * len(captions)

    def read_hf(captions: list[str]):
        enc = tokenizer(
            captions, truncation=False, verbose=False, return_offsets_mapping=True, return_special_tokens_mask=True
        )
        return list(zip(enc["offset_mapping"], enc["special_tokens_mask"]))

    return read_hf


def _reading(caption: str, offsets, special, length: int) -> CaptionReading:
    """What ``length`` tokens keep of ``caption``, from its uncut tokens: the special tokens stay, the content
    tokens past the rest of the length are cut."""
    content = [o for o, s in zip(offsets, special) if not s]
    keep = max(0, length - (len(offsets) - len(content)))
    end = len(caption) if keep >= len(content) else (content[keep - 1][1] if keep else 0)
    words = [m.end() for m in re.finditer(r"\S+", caption)]
    return CaptionReading(
        tokens=len(offsets),
        tokens_read=min(len(offsets), length),
        max_tokens=length,
        words=len(words),
        words_read=sum(e <= end for e in words),
        read_text=caption[:end],
    )


def _status(image: bool, caption: bool, kind: str) -> str:
    if image and caption or (image and kind == "image") or (caption and kind == "text"):
        return "ok"
    if caption:
        return "caption_only"
    if image:
        return "image_only"
    return "no_input"
