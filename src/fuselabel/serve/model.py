"""Everything the service asks of its model, a ``FuseLabel``: opening it, predicting over worker threads,
explaining on one thread, and what the answers say about it. The one place that touches the model."""

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

# Nothing that imports torch at module level (explain, export, engines): on a CPU the service starts and
# predicts without it.
from ..bundle import BundleError
from ..encoding import usable_cores
from ..estimator import FuseLabel
from ..runtime import Prediction

log = logging.getLogger(__name__)


class ModelChanged(RuntimeError):
    """The model folder's weights are no longer those the service started with."""


def open_model(path: str | Path, **runtime) -> tuple[FuseLabel, float]:
    """The model folder (or exported folder) as a ``FuseLabel`` and the seconds it took to be ready.

    On a CPU (unless ``feature_engine="torch"``) it predicts from the folder's exported ONNX copy in the cache
    (exported on the first start) and loads its PyTorch weights only for the first explanation. ``runtime``:
    ``cache_dir``, ``feature_engine``, ``num_workers``, as for ``fuselabel predict`` (None: the default).
    """
    t0 = time.perf_counter()
    model = FuseLabel.from_pretrained(path, exported=True, **{k: v for k, v in runtime.items() if v is not None})
    # The first prediction sets up the encoders' runtime (seconds): done before the port opens, so no client
    # waits for it and a broken folder fails at start.
    model.predict_details([Image.new("RGB", (64, 64), "gray")], ["a photo"])
    seconds = time.perf_counter() - t0
    log.info("model %s ready in %.1f s: %s", model_id(model), seconds, model.predictor().engine.name)
    return model, seconds


def model_id(model: FuseLabel) -> str:
    """The folder's name and the start of its weights' sha256: which model answered."""
    digest = model.weights_sha256_ or "exported"
    return f"{Path(model.path_).resolve().name}@{digest[:12]}"


def label_table(model: FuseLabel) -> list[dict]:
    return [
        {"id": lab, "name": name, "threshold": float(t)}
        for lab, name, t in zip(model.labels_, model.label_names_, model.thresholds_)
    ]


def shown_settings(model: FuseLabel) -> dict:
    """The model's settings as its folder stores them (model and run groups), naming no path on the server."""
    settings = model.config_.saved()
    for key in ("image_weights", "text_model"):  # local files by path: their names are enough
        value = settings.get("model", {}).get(key)
        if isinstance(value, str) and Path(value).is_absolute():
            settings["model"][key] = Path(value).name
    return settings


class Runner:
    """The threads the model works on. A request's rows are cut into one piece a worker (default: the usable
    cores, as ``fuselabel predict`` keeps them busy with its windows), run at once; the pieces of concurrent
    requests share the workers in arrival order. Explanations run on one thread of their own, in turn, by
    ``method``: ``occlusion`` runs the predicting model itself, ready from the start; ``gradients`` needs the
    PyTorch weights, whose hooks are shared. ``warm`` (``gradients`` only): once the service has started (or
    after the first prediction, whichever comes first), those weights load and explain one made-up row on that
    thread, so the first "why" a person asks for does not wait for them; opening the model stays free of torch."""

    def __init__(self, model: FuseLabel, workers: int | None = None, *, method: str = "occlusion", warm: bool = False):
        self.model, self.workers, self.method = model, workers or usable_cores(), method
        self.warming = None  # the warm-up's future, once started
        # An exported folder holds no PyTorch weights to warm (it explains by occlusion only).
        self._warm = warm and method == "gradients" and model.weights_sha256_ is not None
        self.predictor = model.predictor()
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fuselabel-predict")
        self.explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuselabel-explain")

    def pieces(self, n: int) -> list[tuple[int, int]]:
        step = max(1, math.ceil(n / self.workers))
        return [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def predict(self, images: list, captions: list) -> Prediction:
        run = self.predictor.predict
        futures = [self.pool.submit(run, images[a:b], captions[a:b]) for a, b in self.pieces(len(images))]
        pred = Prediction.concat([f.result() for f in futures])
        self.warm()
        return pred

    def warm(self) -> None:
        """Start loading the explaining model on its thread, once (when the service warms it)."""
        if self._warm and self.warming is None:
            self.warming = self.explainer.submit(self._warm_up)

    def explainer_state(self) -> str:
        """loading, ready or on first use (not warmed, or the warm-up failed): what /health says of /explain."""
        if self.method == "occlusion":
            return "ready"
        if self.warming is not None and not self.warming.done():
            return "loading"
        return "ready" if self.model.bundle_.net is not None else "on first use"

    def _warm_up(self) -> None:
        try:
            if not self._check_unchanged(raising=False):
                self.model.explain(0, Image.new("RGB", (64, 64), "gray"), "a photo", method="gradients")
        except Exception:  # a failed warm-up costs only speed: the first explanation tries again and says why
            log.exception("warming the explaining model failed")

    def explain(self, label_index: int, image, caption):
        """(the row's prediction, its explanation); ModelChanged when the folder's weights are no longer those
        the service started with (they load now, on the first explanation)."""

        def both():
            if self.method == "gradients" and self.model.bundle_.net is None:
                self._check_unchanged()  # the weights load now: they must be those of the start
            try:
                explained = self.model.explain(label_index, image, caption, method=self.method)
                return self.predict([image], [caption]), explained
            except BundleError:
                self._check_unchanged()
                raise

        return self.explainer.submit(both).result()

    def _check_unchanged(self, raising: bool = True) -> bool:
        """Whether the folder's weights changed since the start; raises ModelChanged if so and ``raising``."""
        if not self.model.folder_changed():
            return False
        if raising:
            raise ModelChanged(
                f"the model folder's weights changed after the service started (it serves "
                f"{model_id(self.model)}); restart the service to explain with them"
            )
        return True
