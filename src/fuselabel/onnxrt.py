"""Turning PyTorch modules into ONNX graphs: the encoders (for fast CPU features) and ``fuselabel export``.

Running the graphs is ``runtime.session``'s job, which needs no torch. A CPU
runs EfficientNet-Lite several times faster in onnxruntime than eagerly, and MiniLM about
twice as fast.

Graphs kept in the cache folder (:func:`cached_graph`) are exported by one process at a time
(a lock beside the graph, ``writers.file_lock``), written under a temporary name, flushed to disk and renamed into
place, and recorded with their size and hash beside them (``NAME.onnx.sha256``). A graph that
does not match its record (cut short by a crash, damaged, or left without one) is exported again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .writers import atomic_path, file_lock, remove_abandoned

log = logging.getLogger(__name__)

OPSET = 17

# Captions for export tracing and the built-in checks: different lengths, so padding is exercised.
SYNTHETIC_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "two dogs",
    "A red double decker bus driving down a city street next to tall buildings and a crowd of people.",
    "A plate of food with broccoli, rice and a fork.",
    "a cat",
    "Several people standing in a kitchen preparing a meal together on a sunny afternoon.",
    "An airplane flying over the ocean.",
    "A giraffe standing next to a tree in a zoo enclosure with rocks",
]


def export_graph(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict,
    opset: int = OPSET,
) -> Path:
    """torch.onnx.export into ``path``, written beside it first so a reader never sees half a file. One export
    at a time in a process: the exporter and the switches around it are process-wide state."""
    path = Path(path)
    with _EXPORTING:
        return _export(module, args, path, input_names, output_names, dynamic_axes, opset)


_EXPORTING = threading.Lock()


def _export(module, args, path: Path, input_names, output_names, dynamic_axes, opset) -> Path:
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha else None
    try:
        if mha:  # nn.MultiheadAttention's fused inference kernel has no ONNX form (the query decoder uses it)
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
            # The TorchScript tracer warns about Python-side shape checks in the HF code; the graphs are
            # checked against PyTorch on other batch sizes and lengths after export.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
    finally:
        if mha:
            mha.set_fastpath_enabled(fastpath)
    return path


def _record(path: Path) -> str:
    with open(path, "rb") as f:
        return f"{os.fstat(f.fileno()).st_size} {hashlib.file_digest(f, 'sha256').hexdigest()}\n"


def _intact(path: Path, record: Path) -> bool:
    try:
        expected = record.read_text()
        return path.stat().st_size == int(expected.split()[0]) and _record(path) == expected
    except (OSError, ValueError):
        return False


def cached_graph(path: str | os.PathLike, export) -> Path:
    """``path``, checked against its size-and-hash record; ``export(path)`` writes it when it is missing or fails
    the check. Other processes wanting the same graph wait for the one exporting it, then use it."""
    path = Path(path)
    record = path.with_name(path.name + ".sha256")
    if _intact(path, record):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(f".{path.name}.lock")):
        if _intact(path, record):  # exported by another process while this one waited
            return path
        if path.exists():
            log.warning("%s: does not match %s (cut short or damaged); exporting it again", path, record.name)
        remove_abandoned(path.parent)  # temporaries of killed writers, this graph's or another's
        record.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        export(path)
        with atomic_path(record) as tmp:
            tmp.write_text(_record(path))
    return path


def export_image_encoder(encoder: nn.Module, path: Path, input_size, opset: int = OPSET) -> Path:
    """``pixels`` (N, 3, H, W) -> ``features`` (N, D)."""
    encoder = encoder.float().eval()
    dummy = torch.zeros(2, *input_size)
    return export_graph(
        encoder,
        (dummy,),
        Path(path),
        ["pixels"],
        ["features"],
        {"pixels": {0: "batch"}, "features": {0: "batch"}},
        opset,
    )


def export_text_encoder(encoder: nn.Module, tokenizer, path: Path, max_length: int = 64, opset: int = OPSET) -> Path:
    """``input_ids``, ``attention_mask`` (N, L) int64 -> ``features`` (N, D), attention-masked mean."""
    encoder = encoder.float().eval()
    # A padded example: an all-ones mask could let the attention code skip the masking it must keep.
    tok = tokenizer(SYNTHETIC_CAPTIONS[:3], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    dynamic = {"batch": 0, "length": 1}
    axes = {
        "input_ids": {v: k for k, v in dynamic.items()},
        "attention_mask": {v: k for k, v in dynamic.items()},
        "features": {0: "batch"},
    }
    return export_graph(
        encoder,
        (tok["input_ids"], tok["attention_mask"]),
        Path(path),
        ["input_ids", "attention_mask"],
        ["features"],
        axes,
        opset,
    )


# ------------------------------------------------------------------------------ static int8 image encoder
# QDQ format, int8 weights with one scale per output channel, uint8 activations without reduced range: on a
# 2-core AVX2 CPU without VNNI this runs EfficientNet-Lite2 1.9x as fast as float32 (reduced range: 1.6x, with
# larger errors). Activation ranges come from calibration photos and are saved with the model, so the graph
# is rebuilt exactly wherever the model goes.


@contextlib.contextmanager
def _quiet_quantization():
    """onnxruntime.quantization logs advice on every call (pre-processing, ...) and prints the progress of
    histogram calibration; the results are checked instead."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        logger.setLevel(level)


