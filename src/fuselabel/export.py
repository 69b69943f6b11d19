"""ONNX export of a model folder: three graphs that onnxruntime runs without PyTorch.

    MODEL_DIR/onnx/
      image_encoder.onnx   pixels (N, 3, H, W) float32            -> features (N, Di)   pooled
      text_encoder.onnx    input_ids, attention_mask (N, L) int64 -> features (N, Dt)   masked mean
      head.onnx            image_feat, text_feat, image_present   -> probabilities (N, labels)
      manifest.json        inputs and outputs, preprocessing, labels, thresholds, sizes, checks

Only the graphs a model uses are written (an image-only model has no text encoder). The head
graph includes the sigmoid and the late-fusion rule with the weight stored in the model, so
its output is exactly what ``predict.predict_proba`` returns. Test-time flipping, when the
model uses it, is done by the caller (``tta_flip`` in the manifest): run the image encoder on
the pixels and on the horizontally flipped pixels and average the two feature vectors.

``int8=True`` quantises the text encoder and the head dynamically (int8 weights for MatMul
and Gemm, activations quantised per batch at run time); the image encoder stays float32
(dynamically quantised convolutions are slower than float ones in onnxruntime).

Image preprocessing stays in Python (``data.build_transform`` from ``preprocessing.json``),
as does tokenisation (the tokenizer in ``MODEL_DIR/text``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bundle import BundleError, replace_folder
from .onnxrt import (OPSET, SYNTHETIC_CAPTIONS, export_graph, export_image_encoder,  # noqa: F401 (re-exported)
                     export_text_encoder, run_text_encoder, session)

ONNX_DIR = "onnx"
MANIFEST = "manifest.json"
INT8_OPS = ["MatMul", "Gemm"]
INT8_TEXT_OPS = INT8_OPS + ["Gather"]   # + the embedding tables, most of a small text encoder's bytes

class ExportError(BundleError):
    """A model folder that cannot be exported, or an ONNX folder that cannot be used."""


def head_input_names(kind: str) -> list[str]:
    """Inputs of ``head.onnx`` for a model kind."""
    return {"image": ["image_feat"], "text": ["text_feat"]}.get(kind, ["image_feat", "text_feat", "image_present"])


class HeadGraph(nn.Module):
    """Head + sigmoid + the model's fusion rule, with positional inputs for the exporter."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.names = head_input_names(net.config.kind)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self.names, tensors))
        logits = self.net.head(self.net.encode(batch))
        return self.net.probabilities(logits, batch.get("image_present"))


def export_head(net: nn.Module, path: Path, opset: int = OPSET) -> Path:
    """Pooled features (+ ``image_present``) -> fused per-label ``probabilities``."""
    graph = HeadGraph(net.float().eval()).eval()
    dims = {"image_feat": net.image_encoder.num_features if net.image_encoder is not None else 0,
            "text_feat": net.text_encoder.num_features if net.text_encoder is not None else 0}
    args = tuple(torch.ones(2) if n == "image_present" else torch.randn(2, dims[n]) for n in graph.names)
    axes = {n: {0: "batch"} for n in graph.names}
    axes["probabilities"] = {0: "batch"}
    return export_graph(graph, args, Path(path), graph.names, ["probabilities"], axes, opset)


