"""What a training run reports as it goes: an experiment tracker, and the seconds each stage took.

``logger`` sends the losses and the validation mean F1 of every epoch to Lightning's CSV, TensorBoard or
MLflow logger; :class:`StageTimes` adds up the wall time of the stages a benchmark compares to their limits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from pathlib import Path

# The stages of a run, in order: what metrics.json's timings and the summary line hold (seconds).
# Seconds of work summed over the worker threads (decode, encoders) or wall seconds (the rest)
STAGES = ("decode_s", "image_encoder_s", "text_encoder_s", "int8_calibration_s", "train_s", "calibrate_s", "save_s")
EXTRAS = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def log_folder(config, out) -> Path:
    """``log_dir``, else ``OUT.logs`` beside the model folder."""
    return Path(config.log_dir) if config.log_dir else Path(out).with_name(Path(out).name + ".logs")


def check_logger(config) -> None:
    """A tracker whose package is missing is refused before any work, naming the extra that installs it."""
    modules = EXTRAS.get(config.logger, ())
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise ValueError(
            f"logger={config.logger}: the {modules[0]} package is not installed; install it with "
            f"pip install 'fuselabel[{config.logger}]', or train with logger=csv or logger=none"
        )


def experiment_logger(config, out):
    """The Lightning logger ``config.logger`` names (None for ``none``), writing under :func:`log_folder`."""
    from lightning.pytorch import loggers

    check_logger(config)
    folder = log_folder(config, out)
    name = Path(out).name
    if config.logger == "csv":
        return loggers.CSVLogger(folder, name=name)
    if config.logger == "tensorboard":
        return loggers.TensorBoardLogger(folder, name=name)
    if config.logger == "mlflow":
        # MLflow's file store is retired: a local SQLite store, which `mlflow ui --backend-store-uri` opens
        folder.mkdir(parents=True, exist_ok=True)
        return loggers.MLFlowLogger(
            experiment_name=name,
            tracking_uri=f"sqlite:///{(folder / 'mlflow.db').resolve().as_posix()}",
            artifact_location=(folder / "artifacts").resolve().as_uri(),
        )
    return None


class StageTimes(dict):
    """Seconds spent in each stage of a run (``STAGES`` and a few more), added up as the stages recur."""

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self[name] = self.get(name, 0.0) + seconds

    def timed(self, obj, method: str, name: str) -> None:
        """Count the time ``obj.method`` takes, on this object only, under ``name`` (summed over the threads that
        call it: seconds of work, which on several threads add up to more than the wall time)."""
        inner = getattr(obj, method)

        def counted(*args, **kwargs):
            with self.stage(name):
                return inner(*args, **kwargs)

        setattr(obj, method, counted)

    @contextlib.contextmanager
    def timing(self, obj, method: str, name: str):
        """:meth:`timed` for the duration of a ``with`` block, then ``obj.method`` as it was (a module's function)."""
        inner = getattr(obj, method)
        self.timed(obj, method, name)
        try:
            yield
        finally:
            setattr(obj, method, inner)

    def line(self) -> str:
        """The stages in one phrase: ``decode 1s, image encoder 40s, ...`` (stages that took no time left out)."""
        parts = [f"{k.removesuffix('_s').replace('_', ' ')} {self[k]:.0f}s" for k in STAGES if self.get(k, 0) >= 0.5]
        return ", ".join(parts) or "no stage took a second"
