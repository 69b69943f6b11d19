"""ONNX export of a model folder: a self-contained folder that onnxruntime runs without PyTorch.

    ONNX_DIR/
      image_encoder.onnx   pixels (N, 3, H, W) float32            -> features (N, Di)
      text_encoder.onnx    input_ids, attention_mask (N, L) int64 -> features (N, Dt)   masked mean
      head.onnx            features (+ presence flags)            -> one probability per label, per head
      tokenizer/           the text encoder's tokenizer (tokenizer.json)
      manifest.json        inputs and outputs, preprocessing, labels, names, thresholds, fusion rule, checks

Only the graphs a model uses are written. Fusion of the heads' probabilities, missing inputs,
preprocessing and thresholds are done by ``runtime.Predictor``, the same code that serves a
PyTorch model, so ``fuselabel predict ONNX_DIR`` gives the same label sets without torch.

``int8=True`` quantises the text encoder and the head dynamically (int8 weights for MatMul
and Gemm, activations quantised at run time, one caption a run); the image encoder stays float32
(dynamically quantised convolutions are slower than float ones in onnxruntime). A model trained
with ``image_quant=int8`` or ``text_quant=int8`` keeps the int8 encoder its heads learnt on, with or
without ``int8``: the static image encoder rebuilt from the calibration saved in its preprocessing,
the dynamic text encoder quantised as training quantised it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .encoders import text_length_limit
from .losses import probabilities
from .onnx_folder import MANIFEST, ONNX_FORMAT, ONNX_FORMAT_VERSION
from .onnxrt import (
    INT8_OPS,
    INT8_TEXT_OPS,
    OPSET,
    SYNTHETIC_CAPTIONS,
    dynamic_label,
    export_graph,
    export_image_encoder,
    export_text_encoder,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from .preprocess import INT8_CALIBRATION
from .snapshot import BundleError, replace_folder
from .writers import ordinary_permissions, temporary_beside

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"


class ExportError(BundleError):
    """A model folder that cannot be exported, or an ONNX folder that cannot be used."""


def head_input_names(kind: str) -> list[str]:
    """Inputs of ``head.onnx`` for a model kind (early fusion blanks a missing input inside the graph)."""
    return {"image": ["image_feat"], "text": ["text_feat"], "late": ["image_feat", "text_feat"]}.get(
        kind, ["image_feat", "text_feat", "image_present", "caption_present"]
    )


def head_output_names(kind: str) -> list[str]:
    return ["image", "text"] if kind == "late" else [kind]


class HeadGraph(nn.Module):
    """Head + sigmoid (softmax for multiclass), one output per head, with positional inputs for the exporter."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.names = head_input_names(net.config.kind)
        self.outputs = head_output_names(net.config.kind)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.net.head(self.net.encode(dict(zip(self.names, tensors))))
        return tuple(probabilities(logits[k], self.net.config.task) for k in self.outputs)


def export_head(net: nn.Module, path: Path, opset: int = OPSET) -> Path:
    graph = HeadGraph(net.float().eval()).eval()
    dims = {
        "image_feat": net.image_encoder.num_features if net.image_encoder is not None else 0,
        "text_feat": net.text_encoder.num_features if net.text_encoder is not None else 0,
    }
    args = tuple(torch.randn(2, dims[n]) if n in dims else torch.ones(2) for n in graph.names)
    axes = {n: {0: "batch"} for n in graph.names + graph.outputs}
    return export_graph(graph, args, Path(path), graph.names, graph.outputs, axes, opset)


# ----------------------------------------------------------------------------------------- export


