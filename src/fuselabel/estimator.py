"""``FuseLabel``: the model object, scikit-learn style.

    model = FuseLabel(preset="cpu", epochs=20)          # settings validated here, before any work
    model.fit("train.csv", images="data/")               # or fit(images=[...], captions=[...], labels=[...])
    model.predict(images=[img], captions=["a dog on a sofa"])   # -> [[1, 18]]
    model.save_pretrained("models/m1"); FuseLabel.from_pretrained("models/m1")

Training goes through ``train.fit`` and prediction through ``runtime.Predictor``; this class only
turns plain Python data into their inputs and back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Config, build_config
from .images import ImageInput
from .runtime import Prediction, Predictor


def _as_label(token: str):
    return int(token) if token.lstrip("-").isdigit() else token


class FuseLabel:
    """Multi-label classifier of (photo, caption) pairs.

    Any setting of ``fuselabel.config.Config`` is a keyword; an unknown key or a value that does
    not convert to its type raises ValueError naming it. ``preset`` names a preset, ``config`` a
    YAML file of settings; keywords win over both.
    """

    def __init__(self, preset: str | None = None, config: str | Path | None = None, **settings):
        self.preset, self.config_file, self.settings = preset, config, settings
        self.config: Config = build_config(preset, config, **settings)
        self.bundle_ = None
        self.result_ = None
        self._predictor: Predictor | None = None

    # ------------------------------------------------------------------ fitted state
    @property
    def labels_(self) -> list:
        """The output columns: label ids as in the training data (ints when every id is an integer)."""
        self._check_fitted()
        tokens = self.bundle_.labels
        return [_as_label(t) for t in tokens] if all(t.lstrip("-").isdigit() for t in tokens) else list(tokens)

    @property
    def label_names_(self) -> list[str]:
        self._check_fitted()
        return [self.bundle_.label_names.get(t, t) for t in self.bundle_.labels]

    @property
    def thresholds_(self) -> np.ndarray:
        self._check_fitted()
        return self.bundle_.threshold_vector

    def _check_fitted(self) -> None:
        if self.bundle_ is None:
            raise RuntimeError("this FuseLabel is not fitted yet: call fit(...) or FuseLabel.from_pretrained(path)")

    # ------------------------------------------------------------------ training
    def fit(self, csv: str | Path | None = None, images=None, *, captions: Sequence[str] | None = None,
            labels: Sequence[Sequence] | None = None, label_names: str | Path | dict | None = None,
            out: str | Path | None = None, progress: bool = True) -> "FuseLabel":
        """Train on a course-format CSV (``images`` = its photo folder) or on lists in memory.

        In memory, ``images`` is a list of paths, PIL images or file bytes (None: no photo), with
        ``captions`` and ``labels`` (one list of label ids per row) of the same length.
        ``out`` keeps the model folder there; without it the folder is temporary.
        """
        from .train import fit as train_fit

        work = Path(tempfile.mkdtemp(prefix="fuselabel-fit-"))
        try:
            if csv is not None:
                if captions is not None or labels is not None:
                    raise ValueError("give either a CSV or captions= and labels= lists, not both")
                if images is None:
                    raise ValueError("fit(csv, images=FOLDER): the folder of the CSV's photos is needed")
                rows, image_dir = csv, Path(images)
            else:
                rows, image_dir = _records_in_memory(images, captions, labels, work / "photos")
            target = Path(out) if out is not None else work / "model"
            self.result_ = train_fit(self.config, image_dir, rows, target, label_names=label_names, progress=progress)
            self._load(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self

    # ------------------------------------------------------------------ saving and loading
    @classmethod
    def from_pretrained(cls, path: str | Path, **runtime) -> "FuseLabel":
        """A model folder written by ``fit``/``save_pretrained``/``fuselabel train``.

        ``runtime`` takes where-it-runs settings only (``feature_engine``, ``cache_dir``, ``num_workers``).
        """
        model = cls.__new__(cls)
        model.preset, model.config_file, model.settings = None, None, {}
        model.bundle_, model.result_, model._predictor = None, None, None
        model.config = Config.from_dict(runtime, source="from_pretrained")  # only its runtime group is used
        model._load(Path(path))
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model folder (atomically: an existing folder is replaced only once the new one is whole)."""
        from .bundle import save_bundle

        self._check_fitted()
        source = self.bundle_.path
        extra = {}
        if source is not None:
            import json

            extra = {n: json.loads((source / n).read_text()) for n in ("split.json", "metrics.json")
                     if (source / n).exists()}
        self.bundle_.extra = extra
        history = source / "history.csv" if source is not None else None
        save_bundle(path, self.bundle_, {"history.csv": history} if history else None)
        self.bundle_.path = Path(path)
        return Path(path)

    def _load(self, path: Path) -> None:
        from .bundle import load_bundle

        self.bundle_ = load_bundle(path)
        # The folder holds what the model is; where it runs comes from this object's settings.
        self.bundle_.config = self.bundle_.config.replace(**self.config.to_dict("runtime"))
        self.config = self.bundle_.config
        self._predictor = None

    # ------------------------------------------------------------------ prediction
    def predictor(self, *, strict: bool = False, device=None) -> Predictor:
        """The ``runtime.Predictor`` this model predicts with. Its engine is built on the first call, on
        ``device`` (default: cuda when present), and reused; ``strict`` applies to the calls that follow."""
        from .engines import engine_for_bundle

        self._check_fitted()
        if self._predictor is None:
            cfg = self.bundle_.config
            engine = engine_for_bundle(self.bundle_, engine=cfg.feature_engine, device=device,
                                       cache_dir=cfg.cache_dir)
            self._predictor = Predictor(engine, self.bundle_.labels, self.bundle_.threshold_vector,
                                        self.bundle_.thresholds.get("ensure_nonempty", True),
                                        workers=cfg.num_workers)
        self._predictor.strict = strict
        return self._predictor

    def predict_details(self, images: Sequence[ImageInput] | None = None,
                        captions: Sequence[str | None] | None = None, *, strict: bool = False) -> Prediction:
        """Probabilities per head and fused, label sets, and which rows lacked a photo or a caption."""
        predictor = self.predictor(strict=strict)
        n = _length(images, captions)
        rows = zip(images if images is not None else [None] * n, captions if captions is not None else [None] * n)
        chunks = list(predictor.iter_predict(rows))
        return Prediction.concat(chunks) if chunks else predictor.predict([], [])

    def predict_proba(self, images: Sequence[ImageInput] | None = None,
                      captions: Sequence[str | None] | None = None) -> np.ndarray:
        """(rows, labels) fused probabilities; columns are ``labels_``. NaN on rows with neither input."""
        return self.predict_details(images, captions).probs

    def predict(self, images: Sequence[ImageInput] | None = None,
                captions: Sequence[str | None] | None = None) -> list[list]:
        """One list of label ids per row (empty for a row with neither photo nor caption)."""
        labels = self.labels_
        return [[labels[j] for j in np.flatnonzero(row)] for row in self.predict_details(images, captions).predicted]

    def evaluate(self, csv: str | Path, images: str | Path, *, split: str = "all", strict: bool = False) -> dict:
        """The metrics report on a labelled course-format CSV (``split``: only one side of the model's split)."""
        from .labels import labels_to_matrix
        from .metrics import evaluate as evaluate_sets
        from .records import read_records
        from .runtime import STATUSES

        self._check_fitted()
        records = read_records(csv)
        if not records.labelled:
            raise ValueError(f"{csv}: evaluate needs a Labels column (header ImageID,Labels,Caption)")
        rows = split_rows(self.bundle_.path, records.records, split)
        names = (f"row {r.image_id} (CSV line {r.line})" for r in rows)
        chunks = list(self.predictor(strict=strict).iter_predict(((r.image_id, r.caption) for r in rows),
                                                                 image_dir=images, names=names))
        p = Prediction.concat(chunks)
        tokens = self.bundle_.labels
        truth = labels_to_matrix([r.labels for r in rows], tokens)
        report = evaluate_sets(truth, p.predicted, tokens, self.bundle_.label_names)
        report.update(model_dir=str(self.bundle_.path), csv=str(csv), split=split,
                      status_counts={s: p.status.count(s) for s in STATUSES})
        return report