def quantize_int8(src: Path, dst: Path, ops=INT8_OPS) -> Path:
    """Dynamic int8 quantisation (onnxruntime.quantization): int8 weights with one scale per output channel.

    Per-channel scales matter: on all-MiniLM-L6-v2 one scale per tensor leaves a 26 % relative
    error in the pooled features, per-channel 11 % (512 real captions).
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a recommendation to pre-process the model; its accuracy is checked instead.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(ops),
                         per_channel=True)
    finally:
        logger.setLevel(level)
    return Path(dst)


# ----------------------------------------------------------------------------------------- export

def _synthetic_inputs(bundle, n: int = 8, seed: int = 0) -> dict:
    """Random pixels and fixed captions; the last row has no image when the model fuses both."""
    gen = torch.Generator().manual_seed(seed)
    out: dict = {}
    if bundle.net.image_encoder is not None:
        size = tuple(bundle.preprocessing["input_size"])
        out["pixels"] = torch.randn(n, *size, generator=gen)
        present = torch.ones(n)
        if bundle.net.text_encoder is not None and n > 1:
            present[-1] = 0.0
        out["image_present"] = present
    if bundle.net.text_encoder is not None:
        caps = [SYNTHETIC_CAPTIONS[i % len(SYNTHETIC_CAPTIONS)] for i in range(n)]
        tok = bundle.tokenizer(caps, padding=True, truncation=True, max_length=bundle.config.text_max_length,
                               return_tensors="pt")
        out["input_ids"], out["attention_mask"] = tok["input_ids"], tok["attention_mask"]
    return out


def _flip_average(run, pixels: np.ndarray, flip: bool) -> np.ndarray:
    f = run(pixels)
    if flip:
        f = (f + run(np.ascontiguousarray(pixels[..., ::-1]))) / 2
    return f


@torch.inference_mode()
def check_against_torch(bundle, onnx_dir: Path, n: int = 8, seed: int = 0, threads: int | None = None) -> dict:
    """Max |ONNX - PyTorch| per graph and end to end on synthetic inputs, and agreement of label decisions."""
    from .thresholds import apply_thresholds

    manifest = json.loads((Path(onnx_dir) / MANIFEST).read_text())
    files = manifest["files"]
    net = bundle.net.float().eval()
    x = _synthetic_inputs(bundle, n, seed)
    flip = bool(bundle.config.tta_flip)
    checks: dict = {"rows": n}
    feats_t, feats_o = {}, {}
    if "image_encoder" in files:
        sess = session(Path(onnx_dir) / files["image_encoder"]["path"], threads)
        feats_t["image_feat"] = _flip_average(lambda p: net.image_encoder(torch.from_numpy(p)).numpy(),
                                              x["pixels"].numpy(), flip)
        feats_o["image_feat"] = _flip_average(lambda p: sess.run(None, {"pixels": p})[0], x["pixels"].numpy(), flip)
        checks["image_encoder"] = float(np.abs(feats_t["image_feat"] - feats_o["image_feat"]).max())
    if "text_encoder" in files:
        sess = session(Path(onnx_dir) / files["text_encoder"]["path"], threads)
        feats_t["text_feat"] = net.text_encoder(x["input_ids"], x["attention_mask"]).numpy()
        feats_o["text_feat"] = sess.run(None, {"input_ids": x["input_ids"].numpy(),
                                               "attention_mask": x["attention_mask"].numpy()})[0]
        checks["text_encoder"] = float(np.abs(feats_t["text_feat"] - feats_o["text_feat"]).max())
    names = manifest["head"]["inputs"]
    if "image_present" in names:
        feats_t["image_present"] = feats_o["image_present"] = x["image_present"].numpy()
    head = HeadGraph(net).eval()
    probs_t = head(*[torch.from_numpy(feats_t[k]) for k in names]).numpy()
    sess = session(Path(onnx_dir) / files["head"]["path"], threads)
    head_same_in = sess.run(None, {k: feats_t[k] for k in names})[0]
    probs_o = sess.run(None, {k: feats_o[k] for k in names})[0]
    checks["head"] = float(np.abs(head_same_in - probs_t).max())
    checks["probabilities"] = float(np.abs(probs_o - probs_t).max())
    thr = bundle.threshold_vector
    nonempty = bundle.thresholds.get("ensure_nonempty", True)
    dec_t, dec_o = apply_thresholds(probs_t, thr, nonempty), apply_thresholds(probs_o, thr, nonempty)
    checks["label_agreement"] = float((dec_t == dec_o).mean())
    checks["rows_identical"] = float((dec_t == dec_o).all(1).mean())
    return checks


def export_onnx(model_dir, out_dir=None, int8: bool = False, *, opset: int = OPSET, check_rows: int = 8,
                threads: int | None = None) -> dict:
    """Export a model folder's graphs to ``out_dir`` (default ``MODEL_DIR/onnx``); returns the manifest.

    The folder is written beside its destination and renamed into place when complete. The
    manifest's ``checks`` hold the largest absolute differences from PyTorch on ``check_rows``
    synthetic rows (per graph and end to end) and the share of label decisions that agree.
    """
    import onnxruntime

    from . import __version__
    from .bundle import load_bundle

    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir else model_dir / ONNX_DIR
    bundle = load_bundle(model_dir)
    net, cfg = bundle.net.float().eval(), bundle.config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    t0 = time.time()
    try:
        files: dict = {}
        if net.image_encoder is not None:
            size = list(bundle.preprocessing["input_size"])
            export_image_encoder(net.image_encoder, tmp / "image_encoder.onnx", size, opset)
            files["image_encoder"] = {"path": "image_encoder.onnx", "inputs": {"pixels": ["batch", *size]},
                                      "outputs": {"features": ["batch", net.image_encoder.num_features]},
                                      "quantized": None}
        if net.text_encoder is not None:
            export_text_encoder(net.text_encoder, bundle.tokenizer, tmp / "text_encoder.onnx",
                                cfg.text_max_length, opset)
            files["text_encoder"] = {"path": "text_encoder.onnx",
                                     "inputs": {"input_ids": ["batch", "length"], "attention_mask": ["batch", "length"]},
                                     "outputs": {"features": ["batch", net.text_encoder.num_features]},
                                     "quantized": None}
        export_head(net, tmp / "head.onnx", opset)
        names = head_input_names(cfg.kind)
        files["head"] = {"path": "head.onnx", "inputs": {n: ["batch"] if n == "image_present" else ["batch", "dim"]
                                                         for n in names},
                         "outputs": {"probabilities": ["batch", len(bundle.labels)]}, "quantized": None}
        float_bytes = {k: (tmp / v["path"]).stat().st_size for k, v in files.items()}
        if int8:
            for part in ("text_encoder", "head"):
                if part in files:
                    src = tmp / files[part]["path"]
                    fp32 = src.with_name(src.stem + ".fp32.onnx")
                    os.replace(src, fp32)
                    ops = INT8_TEXT_OPS if part == "text_encoder" else INT8_OPS
                    quantize_int8(fp32, src, ops)
                    fp32.unlink()
                    files[part]["quantized"] = f"dynamic, per-channel QInt8 weights ({', '.join(ops)})"
        for part, info in files.items():
            info["bytes"] = (tmp / info["path"]).stat().st_size
            info["float_bytes"] = float_bytes[part]
        manifest = {
            "format": "fuselabel-onnx", "version": 1, "fuselabel": __version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": opset, "int8": bool(int8),
            "kind": cfg.kind, "late_combine": cfg.late_combine, "late_weight": float(net.late_weight),
            "tta_flip": bool(cfg.tta_flip), "text_max_length": cfg.text_max_length,
            "missing_images": cfg.missing_images, "preprocessing": bundle.preprocessing,
            "tokenizer": "../text" if out == model_dir / ONNX_DIR else str((model_dir / "text").resolve()),
            "labels": bundle.labels, "thresholds": [float(t) for t in bundle.threshold_vector],
            "ensure_nonempty": bool(bundle.thresholds.get("ensure_nonempty", True)),
            "files": files, "head": {"inputs": names, "rule": _rule(cfg.kind, cfg.late_combine)},
            "export_s": None, "checks": None,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if check_rows:
            manifest["checks"] = check_against_torch(bundle, tmp, check_rows, threads=threads)
        manifest["export_s"] = round(time.time() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest["out_dir"] = str(out)
    return manifest


def _rule(kind: str, combine: str) -> str:
    if kind in ("image", "text"):
        return f"sigmoid({kind} head)"
    if kind == "early":
        return "sigmoid(head(concat(norm(image_feat * image_present), norm(text_feat))))"
    if combine == "union":
        return "max(p_image, p_text); p_text where image_present == 0"
    return "w * p_image + (1 - w) * p_text with w = late_weight; p_text where image_present == 0"


# ----------------------------------------------------------------------------------------- predict

class OnnxModel:
    """An exported folder loaded into onnxruntime sessions, with its tokenizer and preprocessing."""

    def __init__(self, model_dir, onnx_dir=None, threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.onnx_dir = Path(onnx_dir) if onnx_dir else self.model_dir / ONNX_DIR
        path = self.onnx_dir / MANIFEST
        if not path.exists():
            raise ExportError(f"{self.onnx_dir}: no {MANIFEST}; run `fuselabel export {self.model_dir} --format onnx`")
        self.manifest = json.loads(path.read_text())
        files = self.manifest["files"]
        self.sessions = {part: session(self.onnx_dir / info["path"], threads) for part, info in files.items()}
        self.tokenizer = None
        if "text_encoder" in files:
            from .encoders import create_tokenizer

            self.tokenizer = create_tokenizer(str(self.model_dir / "text"))

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    def image_features(self, records, image_dir, *, batch_size=64, num_workers=None, missing_images=None,
                       progress=False):
        from torch.utils.data import DataLoader

        from .data import PairDataset, TextCollate, build_transform, default_workers

        sess = self.sessions["image_encoder"]
        transform = build_transform(self.manifest["preprocessing"], train=False)
        ds = PairDataset(records, image_dir, transform,
                         missing_images=missing_images or self.manifest["missing_images"])
        loader = DataLoader(ds, batch_size=batch_size, num_workers=default_workers(num_workers),
                            collate_fn=TextCollate(None))
        run = lambda p: sess.run(None, {"pixels": p})[0]  # noqa: E731
        feats, present = [], []
        start = time.time()
        for batch in loader:
            feats.append(_flip_average(run, batch["pixels"].numpy(), self.manifest["tta_flip"]))
            present.append(batch["image_present"].numpy())
            if progress:
                done = sum(len(f) for f in feats)
                print(f"\r  image features (onnx) {done}/{len(ds)} ({done / max(time.time() - start, 1e-9):.0f}/s)",
                      end="", flush=True)
        if progress:
            print()
        return np.concatenate(feats).astype(np.float32), np.concatenate(present).astype(np.float32)

    def text_features(self, captions, *, batch_size=256, progress=False) -> np.ndarray:
        return run_text_encoder(self.sessions["text_encoder"], self.tokenizer, list(captions),
                                max_length=self.manifest["text_max_length"], batch_size=batch_size, progress=progress)

    def head(self, feats: dict, batch_size: int = 4096) -> np.ndarray:
        names = self.manifest["head"]["inputs"]
        n = len(next(iter(feats.values())))
        outs = [self.sessions["head"].run(None, {k: np.ascontiguousarray(feats[k][i:i + batch_size], np.float32)
                                                 for k in names})[0] for i in range(0, n, batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.labels)), np.float32)

    def predict_proba(self, records, image_dir, *, batch_size=64, num_workers=None, missing_images=None,
                      progress=False) -> np.ndarray:
        records = list(records)
        feats: dict = {}
        if "image_encoder" in self.sessions:
            feats["image_feat"], feats["image_present"] = self.image_features(
                records, image_dir, batch_size=batch_size, num_workers=num_workers, missing_images=missing_images,
                progress=progress)
        if "text_encoder" in self.sessions:
            feats["text_feat"] = self.text_features([r.caption for r in records], progress=progress)
        return self.head(feats)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        from .thresholds import apply_thresholds

        return apply_thresholds(probs, np.asarray(self.manifest["thresholds"]), self.manifest["ensure_nonempty"])


def onnx_predict_proba(model_dir, records, image_dir, *, onnx_dir=None, batch_size: int = 64,
                       num_workers: int | None = None, missing_images: str | None = None,
                       threads: int | None = None, progress: bool = False) -> np.ndarray:
    """``predict.predict_proba`` through the exported graphs: (n, labels) fused probabilities."""
    model = OnnxModel(model_dir, onnx_dir, threads)
    return model.predict_proba(records, image_dir, batch_size=batch_size, num_workers=num_workers,
                               missing_images=missing_images, progress=progress)


def format_report(manifest: dict) -> str:
    """What ``fuselabel export`` prints."""
    out = Path(manifest["out_dir"])
    lines = [f"wrote {out} ({'int8 text encoder and head' if manifest['int8'] else 'float32'}, opset "
             f"{manifest['opset']}, {manifest['export_s']:.1f}s)"]
    total = 0
    for part, info in manifest["files"].items():
        total += info["bytes"]
        q = f"  int8, was {info['float_bytes'] / 1e6:.2f} MB" if info["quantized"] else ""
        inputs = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in info["inputs"].items())
        lines.append(f"  {info['path']:22s} {info['bytes'] / 1e6:8.2f} MB{q}   {inputs}")
    lines.append(f"  {MANIFEST:22s} {(out / MANIFEST).stat().st_size / 1e6:8.2f} MB")
    lines.append(f"  total {total / 1e6:.2f} MB; head rule: {manifest['head']['rule']}")
    c = manifest.get("checks")
    if c:
        parts = ", ".join(f"{k} {c[k]:.2e}" for k in ("image_encoder", "text_encoder", "head") if k in c)
        lines.append(f"max |onnx - torch| on {c['rows']} synthetic rows: {parts}; probabilities {c['probabilities']:.2e}")
        lines.append(f"label decisions agreeing: {100 * c['label_agreement']:.1f}% of cells, "
                     f"{100 * c['rows_identical']:.1f}% of rows identical")
    return "\n".join(lines)
