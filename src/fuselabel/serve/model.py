"""The model the service holds: loaded once, predicting over worker threads, explaining on one thread."""

import hashlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

# Nothing that imports torch at module level (explain, export, engines): on a CPU the service starts and
# predicts without it.
from ..bundle import read_config
from ..estimator import FuseLabel
from ..runtime import Prediction, gpu_driver_present, usable_cores

log = logging.getLogger(__name__)


class ModelChanged(RuntimeError):
    """The model folder's weights are no longer those the service started with."""


class Model:
    """A model folder loaded once, with what the service reports about it.

    On a CPU (unless ``feature_engine="torch"``) predictions come from the folder's exported ONNX copy in
    ``cache_dir`` (exported here when missing), and the PyTorch model is loaded only for the first
    explanation; elsewhere the PyTorch model is loaded at once. ``cache_dir``, ``feature_engine`` and
    ``num_workers`` are the runtime settings of ``fuselabel predict``; a request's rows are spread over
    ``num_workers`` threads (default: the usable cores) as ``fuselabel predict`` spreads its windows.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        cache_dir: str | None = None,
        feature_engine: str = "auto",
        num_workers: int | None = None,
    ):
        t0 = time.perf_counter()
        self.path = Path(path)
        runtime = {
            k: v
            for k, v in dict(cache_dir=cache_dir, feature_engine=feature_engine, num_workers=num_workers).items()
            if v is not None
        }
        exported = None
        if feature_engine != "torch" and not gpu_driver_present():
            exported = _exported_copy(self.path, cache_dir)
        self._bundle = None  # the PyTorch model (network, tokenizer) that explanations run on
        if exported is not None:
            self.estimator = FuseLabel.from_pretrained(exported, **runtime)
            # The exported copy keeps only what prediction needs; /info shows the folder's own settings.
            self.config = read_config(self.path)
        else:
            self.estimator = FuseLabel.from_pretrained(self.path, **runtime)
            self.config = self.estimator.config_
            self._bundle = self.estimator.bundle_
        self.kind = self.config.kind
        self.workers = num_workers or usable_cores()
        # Prediction pieces run on these threads, the pieces of concurrent requests in arrival order.
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fuselabel-predict")
        # Explanations run on this one thread, in turn: the network's explanation hooks are shared.
        self.explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuselabel-explain")
        self.digest = _weights_digest(self.path)
        self.id = f"{self.path.resolve().name}@{self.digest[:12]}"
        self.predictor = self.estimator.predictor()
        # The first prediction sets up the encoders' runtime (seconds): do it before the port opens, so no
        # client waits for it and a broken folder fails at start.
        self.predict([Image.new("RGB", (64, 64), "gray")], ["a photo"])
        engine = self.predictor.engine
        self.engine = engine.name
        self.preprocessing = engine.data_config  # photos are decoded for this, no larger
        self.fusion = _fusion(engine)
        self.load_seconds = time.perf_counter() - t0
        log.info("model %s loaded in %.1f s: %s, %d threads", self.id, self.load_seconds, self.engine, self.workers)

    @property
    def labels(self) -> list[dict]:
        est = self.estimator
        return [
            {"id": lab, "name": name, "threshold": float(t)}
            for lab, name, t in zip(est.labels_, est.label_names_, est.thresholds_)
        ]

    def pieces(self, n: int) -> list[tuple[int, int]]:
        """Row ranges of one request, one a worker thread: even a single request keeps every worker busy, as
        ``fuselabel predict`` keeps them busy with its windows."""
        step = max(1, math.ceil(n / self.workers))
        return [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def predict(self, images: list, captions: list) -> Prediction:
        futures = [
            self.pool.submit(self.predictor.predict, images[a:b], captions[a:b]) for a, b in self.pieces(len(images))
        ]
        return Prediction.concat([f.result() for f in futures])

    def explain(self, label_index: int, image, caption):
        def both():
            from ..explain import explain

            return self.predict([image], [caption]), explain(self._torch_bundle(), label_index, image, caption)

        return self.explainer.submit(both).result()

    def _torch_bundle(self):
        """The PyTorch model, loaded on first use (on the explaining thread, so once) from the folder's weights,
        which must still be those the service started with: a folder replaced since would explain labels
        of another model than the one predicting them."""
        if self._bundle is None:
            from ..bundle import load_bundle

            log.info("loading the PyTorch model of %s for explanations", self.id)
            bundle = load_bundle(self.path)
            # Hashed after the load: a folder replaced before or during it holds other weights by now.
            if _weights_digest(self.path) != self.digest:
                raise ModelChanged(
                    f"the model folder's weights changed after the service started (it serves "
                    f"{self.id}); restart the service to explain with them"
                )
            self._bundle = bundle
        return self._bundle

    def settings(self) -> dict:
        """The model's settings as its folder stores them (model and run groups), naming no path on the server."""
        settings = self.config.saved()
        for key in ("image_weights", "text_model"):  # local files by path: their names are enough
            value = settings["model"].get(key)
            if isinstance(value, str) and Path(value).is_absolute():
                settings["model"][key] = Path(value).name
        return settings


def _exported_copy(path: Path, cache_dir: str | None) -> Path | None:
    """The model folder's exported ONNX copy in the cache, exported first when missing (None: there is none, and
    the PyTorch model serves)."""
    from ..predict import exported_folder

    folder = exported_folder(path, cache_dir)
    if folder is None or (folder / "manifest.json").is_file():
        return folder
    from ..export import export_cached  # imports torch: only while the copy is missing

    return export_cached(path, cache_dir)


def _weights_digest(path: Path) -> str:
    with (path / "model.safetensors").open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fusion(engine) -> dict:
    """How this model's heads make one probability, in words a person reads beside the heads' figures."""
    kind = engine.kind
    if kind == "late" and engine.late_combine == "union":
        rule = "the larger of the photo head's and the caption head's probability"
        weight = None
    elif kind == "late":
        weight = round(float(engine.late_weight), 4)
        rule = f"{weight:g} x the photo head's probability + {1 - weight:g} x the caption head's"
    elif kind == "early":
        rule, weight = "one head over the photo's and the caption's features together", None
    else:
        rule, weight = f"the {'photo' if kind == 'image' else 'caption'} head alone", None
    if kind == "late":
        rule += "; with only one input given, that input's head alone"
    return {
        "kind": kind,
        "combine": engine.late_combine if kind == "late" else None,
        "image_weight": weight,
        "rule": rule,
    }
