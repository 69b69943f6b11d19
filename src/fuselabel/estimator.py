"""``FuseLabel``: the model object, scikit-learn and Hugging Face style.

    model = FuseLabel(preset="cpu", epochs=20)          # settings validated at fit, before any work
    model.fit("train.csv", images="data/")               # or fit(X, y), or fit(images=[...], captions=[...], labels=[...])
    model.predict(images=[img], captions=["a dog on a sofa"])   # -> [[1, 18]]
    model.save_pretrained("models/m1"); FuseLabel.from_pretrained("models/m1")

Training goes through ``train.fit`` and prediction through ``runtime.Predictor`` over an engine: eager
PyTorch (``engines``) or onnxruntime over an exported ONNX folder (``onnx_folder``). This class turns plain
Python data into their inputs and back (``inputs``), and is what the command line, reports and the service
hold.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError
from .config import Config, ExplainMethod, build_config, check_keys
from .encoding import gpu_driver_present
from .images import ImageInput
from .inputs import Target, as_matrix, column_keywords, prediction_rows, training_rows
from .labels import as_user_labels
from .onnx_folder import EXPORTED_SETTINGS
from .runtime import Prediction, Predictor, describe_fusion

log = logging.getLogger(__name__)


def _exported_copy(model_dir: Path, cache_dir) -> Path | None:
    """The model folder's exported ONNX copy in the cache, exported first when missing (None: there is none, and
    the PyTorch model predicts)."""
    from .onnx_folder import exported_location, is_onnx_folder

    folder = exported_location(model_dir, cache_dir)
    if folder is None or is_onnx_folder(folder):
        return folder
    from .export import export_cached  # imports torch: only while the copy is missing

    return export_cached(model_dir, cache_dir)


class FuseLabel:
    """Multi-label classifier of (photo, text) pairs, with scikit-learn's and Hugging Face's contracts.

    Holds its constructor's arguments (``preset``, ``config`` a YAML file, and any setting of
    ``fuselabel.config.Config`` as a keyword, which wins over both), and once fitted or loaded: ``bundle_``
    (the model's settings, labels, thresholds, preprocessing, training-table spelling, split and metrics,
    and its PyTorch network, loaded only when needed), the engine it predicts with (eager PyTorch, or
    onnxruntime over an exported ONNX folder), and the form ``y`` was given in. As in scikit-learn, the
    constructor only stores what it is given and ``fit`` checks it: an unknown key or a value that does not
    convert raises ValueError naming it before any work. ``get_config()`` checks without fitting.
    """

    _estimator_type = "classifier"  # scikit-learn < 1.6 reads this; newer ones ask __sklearn_tags__

    def __init__(self, preset: str | None = None, config: str | Path | None = None, **settings):
        self.preset = preset
        self.config = config
        self._settings = settings

    # ------------------------------------------------------------------ scikit-learn's contract
    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments, as given: ``preset``, ``config`` and every setting keyword."""
        return {"preset": self.preset, "config": self.config, **self._settings}

    def set_params(self, **params) -> FuseLabel:
        """Change constructor arguments (checked, like the constructor's, at ``fit``); an unknown key is refused."""
        check_keys([k for k in params if k not in ("preset", "config")], "FuseLabel.set_params")
        for key, value in params.items():
            if key in ("preset", "config"):
                setattr(self, key, value)
            else:
                self._settings[key] = value
        return self

    def get_config(self) -> Config:
        """The settings the constructor's arguments make, checked (ValueError naming a bad key or value)."""
        return build_config(self.preset, self.config, **self._settings)

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "bundle_", None) is not None

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True, multi_output=True),
            classifier_tags=ClassifierTags(multi_class=True, multi_label=True),
            input_tags=InputTags(two_d_array=False, dict=True, string=True),
            non_deterministic=True,
        )

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if v is not None}
        return f"FuseLabel({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __getstate__(self) -> dict:
        # The engine holds sessions and compiled graphs, the lock a lock: neither pickles; both are rebuilt.
        return {k: v for k, v in self.__dict__.items() if k not in ("_predictor", "_lock")}

    # ------------------------------------------------------------------ fitted state
    @property
    def config_(self) -> Config:
        """The fitted model's settings (what it is, how it was trained, where it runs)."""
        return self._fitted().config

    @property
    def labels_(self) -> list:
        """The model's output columns: labels as in the training data (ints when every label is an integer)."""
        return as_user_labels(self._fitted().labels)

    @property
    def classes_(self) -> np.ndarray:
        """The columns of ``predict_proba`` (and of ``predict`` after a fit on an indicator matrix): that
        matrix's columns then, else ``labels_``."""
        self._check_fitted()
        target = self._target_form()
        return np.asarray(as_user_labels(target.columns) if target.form == "matrix" else self.labels_, dtype=object)

    @property
    def label_names_(self) -> list[str]:
        bundle = self._fitted()
        return [bundle.label_names.get(t, t) for t in bundle.labels]

    @property
    def thresholds_(self) -> np.ndarray:
        return self._fitted().threshold_vector

    @property
    def path_(self) -> Path | None:
        """The model folder it was loaded from or saved to (None: held in memory only)."""
        return self._fitted().path

    @property
    def weights_sha256_(self) -> str | None:
        """The sha256 of the model folder's weights file as loaded (None: an exported folder, or in memory)."""
        return self._fitted().weights_sha256

    @property
    def validation_(self) -> dict:
        """The validation figures recorded at training (``metrics.json``), per-label ones left out; {} if none."""
        figures = (self._fitted().extra.get("metrics.json") or {}).get("validation", {})
        return {k: v for k, v in figures.items() if k != "per_label"}

    @property
    def preprocessing_(self) -> dict | None:
        """The photo preprocessing (timm data config): photos are decoded for this size, no larger."""
        return self._fitted().preprocessing

    @property
    def fusion_(self) -> dict:
        """How the heads make one probability: ``kind``, ``combine`` (late fusion's rule), ``image_weight``
        (the photo head's share under ``weighted``) and the ``rule`` in words a person reads."""
        engine = self.predictor().engine
        return describe_fusion(engine.kind, engine.late_combine, float(engine.late_weight))

    def _target_form(self) -> Target:
        return self.__dict__.get("_target") or Target("lists", [])

    def _fitted(self) -> Bundle:
        self._check_fitted()
        return self.bundle_

    def _check_fitted(self) -> None:
        if getattr(self, "bundle_", None) is None:
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this FuseLabel is not fitted yet: call fit(...) or FuseLabel.from_pretrained(path)")

    # ------------------------------------------------------------------ training
    def fit(
        self,
        X=None,
        y=None,
        *,
        images=None,
        captions: Sequence[str] | None = None,
        labels: Sequence[Sequence] | None = None,
        label_names: str | Path | dict | None = None,
        val=None,
        out: str | Path | None = None,
        progress: bool = True,
        **columns,
    ) -> FuseLabel:
        """Train on a table, on rows given as dicts, or on lists in memory.

        ``X`` is a table's path (CSV, TSV, JSON Lines, Parquet, or the course CSV), a pandas DataFrame or a
        list of dicts (one a row), and ``images`` the folder its photo paths are relative to; ``image_col``,
        ``text_col`` (one or several), ``label_col``, ``id_col``, ``label_sep`` and ``split_col`` name its
        columns (found when not given). ``y`` gives the labels beside ``X``: one list of labels per row, or
        an indicator matrix (``predict`` then answers with one). In memory, ``images`` is a list of paths,
        PIL images, HxWx3 uint8 arrays or file bytes (None: no photo), with ``captions`` and ``labels`` of
        the same length. ``val`` is a table of validation rows (else a split column's ``val`` rows, else a
        stratified share). ``out`` keeps the model folder there; without it the folder is temporary.
        """
        from .tables import Columns
        from .train import fit as train_fit

        config = self.get_config()  # checked before any work, naming a bad key
        columns = column_keywords(columns, split=True)
        work = Path(tempfile.mkdtemp(prefix="fuselabel-fit-"))
        try:
            rows, image_dir, target = training_rows(X, y, images, captions, labels, columns, work)
            target_dir = Path(out) if out is not None else work / "model"
            given = dict(label_names=label_names, progress=progress, columns=Columns.of(**columns), val=val)
            self.result_ = train_fit(config, image_dir, rows, target_dir, **given)
            self._open(target_dir, config.to_dict("runtime"))
            if out is None:
                self.bundle_.path = None  # the temporary folder goes: nothing points at it
            self._target = target
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self

    # ------------------------------------------------------------------ saving and loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, exported: bool = False, device=None, **runtime) -> FuseLabel:
        """A model folder (``fit``/``save_pretrained``/``fuselabel train``) or an exported ONNX folder
        (``fuselabel export``), ready to predict.

        ``runtime`` takes where-it-runs settings only (``feature_engine``, ``cache_dir``, ``num_workers``,
        ...); a setting of what the model is or how it was trained is refused, naming it, since the folder
        fixes those. ``exported=True``: on a CPU, unless ``feature_engine="torch"``, a model folder runs from
        its exported ONNX copy in the cache (exported on first use), which starts without importing torch;
        its PyTorch weights load only when needed (``explain``, ``save_pretrained``). ``device``: where the
        PyTorch engine runs (default cuda when present). ``get_params`` then gives the folder's settings, so
        ``sklearn.base.clone`` refits the same model.
        """
        check_keys(
            runtime,
            f"from_pretrained({path}): the folder fixes what the model is and how it was trained, so",
            groups=("runtime",),
        )
        settings = Config.from_dict(runtime, source="from_pretrained").to_dict("runtime")
        model = cls()
        model._device = device
        model._open(Path(path), settings, exported=exported)
        config = model.bundle_.config
        if model.bundle_.weights_sha256 is None:  # an exported folder records only what prediction needs
            fixed = {k: v for k, v in config.to_dict("model").items() if k in EXPORTED_SETTINGS}
        else:
            fixed = {**config.to_dict("model"), **config.to_dict("run")}
        model._settings = {**fixed, **runtime}
        return model

    load = from_pretrained

    def save_pretrained(self, path: str | Path) -> Path:
        """Write what this object holds (weights, settings, split, metrics, history) as a model folder,
        atomically: an existing folder is replaced only once the new one is whole."""
        from .bundle import save_bundle

        bundle = self.torch_bundle()
        with tempfile.TemporaryDirectory(prefix="fuselabel-save-") as tmp:
            files = {}
            if self._history is not None:
                (Path(tmp) / "history.csv").write_bytes(self._history)
                files["history.csv"] = Path(tmp) / "history.csv"
            save_bundle(path, bundle, files or None)
        bundle.path = Path(path)
        return Path(path)

    def _open(self, path: Path, runtime: dict, exported: bool = False) -> None:
        """Load a folder's records into memory whole (settings, split, metrics, history), so nothing but lazily
        loaded weights depends on the folder staying there; and choose the engine."""
        from .bundle import attach_weights, load_records
        from .onnx_folder import is_onnx_folder, read_exported

        self._predictor, self._onnx, self._history, self._lock = None, None, None, threading.Lock()
        self._target = Target("lists", [])
        if is_onnx_folder(path):
            self.bundle_, self._onnx = read_exported(path, runtime), Path(path)
            return
        bundle, files = load_records(path)
        # The folder holds what the model is; where it runs comes from this object's settings.
        bundle.config = bundle.config.replace(**runtime)
        history = path / "history.csv"
        self._history = history.read_bytes() if history.is_file() else None
        device = self.__dict__.get("_device")
        on_cpu = str(device).startswith("cpu") if device is not None else not gpu_driver_present()
        if exported and on_cpu and bundle.config.feature_engine != "torch":
            self._onnx = _exported_copy(path, bundle.config.cache_dir)
        if self._onnx is None:
            attach_weights(bundle, files)
        self.bundle_ = bundle

    def torch_bundle(self) -> Bundle:
        """The model with its PyTorch network, loaded on first use (once, whichever thread asks) from the
        folder's weights, which must still be those loaded: a folder replaced since holds another model."""
        from .bundle import load_bundle

        self._check_fitted()
        if self.bundle_.net is not None:
            return self.bundle_
        if self.bundle_.weights_sha256 is None:
            raise ValueError(
                f"{self.bundle_.path} is an exported ONNX folder: it predicts, but holds no PyTorch weights "
                "to save or explain with; use the model folder it was exported from"
            )
        with self.__dict__.setdefault("_lock", threading.Lock()):
            if self.bundle_.net is None:
                log.info("loading the PyTorch model of %s", self.bundle_.path)
                loaded = load_bundle(self.bundle_.path)
                if loaded.weights_sha256 != self.bundle_.weights_sha256:
                    raise BundleError(
                        f"{self.bundle_.path}: the model folder's weights changed since it was loaded; "
                        "load it again to use them"
                    )
                self.bundle_.net, self.bundle_.tokenizer = loaded.net, loaded.tokenizer
        return self.bundle_

    def folder_changed(self) -> bool:
        """Whether the model folder's weights file is no longer the one loaded (replaced, or removed)."""
        import hashlib

        from .snapshot import WEIGHTS

        self._check_fitted()
        if self.bundle_.path is None or self.bundle_.weights_sha256 is None:
            return False
        try:
            with (Path(self.bundle_.path) / WEIGHTS).open("rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest() != self.bundle_.weights_sha256
        except FileNotFoundError:
            return True

    def explain(self, label_index: int, image=None, caption: str | None = None, method: ExplainMethod = "occlusion"):
        """Why label ``labels_[label_index]`` got its probability on one row (a PIL photo, a caption; either may be
        None): an ``explanation.Explanation``. ``occlusion`` covers parts of the inputs on the engine that predicts
        (no PyTorch); ``gradients``: Grad-CAM and integrated gradients on the PyTorch weights, loaded on first use."""
        if method == "occlusion":
            from .occlusion import explain as by_occlusion

            return by_occlusion(self.predictor(), int(label_index), image, caption)
        if method != "gradients":
            raise ValueError(f"method: {method!r}; use occlusion or gradients")
        from .explain import explain as by_gradients

        return by_gradients(self.torch_bundle(), int(label_index), image, caption)

    # ------------------------------------------------------------------ prediction
    def predictor(self, *, strict: bool = False, device=None) -> Predictor:
        """The ``runtime.Predictor`` this model predicts with. Its engine is built on the first call, on
        ``device`` (default: the one given to ``from_pretrained``, else cuda when present), and reused;
        ``strict`` applies to the calls that follow."""
        self._check_fitted()
        if self.__dict__.get("_predictor") is None:
            self._predictor = self._build_predictor(device or self.__dict__.get("_device"))
        self._predictor.strict = strict
        return self._predictor

    def _build_predictor(self, device) -> Predictor:
        cfg = self.bundle_.config
        if self.__dict__.get("_onnx") is not None:
            from .onnx_folder import load_onnx_predictor

            return load_onnx_predictor(self._onnx, workers=cfg.num_workers)[0]
        from .engines import engine_for_bundle  # torch: only for a model folder's own weights

        bundle = self.torch_bundle()
        engine = engine_for_bundle(bundle, engine=cfg.feature_engine, device=device, cache_dir=cfg.cache_dir)
        ensure = bundle.thresholds.get("ensure_nonempty", True)
        return Predictor(engine, bundle.labels, bundle.threshold_vector, ensure, workers=cfg.num_workers)

    def place_on(self, device) -> None:
        """Build the engine on ``device`` (a rank's own: cuda:1 on local rank 1), unless it is there already.
        A model running from an exported ONNX folder runs on the CPU wherever it is."""
        if self.__dict__.get("_onnx") is not None:
            return
        current = self._predictor.engine.device if self.__dict__.get("_predictor") is not None else None
        if current is None or str(current) != str(device):
            self._predictor = None
            self.predictor(device=str(device))

    def predict_details(
        self,
        X=None,
        captions: Sequence[str | None] | None = None,
        *,
        images: Sequence[ImageInput] | str | Path | None = None,
        strict: bool = False,
        **columns,
    ) -> Prediction:
        """Probabilities per head and fused, label sets, which rows lacked a photo or a caption, and what each
        input contributed: ``image_changed`` / ``caption_changed`` (would a row's label set differ without it;
        None for early fusion) and ``captions_read`` (a ``runtime.CaptionReading`` a captioned row).

        ``X`` is a table (a path or a DataFrame; ``images`` is then its photo folder, and ``image_col``,
        ``text_col`` ... name its columns), rows as dicts, or the photos themselves (paths, PIL images,
        HxWx3 uint8 arrays or bytes; None: no photo).
        """
        from .inputs import warn_missing_inputs

        columns = column_keywords(columns)
        self._check_fitted()
        photos, texts, image_dir, names = prediction_rows(X, images, captions, columns, self.bundle_.table)
        predictor = self.predictor(strict=strict)
        chunks = list(predictor.iter_predict(zip(photos, texts), image_dir=image_dir, names=names))
        result = Prediction.concat(chunks) if chunks else predictor.predict([], [])
        warn_missing_inputs(result, photos)
        return result

    def predict_proba(self, X=None, captions=None, *, images=None, **columns) -> np.ndarray:
        """(rows, classes) fused probabilities; columns are ``classes_``. NaN on rows with neither input."""
        probs = self.predict_details(X, captions, images=images, **columns).probs
        return self._target_form().lay_out(probs, self.bundle_.labels, fill=0.0)

    def predict(self, X=None, captions=None, *, images=None, **columns):
        """One list of labels per row (empty for a row with neither photo nor caption); after a fit on an
        indicator matrix, an indicator matrix whose columns are ``classes_``."""
        details = self.predict_details(X, captions, images=images, **columns)
        if self._target_form().form == "matrix":
            return self._target_form().lay_out(details.predicted.astype(np.int64), self.bundle_.labels, fill=0)
        labels = self.labels_
        return [[labels[j] for j in np.flatnonzero(row)] for row in details.predicted]

    def score(self, X, y, sample_weight=None) -> float:
        """The mean per-row F1 of the predicted label sets against ``y`` (scikit-learn's ``f1_samples``)."""
        from sklearn.metrics import f1_score

        from .inputs import target_of

        truth, _ = target_of(y)
        labels = self.bundle_.labels
        predicted = [[labels[j] for j in np.flatnonzero(row)] for row in self.predict_details(X).predicted]
        vocab = sorted({t for row in truth for t in row} | set(labels))
        matrices = as_matrix(truth, vocab), as_matrix(predicted, vocab)
        return float(f1_score(*matrices, average="samples", zero_division=0, sample_weight=sample_weight))

    def evaluate(self, X, images: str | Path, *, split: str = "all", strict: bool = False, **columns) -> dict:
        """The metrics report on a labelled table (``split``: only one side of the model's split).

        A label the model never saw counts as missed on every row that holds it (and is named once in a
        warning), so the figure is what the model would score on these rows.
        """
        from .evaluation import evaluate_records
        from .tables import Columns, read_table

        self._check_fitted()
        records = read_table(X, Columns.of(**column_keywords(columns)), trained=self.bundle_.table, need_labels=True)
        return evaluate_records(self.predictor(strict=strict), self.bundle_, records, images, split)