def split_rows(model_dir, records: list, split: str) -> list:
    """The rows of one side of the model's own train/validation split (``all`` keeps every row)."""
    import json

    if split == "all":
        return records
    path = Path(model_dir) / "split.json"
    if not path.exists():
        raise ValueError(f"{model_dir}: no split.json, so --split {split} cannot be applied")
    ids = set(json.loads(path.read_text())[f"{split}_ids"])
    chosen = [r for r in records if r.image_id in ids]
    if not chosen:
        raise ValueError(f"none of the CSV's rows are on the {split} side of {path}")
    return chosen


def _length(images, captions) -> int:
    if images is None and captions is None:
        raise ValueError("give images=, captions= or both")
    if images is not None and captions is not None and len(images) != len(captions):
        raise ValueError(f"images and captions differ in length ({len(images)} and {len(captions)})")
    return len(images) if images is not None else len(captions)


def _records_in_memory(images, captions, labels, folder: Path):
    """Rows in memory as a RecordSet over files: photos given as PIL images or bytes are written to ``folder``."""
    from PIL import Image

    from .records import Record, RecordSet

    if labels is None or captions is None:
        raise ValueError("fit in memory needs captions= and labels= (and images=) lists of the same length")
    n = len(labels)
    images = list(images) if images is not None else [None] * n
    if not (len(images) == len(captions) == n):
        raise ValueError(f"images, captions and labels differ in length ({len(images)}, {len(captions)}, {n})")
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (img, caption, row_labels) in enumerate(zip(images, captions, labels)):
        if isinstance(img, Image.Image):
            name = f"row{i}.png"
            img.save(folder / name)
        elif isinstance(img, (bytes, bytearray)):
            name = f"row{i}.img"
            (folder / name).write_bytes(img)
        elif img is None:
            name = f"row{i}.missing"
        else:
            name = str(Path(img).resolve())
        tokens = tuple(dict.fromkeys(str(label) for label in row_labels))
        records.append(Record(image_id=name, caption=caption or "", labels=tokens, line=i + 1))
    return RecordSet(path=folder / "rows", records=records, labelled=True), folder