# Ranges at the 99.999th percentile of each activation's values rather than their min and max: a few outlying
# values no longer coarsen the steps of every other one. On the default Lite2 at 320 px, over 400 photos, the
# int8 features' cosine with the float32 ones rose from 0.946 (min-max, 128 photos) to 0.971 (64 photos).
PERCENTILE = 99.999


def calibrate_int8(graph: Path, batches) -> dict:
    """Activation ranges (onnxruntime's calibration-cache JSON) of a float32 image graph over ``batches`` of
    normalised pixels (N, 3, H, W), at the ``PERCENTILE``th percentile of each activation's values.

    Kept beside the graph, keyed by the graph's bytes and the batches': the same photos (another seed, a
    resumed run) take their ranges from there instead of a minute of histograms.
    """
    import json

    batches = [np.ascontiguousarray(b, np.float32) for b in batches]
    key = hashlib.sha256(f"{_record(graph)} {PERCENTILE} {[b.shape for b in batches]}".encode())
    for b in batches:
        key.update(b.data)
    kept = graph.with_name(f"{graph.stem}-ranges-{key.hexdigest()[:16]}.json")
    try:
        return json.loads(kept.read_text())
    except (OSError, ValueError):  # not there yet, or cut short: measured again
        pass
    ranges = _calibrate(graph, batches)
    with atomic_path(kept) as tmp:
        tmp.write_text(json.dumps(ranges))
    return ranges


def _calibrate(graph: Path, batches: list) -> dict:
    import json
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = list(batches)
            self.set_range(0, len(self.batches))

        def __len__(self):
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int):
            self.todo = iter(self.batches[start_index:end_index])

        def get_next(self):
            x = next(self.todo, None)
            return None if x is None else {"pixels": x}

    with tempfile.TemporaryDirectory() as tmp, _quiet_quantization():
        ranges = Path(tmp) / "ranges.json"
        # The ranges are wanted, not this graph: quantize_static writes them as its calibration cache.
        quantize_static(
            str(graph),
            str(Path(tmp) / "q.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            calibration_cache_path=ranges,
            # One batch at a time into the histograms: all of a photo's activations at 320 px take
            # about 200 MB, which held together for every photo would be gigabytes.
            extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": 1},
        )
        return json.loads(ranges.read_text())


def quantize_int8_static(src: Path, dst: Path, ranges: dict) -> Path:
    """The static QDQ int8 graph of a float32 image graph, from ranges :func:`calibrate_int8` measured."""
    import json
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp, _quiet_quantization():
        cache = Path(tmp) / "ranges.json"
        cache.write_text(json.dumps(ranges))
        out = Path(tmp) / "q.onnx"
        # onnxruntime checks the ranges' method against the one it is told: the ranges say theirs (models
        # calibrated before percentile ranges hold min-max ones).
        method = str((ranges.get("calibration_method") or {}).get("value", "")).rpartition(".")[2] or "MinMax"
        quantize_static(
            str(src),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],
            calibration_cache_path=cache,
        )
        with atomic_path(dst) as tmp_dst:
            shutil.move(str(out), tmp_dst)
    return Path(dst)


# ------------------------------------------------------------------------------ dynamic int8 matrices
# Weights in int8 with one scale per output channel, activations quantised at run time. Per-channel scales
# matter: on all-MiniLM-L6-v2 one scale per tensor leaves a 26 % relative error in the pooled features,
# per-channel 11 % (512 real captions; static activation ranges: 34 %, as transformer activations have
# outliers that min-max ranges spread over every value).
INT8_OPS = ["MatMul", "Gemm"]
INT8_TEXT_OPS = INT8_OPS + ["Gather"]  # + the embedding tables, most of a small text encoder's bytes
DYNAMIC_INT8 = "dynamic, per-channel QInt8 weights"


def quantize_int8_dynamic(src: Path, dst: Path, ops=INT8_OPS) -> Path:
    """Dynamic int8 quantisation of a float32 graph's ``ops`` (onnxruntime.quantization), written atomically.

    The activations of one run share one scale, so a row's numbers depend on the rows run with it:
    graphs quantised so are run one row at a time where rows must not affect each other (``runtime``).
    """
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet_quantization():
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(
            str(src), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=list(ops), per_channel=True
        )
        with atomic_path(dst) as tmp_dst:
            shutil.move(str(out), tmp_dst)
    return Path(dst)


def dynamic_label(ops) -> str:
    """How a manifest names a graph quantised by :func:`quantize_int8_dynamic` over ``ops``."""
    return f"{DYNAMIC_INT8} ({', '.join(ops)})"


def ranges_digest(ranges: dict) -> str:
    import json

    return hashlib.sha256(json.dumps(ranges, sort_keys=True).encode()).hexdigest()[:12]