def _synthetic_rows(n: int = 8, seed: int = 0) -> tuple[list, list]:
    """Random photos of several shapes and fixed captions; one row lacks its photo, one its caption."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 64 - 3 * i, 3), dtype=np.uint8)) for i in range(n)]
    captions = [SYNTHETIC_CAPTIONS[i % len(SYNTHETIC_CAPTIONS)] for i in range(n)]
    if n > 2:
        images[-1], captions[-2] = None, ""
    return images, captions


def check_against_torch(bundle, onnx_dir: Path, n: int = 8, seed: int = 0, threads: int | None = None) -> dict:
    """Max |ONNX - PyTorch| per head and fused, and agreement of label decisions, end to end on synthetic rows."""
    from .engines import engine_for_bundle
    from .onnx_folder import load_onnx_predictor
    from .runtime import Predictor

    images, captions = _synthetic_rows(n, seed)
    eager = Predictor(
        engine_for_bundle(bundle, engine="torch", device="cpu"),
        bundle.labels,
        bundle.threshold_vector,
        bundle.thresholds.get("ensure_nonempty", True),
        workers=1,
    )
    onnx, _ = load_onnx_predictor(onnx_dir, threads=threads, workers=1)
    a, b = eager.predict(images, captions), onnx.predict(images, captions)
    checks: dict = {"rows": n}
    for k in a.parts:
        checks[k] = float(np.abs(a.parts[k] - b.parts[k]).max())
    known = ~np.isnan(a.probs).any(1)
    checks["probabilities"] = float(np.abs(a.probs[known] - b.probs[known]).max())
    checks["label_agreement"] = float((a.predicted == b.predicted).mean())
    checks["rows_identical"] = float((a.predicted == b.predicted).all(1).mean())
    return checks


def export_onnx(
    model_dir, out_dir=None, int8: bool = False, *, opset: int = OPSET, check_rows: int = 8, threads: int | None = None
) -> dict:
    """Export a model folder's graphs to ``out_dir`` (default ``MODEL_DIR/onnx``); returns the manifest.

    The folder is written beside its destination and renamed into place when complete. The
    manifest's ``checks`` hold the largest absolute differences from PyTorch on ``check_rows``
    synthetic rows (per graph and end to end) and the share of label decisions that agree.
    """
    from .bundle import load_bundle

    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir else model_dir / ONNX_DIR
    bundle = load_bundle(model_dir)
    net = bundle.net.float().eval()
    text_length = bundle.config.text_max_length
    if text_length is None and net.text_encoder is not None:  # never chosen: all the encoder takes
        text_length = text_length_limit(bundle.tokenizer, net.text_encoder.backbone.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out)
    tmp.mkdir()
    t0 = time.time()
    try:
        files = _export_graphs(bundle, tmp, text_length, opset)
        float_bytes = {k: (tmp / v["path"]).stat().st_size for k, v in files.items()}
        _quantize(bundle, files, tmp, int8)
        for part, info in files.items():
            info["bytes"] = (tmp / info["path"]).stat().st_size
            info["float_bytes"] = float_bytes[part]
        manifest = _manifest(bundle, files, tmp, text_length, opset, int8)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if check_rows:
            manifest["checks"] = check_against_torch(bundle, tmp, check_rows, threads=threads)
        manifest["export_s"] = round(time.time() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        ordinary_permissions(tmp)  # a folder others may read, like any the user writes
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest["out_dir"] = str(out)
    return manifest


def _export_graphs(bundle, tmp: Path, text_length: int | None, opset: int) -> dict:
    """The encoders' and the head's float graphs written to ``tmp``; the manifest's ``files`` entry of each."""
    net, files = bundle.net, {}
    if net.image_encoder is not None:
        size = list(bundle.preprocessing["input_size"])
        export_image_encoder(net.image_encoder, tmp / "image_encoder.onnx", size, opset)
        files["image_encoder"] = {
            "path": "image_encoder.onnx",
            "inputs": {"pixels": ["batch", *size]},
            "outputs": {"features": ["batch", net.image_encoder.num_features]},
            "quantized": None,
        }
    if net.text_encoder is not None:
        export_text_encoder(net.text_encoder, bundle.tokenizer, tmp / "text_encoder.onnx", text_length, opset)
        files["text_encoder"] = {
            "path": "text_encoder.onnx",
            "inputs": {"input_ids": ["batch", "length"], "attention_mask": ["batch", "length"]},
            "outputs": {"features": ["batch", net.text_encoder.num_features]},
            "quantized": None,
        }
    export_head(net, tmp / "head.onnx", opset)
    kind = bundle.config.kind
    files["head"] = {
        "path": "head.onnx",
        "inputs": {n: ["batch"] if n.endswith("_present") else ["batch", "dim"] for n in head_input_names(kind)},
        "outputs": {o: ["batch", len(bundle.labels)] for o in head_output_names(kind)},
        "quantized": None,
    }
    return files


def _quantize(bundle, files: dict, tmp: Path, int8: bool) -> None:
    """Replace graphs by their int8 forms. An int8 model's encoders are always the int8 ones its heads learnt
    on: the static image encoder rebuilt from its saved ranges, the dynamic text encoder quantised as training
    quantised it; ``int8`` quantises the same way what is still float."""
    quantize = {}
    calibration = bundle.preprocessing.get(INT8_CALIBRATION) if "image_encoder" in files else None
    if calibration:
        quantize["image_encoder"] = (
            lambda src, dst: quantize_int8_static(src, dst, calibration["ranges"]),
            calibration["method"],
        )
    for part, ops in (("text_encoder", INT8_TEXT_OPS), ("head", INT8_OPS)):
        if part in files and (int8 or (part == "text_encoder" and bundle.config.text_quant == "int8")):
            quantize[part] = (lambda src, dst, ops=ops: quantize_int8_dynamic(src, dst, ops), dynamic_label(ops))
    for part, (run, label) in quantize.items():
        src = tmp / files[part]["path"]
        fp32 = src.with_name(src.stem + ".fp32.onnx")
        os.replace(src, fp32)
        run(fp32, src)
        fp32.unlink()
        files[part]["quantized"] = label


