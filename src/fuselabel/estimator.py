"""``FuseLabel``: the model object, scikit-learn style.

    model = FuseLabel(preset="cpu", epochs=20)          # settings validated here, before any work
    model.fit("train.csv", images="data/")               # or fit(images=[...], captions=[...], labels=[...])
    model.predict(images=[img], captions=["a dog on a sofa"])   # -> [[1, 18]]
    model.save_pretrained("models/m1"); FuseLabel.from_pretrained("models/m1")

Training goes through ``train.fit`` and prediction through ``runtime.Predictor``; this class only
turns plain Python data into their inputs and back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import Config, build_config, check_keys
from .images import ImageInput
from .runtime import Prediction, Predictor

log = logging.getLogger(__name__)


def _as_label(token: str):
    return int(token) if token.lstrip("-").isdigit() else token


class FuseLabel:
    """Multi-label classifier of (photo, text) pairs, with scikit-learn's and Hugging Face's contracts.

    Any setting of ``fuselabel.config.Config`` is a keyword; ``preset`` names a preset, ``config`` a
    YAML file of settings; keywords win over both. As in scikit-learn, the constructor only stores what it
    is given (``get_params``/``set_params``/``sklearn.base.clone`` work on exactly that), and ``fit`` checks
    it: an unknown key or a value that does not convert to its type raises ValueError naming it before any
    work. ``get_config()`` checks and returns the settings without fitting.
    """

    _estimator_type = "classifier"  # scikit-learn < 1.6 reads this; newer ones ask __sklearn_tags__

    def __init__(self, preset: str | None = None, config: str | Path | None = None, **settings):
        self.preset = preset
        self.config = config
        self.settings = settings
        self._predictor: Predictor | None = None

    # ------------------------------------------------------------------ scikit-learn's contract
    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments, as given: ``preset``, ``config`` and every setting keyword."""
        return {"preset": self.preset, "config": self.config, **self.settings}

    def set_params(self, **params) -> FuseLabel:
        """Change constructor arguments (checked, like the constructor's, at ``fit``); an unknown key is refused."""
        check_keys([k for k in params if k not in ("preset", "config")], "FuseLabel.set_params")
        for key, value in params.items():
            if key in ("preset", "config"):
                setattr(self, key, value)
            else:
                self.settings[key] = value
        return self

    def get_config(self) -> Config:
        """The settings the constructor's arguments make, checked (ValueError naming a bad key or value)."""
        return build_config(self.preset, self.config, **self.settings)

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "bundle_", None) is not None

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True, multi_output=True),
            classifier_tags=ClassifierTags(multi_class=True, multi_label=True),
            non_deterministic=True,
        )

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if v is not None}
        return f"FuseLabel({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __getstate__(self) -> dict:
        # The engine holds sessions and compiled graphs that do not pickle; it is rebuilt on first use.
        state = dict(self.__dict__)
        state["_predictor"] = None
        return state

    # ------------------------------------------------------------------ fitted state
    @property
    def config_(self) -> Config:
        """The fitted model's settings (what it is, how it was trained, where it runs)."""
        self._check_fitted()
        return self.bundle_.config

    @property
    def labels_(self) -> list:
        """The output columns: labels as in the training data (ints when every label is an integer)."""
        self._check_fitted()
        tokens = self.bundle_.labels
        return [_as_label(t) for t in tokens] if all(t.lstrip("-").isdigit() for t in tokens) else list(tokens)

    @property
    def classes_(self) -> np.ndarray:
        """``labels_`` as scikit-learn names them."""
        return np.asarray(self.labels_, dtype=object)

    @property
    def label_names_(self) -> list[str]:
        self._check_fitted()
        return [self.bundle_.label_names.get(t, t) for t in self.bundle_.labels]

    @property
    def thresholds_(self) -> np.ndarray:
        self._check_fitted()
        return self.bundle_.threshold_vector

    def _check_fitted(self) -> None:
        if getattr(self, "bundle_", None) is None:
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this FuseLabel is not fitted yet: call fit(...) or FuseLabel.from_pretrained(path)")

    # ------------------------------------------------------------------ training
    def fit(
        self,
        data=None,
        images=None,
        *,
        captions: Sequence[str] | None = None,
        labels: Sequence[Sequence] | None = None,
        label_names: str | Path | dict | None = None,
        image_col: str | None = None,
        text_col: str | Sequence[str] | None = None,
        label_col: str | None = None,
        id_col: str | None = None,
        label_sep: str | None = None,
        split_col: str | None = None,
        val=None,
        out: str | Path | None = None,
        progress: bool = True,
    ) -> FuseLabel:
        """Train on a table, or on lists in memory.

        ``data`` is a table's path (CSV, TSV, JSON Lines, Parquet, or the course CSV) or a pandas DataFrame,
        and ``images`` the folder its photo paths are relative to; ``image_col``, ``text_col`` (one or
        several), ``label_col``, ``id_col``, ``label_sep`` and ``split_col`` name its columns (found when not
        given). ``val`` is a table of validation rows (else a split column's ``val`` rows, else a stratified
        share). In memory, ``images`` is a list of paths, PIL images or file bytes (None: no photo), with
        ``captions`` and ``labels`` (one list of labels per row, any strings) of the same length.
        ``out`` keeps the model folder there; without it the folder is temporary.
        """
        from .tables import Columns
        from .train import fit as train_fit

        config = self.get_config()  # checked before any work, naming a bad key
        columns = Columns.of(image_col, text_col, label_col, id_col, split_col, label_sep)
        work = Path(tempfile.mkdtemp(prefix="fuselabel-fit-"))
        try:
            if data is not None:
                if captions is not None or labels is not None:
                    raise ValueError("give either a table (data=) or captions= and labels= lists, not both")
                if not _is_table(data):
                    raise ValueError(
                        f"fit(data=...): expected a table's path (.csv, .tsv, .jsonl, .parquet) or a "
                        f"pandas DataFrame, got {type(data).__name__}"
                    )
                # photo paths are relative to ``images``; without it, absolute or relative to where this runs
                rows, image_dir = data, Path(images) if images is not None else Path(".")
            else:
                rows, image_dir = _records_in_memory(images, captions, labels, work / "photos")
            target = Path(out) if out is not None else work / "model"
            self.result_ = train_fit(
                config, image_dir, rows, target, label_names=label_names, progress=progress, columns=columns, val=val
            )
            self._load(target, config.to_dict("runtime"), keep_path=out is not None)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self

    # ------------------------------------------------------------------ saving and loading
    @classmethod
    def from_pretrained(cls, path: str | Path, **runtime) -> FuseLabel:
        """A model folder written by ``fit``/``save_pretrained``/``fuselabel train``.

        ``runtime`` takes where-it-runs settings only (``feature_engine``, ``cache_dir``, ``num_workers``,
        ...); a setting of what the model is or how it was trained is refused, naming it, since the folder
        fixes those.
        """
        check_keys(
            runtime,
            f"from_pretrained({path}): the folder fixes what the model is and how it was trained, so",
            groups=("runtime",),
        )
        model = cls(**runtime)
        model._load(Path(path), Config.from_dict(runtime, source="from_pretrained").to_dict("runtime"))
        return model

    @classmethod
    def from_exported(cls, folder: str | Path, model_dir: str | Path, **runtime) -> FuseLabel:
        """A model folder run from its exported ONNX copy ``folder`` (``export.export_cached`` makes it): it
        predicts and evaluates, its own split included, through onnxruntime, without loading torch."""
        import json

        model = cls.from_pretrained(folder, **runtime)
        split = Path(model_dir) / "split.json"
        model.bundle_.extra = {"split.json": json.loads(split.read_text())} if split.is_file() else {}
        model.bundle_.source = Path(model_dir)
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write what this object holds (weights, settings, split, metrics, history) as a model folder,
        atomically: an existing folder is replaced only once the new one is whole."""
        from .bundle import save_bundle

        self._check_fitted()
        if isinstance(self.bundle_, Exported):
            raise ValueError(
                f"{self.bundle_.path} is an exported ONNX folder: it predicts, but holds no PyTorch "
                "weights to save; copy the folder instead, or export the model folder again"
            )
        with tempfile.TemporaryDirectory(prefix="fuselabel-save-") as tmp:
            files = {}
            if self._history is not None:
                (Path(tmp) / "history.csv").write_bytes(self._history)
                files["history.csv"] = Path(tmp) / "history.csv"
            save_bundle(path, self.bundle_, files or None)
        self.bundle_.path = Path(path)
        return Path(path)

    def _load(self, path: Path, runtime: dict, keep_path: bool = True) -> None:
        """Load a folder into memory whole: weights, settings and the run's records (split, metrics,
        history), so nothing depends on the folder staying there."""
        import json

        from .runtime import is_onnx_folder

        if is_onnx_folder(path):
            self.bundle_, self._history, self._predictor = Exported.load(path, runtime), None, None
            return
        from .bundle import load_bundle  # torch: only for a model folder's own weights

        bundle = load_bundle(path)
        # The folder holds what the model is; where it runs comes from this object's settings.
        bundle.config = bundle.config.replace(**runtime)
        bundle.extra = {
            n: json.loads((path / n).read_text()) for n in ("split.json", "metrics.json") if (path / n).is_file()
        }
        self._history = (path / "history.csv").read_bytes() if (path / "history.csv").is_file() else None
        bundle.path = Path(path) if keep_path else None
        self.bundle_ = bundle
        self._predictor = None

    # ------------------------------------------------------------------ prediction
    def predictor(self, *, strict: bool = False, device=None) -> Predictor:
        """The ``runtime.Predictor`` this model predicts with. Its engine is built on the first call, on
        ``device`` (default: cuda when present), and reused; ``strict`` applies to the calls that follow."""
        self._check_fitted()
        if self._predictor is None and isinstance(self.bundle_, Exported):
            from .runtime import load_onnx_predictor

            self._predictor, _ = load_onnx_predictor(self.bundle_.path, workers=self.bundle_.config.num_workers)
        if self._predictor is None:
            from .engines import engine_for_bundle  # torch: only for a model folder's own weights

            cfg = self.bundle_.config
            engine = engine_for_bundle(self.bundle_, engine=cfg.feature_engine, device=device, cache_dir=cfg.cache_dir)
            self._predictor = Predictor(
                engine,
                self.bundle_.labels,
                self.bundle_.threshold_vector,
                self.bundle_.thresholds.get("ensure_nonempty", True),
                workers=cfg.num_workers,
            )
        self._predictor.strict = strict
        return self._predictor

    def _rows(self, data, images, captions, columns: dict):
        """(photos, captions, image folder, row names) from a table (path or DataFrame) or from lists."""
        if data is not None and _is_table(data):
            from .tables import Columns, read_table

            if captions is not None:
                raise ValueError("give either a table (data=) or captions=, not both")
            if images is not None and not isinstance(images, (str, os.PathLike)):
                raise ValueError("with a table, images= is the folder its photo paths are relative to")
            records = read_table(data, Columns.of(**columns), trained=self.bundle_.table)
            return (
                [r.image_id or None for r in records.records],
                [r.caption for r in records.records],
                images,
                [records.row_name(r) for r in records.records],
            )
        if any(v is not None for v in columns.values()):
            raise ValueError(
                f"{', '.join(k for k, v in columns.items() if v is not None)}: only for a table given "
                "as data= (a path or a DataFrame)"
            )
        if data is not None:  # the photos, given first as in predict(photos, captions)
            if images is not None and captions is None:
                captions = images
            elif images is not None:
                raise ValueError("photos given twice: as the first argument and as images=")
            images = data
        images, captions = _one_row_or_many(images, "images"), _one_row_or_many(captions, "captions")
        n = _length(images, captions)
        return (
            list(images) if images is not None else [None] * n,
            list(captions) if captions is not None else [None] * n,
            None,
            None,
        )

    def predict_details(
        self,
        data=None,
        captions: Sequence[str | None] | None = None,
        *,
        images: Sequence[ImageInput] | str | Path | None = None,
        strict: bool = False,
        **columns,
    ) -> Prediction:
        """Probabilities per head and fused, label sets, and which rows lacked a photo or a caption.

        ``data`` is a table (a path or a DataFrame; ``images`` is then its photo folder, and ``image_col``,
        ``text_col`` ... name its columns) or the photos themselves (paths, PIL images or bytes; None: no photo).
        """
        columns = _column_keywords(columns)
        self._check_fitted()
        photos, texts, image_dir, names = self._rows(data, images, captions, columns)
        predictor = self.predictor(strict=strict)
        chunks = list(predictor.iter_predict(zip(photos, texts), image_dir=image_dir, names=names))
        result = Prediction.concat(chunks) if chunks else predictor.predict([], [])
        _warn_missing_inputs(result, photos)
        return result

    def predict_proba(
        self,
        data=None,
        captions: Sequence[str | None] | None = None,
        *,
        images: Sequence[ImageInput] | str | Path | None = None,
        **columns,
    ) -> np.ndarray:
        """(rows, labels) fused probabilities; columns are ``labels_``. NaN on rows with neither input."""
        return self.predict_details(data, captions, images=images, **columns).probs

    def predict(
        self,
        data=None,
        captions: Sequence[str | None] | None = None,
        *,
        images: Sequence[ImageInput] | str | Path | None = None,
        **columns,
    ) -> list[list]:
        """One list of labels per row (empty for a row with neither photo nor caption)."""
        labels = self.labels_
        details = self.predict_details(data, captions, images=images, **columns)
        return [[labels[j] for j in np.flatnonzero(row)] for row in details.predicted]

    def evaluate(self, data, images: str | Path, *, split: str = "all", strict: bool = False, **columns) -> dict:
        """The metrics report on a labelled table (``split``: only one side of the model's split).

        A label the model never saw counts as missed on every row that holds it (and is named once in a
        warning), so the figure is what the model would score on these rows.
        """
        from .labels import label_vocabulary, labels_to_matrix, sort_labels
        from .metrics import evaluate as evaluate_sets
        from .runtime import STATUSES
        from .tables import Columns, read_table

        self._check_fitted()
        records = read_table(
            data, Columns.of(**_column_keywords(columns)), trained=self.bundle_.table, need_labels=True
        )
        rows = split_rows(self.bundle_, records.records, split)
        names = (records.row_name(r) for r in rows)
        chunks = list(
            self.predictor(strict=strict).iter_predict(
                ((r.image_id or None, r.caption) for r in rows), image_dir=images, names=names
            )
        )
        p = Prediction.concat(chunks)
        tokens = list(self.bundle_.labels)
        unseen = sort_labels(set(label_vocabulary(r.labels for r in rows)) - set(tokens))
        predicted = p.predicted
        if unseen:
            held = sum(any(label in unseen for label in r.labels) for r in rows)
            log.warning(
                f"{records.path}: {len(unseen)} label(s) the model never saw ({', '.join(unseen[:10])}"
                f"{' ...' if len(unseen) > 10 else ''}) on {held} row(s): counted as missed on every row "
                "that holds them"
            )
            predicted = np.concatenate([predicted, np.zeros((len(rows), len(unseen)), bool)], axis=1)
        vocab = tokens + unseen
        truth = labels_to_matrix([r.labels for r in rows], vocab)
        report = evaluate_sets(truth, predicted, vocab, self.bundle_.label_names)
        if self.bundle_.config.task == "multiclass":
            report["accuracy"] = report["exact_match"]  # one label a row: every label right
        folder = getattr(self.bundle_, "source", None) or self.bundle_.path  # an exported copy names its model's
        report.update(
            model_dir=str(folder),
            csv=str(records.path),
            split=split,
            status_counts={s: p.status.count(s) for s in STATUSES},
            unseen_labels=unseen,
            texts_cut=p.texts_cut,
        )
        return report


@dataclasses.dataclass
class Exported:
    """An exported ONNX folder (``fuselabel export``), in the shape this class reads of a loaded model folder:
    it predicts and evaluates (through onnxruntime, without torch) but cannot be re-saved or fine-tuned."""

    labels: list
    label_names: dict
    thresholds: dict
    table: dict
    config: Config
    path: Path
    extra: dict = dataclasses.field(default_factory=dict)
    source: Path | None = None  # the model folder this copy was exported from, where known

    @property
    def threshold_vector(self) -> np.ndarray:
        return np.asarray(self.thresholds["thresholds"], dtype=np.float32)

    @classmethod
    def load(cls, path: Path, runtime: dict) -> Exported:
        import json

        from .runtime import MANIFEST

        m = json.loads((Path(path) / MANIFEST).read_text())
        model = {k: m[k] for k in ("kind", "late_combine", "task", "text_max_length") if m.get(k) is not None}
        return cls(
            labels=list(m["labels"]),
            label_names=m.get("label_names") or {},
            thresholds={"thresholds": m["thresholds"], "ensure_nonempty": m["ensure_nonempty"]},
            table=m.get("table") or {},
            config=Config.from_dict({**model, **runtime}, source=str(path)),
            path=Path(path),
        )


def split_rows(model, records: list, split: str) -> list:
    """The rows of one side of the model's own train/validation split (``all`` keeps every row).

    ``model`` is a loaded bundle (its split is in memory) or a model folder (its ``split.json``)."""
    import json

    if split == "all":
        return records
    if hasattr(model, "extra"):
        recorded, where = model.extra.get("split.json"), "the model"
    else:
        path = Path(model) / "split.json"
        recorded, where = (json.loads(path.read_text()) if path.is_file() else None), str(path)
    if recorded is None:
        raise ValueError(f"{where}: no record of the training split, so --split {split} cannot be applied")
    ids = set(recorded[f"{split}_ids"])
    chosen = [r for r in records if r.id in ids]
    if not chosen:
        raise ValueError(f"none of the table's rows are on the {split} side of {where}'s split")
    return chosen


_TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".jsonl", ".ndjson", ".json", ".parquet", ".pq")
_COLUMN_KEYWORDS = ("image_col", "text_col", "label_col", "id_col", "label_sep", "split_col")


def _is_table(data) -> bool:
    """A table: a DataFrame, or the path of a table file (a single photo's path is a row, not a table)."""
    if type(data).__name__ in ("DataFrame", "RecordSet"):
        return True
    return isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() in _TABLE_SUFFIXES


def _column_keywords(given: dict) -> dict:
    unknown = sorted(set(given) - set(_COLUMN_KEYWORDS))
    if unknown:
        raise TypeError(
            f"unexpected keyword(s) {', '.join(unknown)}; a table's columns are named with "
            f"{', '.join(_COLUMN_KEYWORDS)}"
        )
    given = {k: given.get(k) for k in _COLUMN_KEYWORDS}
    given.pop("split_col")  # prediction and evaluation read every row; the split is the model's own
    return given


def _one_row_or_many(values, what: str):
    """A list of rows. One photo (a path, bytes, a PIL image, an HxWxC array) or one caption given bare is one
    row, never a sequence of characters, bytes or pixel rows."""
    from PIL import Image

    if values is None:
        return None
    if isinstance(values, (str, bytes, bytearray, os.PathLike, Image.Image)):
        return [values]
    if isinstance(values, np.ndarray):
        if what == "images" and values.ndim in (2, 3) and values.dtype == np.uint8:
            return [values]
        if what == "images" and values.ndim == 4:
            return list(values)
        if what == "captions" and values.ndim == 1:
            return values.tolist()
        raise ValueError(
            f"{what}: an array of shape {values.shape} and type {values.dtype}; give photos as HxWx3 "
            "uint8 arrays (one, or a list), and captions as a list of strings"
        )
    if isinstance(values, dict) or not hasattr(values, "__len__"):
        raise ValueError(f"{what}: expected a list with one entry per row, got {type(values).__name__}")
    return list(values)


def _warn_missing_inputs(p: Prediction, photos) -> None:
    """One warning with the count of rows predicted without their photo (or with nothing): in Python as on the
    command line, a wrong image folder must not pass for caption-only predictions unnoticed."""
    missing = [
        i
        for i, (s, photo) in enumerate(zip(p.status, photos))
        if s in ("caption_only", "no_input") and photo is not None
    ]
    if missing:
        first = p.image_errors[missing[0]] if p.image_errors else None
        log.warning(
            f"{len(missing)} of {len(p)} rows were predicted without their photo"
            + (f" (first: {first})" if first else "")
            + "; strict=True makes this an error"
        )


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
