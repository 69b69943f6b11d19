"""Answers built from the model's predictions and explanations, in the shapes of ``schemas``."""

import base64

from ..estimator import FuseLabel
from .model import model_id


def rows(model: FuseLabel, pred) -> list[dict]:
    out = []
    for i, status in enumerate(pred.status):
        labels = []
        for j, (lab, name) in enumerate(zip(model.labels_, model.label_names_)):
            labels.append(
                {
                    "id": lab,
                    "name": name,
                    "probability": float(pred.probs[i, j]),
                    "threshold": float(model.thresholds_[j]),
                    "predicted": bool(pred.predicted[i, j]),
                    "parts": {part: float(p[i, j]) for part, p in pred.parts.items()},
                }
            )
        out.append(
            {
                "labels": labels,
                "predicted": [{"id": lab["id"], "name": lab["name"]} for lab in labels if lab["predicted"]],
                "inputs": [
                    name
                    for name, used in (("image", pred.image_present[i]), ("caption", pred.caption_present[i]))
                    if used
                ],
                "status": status,
                "contributions": contributions(model, pred, i),
            }
        )
    return out


def contributions(model: FuseLabel, pred, i: int) -> dict:
    """What row ``i``'s photo and caption each did to its answer (``schemas.Contributions``)."""
    read = pred.captions_read[i] if i < len(pred.captions_read) else None
    changed = {
        name: None if flags is None else bool(flags[i])
        for name, flags in (("image", pred.image_changed), ("caption", pred.caption_changed))
    }
    return {
        "image_weight": model.fusion_["image_weight"],
        "separable": pred.image_changed is not None,
        "image_changed": changed["image"],
        "caption_changed": changed["caption"],
        "caption": caption_read(read),
    }


def caption_read(read) -> dict | None:
    """A ``runtime.CaptionReading`` as ``schemas.CaptionRead`` (None stays None)."""
    if read is None:
        return None
    fields = ("tokens", "tokens_read", "max_tokens", "words", "words_read", "read_text", "cut")
    return {name: getattr(read, name) for name in fields}


def explanation(model: FuseLabel, label_index: int, pred, expl) -> dict:
    from ..explanation import heatmap_png

    row = rows(model, pred)[0]
    heat = words = None
    if expl.heatmap is not None:
        heat = {
            "png_base64": base64.b64encode(heatmap_png(expl.heatmap)).decode(),
            "width": int(expl.heatmap.shape[1]),
            "height": int(expl.heatmap.shape[0]),
            "target": expl.heatmap_target,
            "logit": expl.heatmap_logit,
        }
    if expl.words is not None:
        words = {
            "items": expl.words,
            "target": expl.words_target,
            "logit": expl.words_logit,
            "baseline_logit": expl.words_baseline_logit,
        }
    return {
        "model": model_id(model),
        "label": row["labels"][label_index],
        "status": row["status"],
        "inputs": row["inputs"],
        "fusion": model.fusion_,
        "method": expl.method,
        "heatmap": heat,
        "words": words,
    }