def _manifest(bundle, files: dict, tmp: Path, text_length: int | None, opset: int, int8: bool) -> dict:
    """What an exported folder says about itself: versions, the model, its preprocessing, labels and rule."""
    import onnxruntime

    from . import __version__

    net, cfg = bundle.net, bundle.config
    tokenizer, dims = {}, {}
    if net.text_encoder is not None:
        bundle.tokenizer.save_pretrained(tmp / "tokenizer")
        tokenizer = {
            "tokenizer": "tokenizer/tokenizer.json",
            "pad_id": int(bundle.tokenizer.pad_token_id),
            "pad_token": str(bundle.tokenizer.pad_token),
        }
        dims["text"] = net.text_encoder.num_features
    if net.image_encoder is not None:
        dims["image"] = net.image_encoder.num_features
    return {
        "format": ONNX_FORMAT,
        "version": ONNX_FORMAT_VERSION,
        "fuselabel": __version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
        "int8": bool(int8),
        "kind": cfg.kind,
        "task": cfg.task,
        "late_combine": cfg.late_combine,
        "late_weight": float(net.late_weight),
        "tta_flip": bool(cfg.tta_flip),
        "text_max_length": text_length,
        **tokenizer,
        "preprocessing": bundle.preprocessing,
        "feature_dims": dict(sorted(dims.items())),
        "labels": bundle.labels,
        "label_names": bundle.label_names,
        "table": bundle.table,
        "thresholds": [float(t) for t in bundle.threshold_vector],
        "ensure_nonempty": bool(bundle.thresholds.get("ensure_nonempty", True)),
        "files": files,
        "head": {
            "inputs": head_input_names(cfg.kind),
            "outputs": head_output_names(cfg.kind),
            "rule": _rule(cfg.kind, cfg.late_combine, cfg.task),
        },
        "export_s": None,
        "checks": None,
    }


def export_cached(model_dir, cache_dir=None) -> Path | None:
    """A model folder's exported ONNX copy in the cache folder, exported on first use; `predict`, `evaluate`
    and `serve` on a CPU run from it. None: no copy, and the PyTorch model runs instead (a folder without
    file hashes, which cannot be recognised later, or one whose network ONNX cannot express; said once)."""
    from .onnx_folder import exported_location, is_onnx_folder
    from .writers import file_lock

    folder = exported_location(model_dir, cache_dir)
    if folder is None or is_onnx_folder(folder):
        return folder
    # Processes starting together (a service's workers, parallel jobs): one exports, the others wait for it.
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if not is_onnx_folder(folder):
            log.info("exporting %s to %s once, so that later runs start without PyTorch", model_dir, folder)
            try:
                export_onnx(model_dir, folder)
            except BundleError:
                raise  # the folder itself is unusable: loading it says so
            except Exception as err:
                log.warning(
                    "%s: no ONNX copy could be exported (%s: %s); the PyTorch model predicts instead",
                    model_dir,
                    type(err).__name__,
                    err,
                )
                return None
    return folder


def _rule(kind: str, combine: str, task: str = "multilabel") -> str:
    act = "softmax" if task == "multiclass" else "sigmoid"
    decision = "; the arg-max label" if task == "multiclass" else ""
    if kind in ("image", "text"):
        return f"{act}({kind} head){decision}"
    if kind == "early":
        return f"{act}(head(concat(norm(image_feat * image_present), norm(text_feat * caption_present))))" + decision
    if combine == "union":
        return "max(p_image, p_text); one head where the other input is missing" + decision
    return "w * p_image + (1 - w) * p_text with w = late_weight; one head where the other input is missing" + decision


def format_report(manifest: dict) -> str:
    """What ``fuselabel export`` prints."""
    out = Path(manifest["out_dir"])
    quantized = [part.replace("_", " ") for part, info in manifest["files"].items() if info["quantized"]]
    lines = [
        f"wrote {out} ({'int8 ' + ', '.join(quantized) if quantized else 'float32'}, opset "
        f"{manifest['opset']}, {manifest['export_s']:.1f}s)"
    ]
    total = 0
    for info in manifest["files"].values():
        total += info["bytes"]
        q = f"  int8, was {info['float_bytes'] / 1e6:.2f} MB" if info["quantized"] else ""
        inputs = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in info["inputs"].items())
        lines.append(f"  {info['path']:22s} {info['bytes'] / 1e6:8.2f} MB{q}   {inputs}")
    lines.append(f"  {MANIFEST:22s} {(out / MANIFEST).stat().st_size / 1e6:8.2f} MB")
    lines.append(f"  total {total / 1e6:.2f} MB; head rule: {manifest['head']['rule']}")
    c = manifest.get("checks")
    if c:
        parts = ", ".join(f"{k} head {c[k]:.2e}" for k in ("image", "text", "early") if k in c)
        lines.append(
            f"max |onnx - torch| on {c['rows']} synthetic rows: {parts}; probabilities {c['probabilities']:.2e}"
        )
        lines.append(
            f"label decisions agreeing: {100 * c['label_agreement']:.1f}% of cells, "
            f"{100 * c['rows_identical']:.1f}% of rows identical"
        )
    return "\n".join(lines)
