"""Training losses on logits, and the output activation that goes with them.

All losses take raw logits and 0/1 targets of shape ``(batch, n_labels)`` and
return the mean over all elements, like ``nn.BCEWithLogitsLoss``, so they are
drop-in replacements and learning rates tuned for BCE remain sensible.

* ``"bce"``   - ``nn.BCEWithLogitsLoss`` (optionally with ``pos_weight``).
* ``"focal"`` - :class:`FocalLoss` (Lin et al. 2017), down-weights easy examples.
* ``"asl"``   - :class:`AsymmetricLoss` (Ben-Baruch et al. 2020), focuses harder
  on negatives and discards very easy ones; designed for the many-negatives
  imbalance of multi-label data.

With ``task="multiclass"`` (exactly one label a row) the heads' outputs go through a softmax and
the losses become their single-label forms, on the same one-hot targets:

* ``"bce"``   - cross-entropy (``nn.CrossEntropyLoss``); ``loss_kwargs`` may set ``label_smoothing``.
* ``"focal"`` - :class:`SoftmaxFocalLoss`, ``(1 - p_true) ** gamma * cross-entropy``; ``alpha`` (a
  binary positive/negative weight) is refused.
* ``"asl"``   - refused: its clipping of easy negatives has no meaning for one softmax.
* ``pos_weight`` - per-class weights of the cross-entropy, ``n / (classes * count)`` capped at 10
  (:func:`class_weight_from_labels`), so rare classes count more, as ``pos_weight`` does for BCE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FocalLoss",
    "AsymmetricLoss",
    "SoftmaxFocalLoss",
    "build_loss",
    "pos_weight_from_labels",
    "class_weight_from_labels",
    "probabilities",
    "LOSSES",
    "TASKS",
]

LOSSES = ("bce", "focal", "asl")
TASKS = ("multilabel", "multiclass")

# Floor for the focusing terms' base before it is raised to a power: the
# derivative of x**g at x = 0 is infinite for 0 < g < 1, which would turn the
# gradient into NaN for saturated logits. The effect on the loss is < 1e-12.
_BASE_EPS = 1e-12


def _as_pos_weight(pos_weight) -> torch.Tensor | None:
    if pos_weight is None:
        return None
    return torch.as_tensor(pos_weight, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Binary focal loss per label, on logits, averaged over all elements.

    ``loss = alpha_t * (1 - p_t) ** gamma * BCE(logit, target; pos_weight)``
    where ``p_t`` is the probability given to the true outcome. With
    ``gamma=0`` and ``alpha=None`` it is exactly ``BCEWithLogitsLoss``.

    Args:
        gamma: focusing parameter; 0 disables the down-weighting of easy examples.
        alpha: optional weight of the positive term in ``[0, 1]`` (negatives get
            ``1 - alpha``); ``None`` weights both equally.
        pos_weight: optional ``(n_labels,)`` multiplier of each label's positive
            term, as in ``BCEWithLogitsLoss``.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, pos_weight=None):
        super().__init__()
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1] or None")
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)
        # A buffer so that .to(device) moves it with the module.
        self.register_buffer("pos_weight", _as_pos_weight(pos_weight))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pw, reduction="none")
        loss = bce
        if self.gamma != 0.0:
            # 1 - p_t via sigmoid(-x) rather than 1 - sigmoid(x): no cancellation
            # for confident predictions, which are exactly the ones focal loss damps.
            one_minus_pt = targets * torch.sigmoid(-logits) + (1.0 - targets) * torch.sigmoid(logits)
            loss = loss * one_minus_pt.clamp(min=_BASE_EPS).pow(self.gamma)
        if self.alpha is not None:
            loss = loss * (self.alpha * targets + (1.0 - self.alpha) * (1.0 - targets))
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, pos_weight={'set' if self.pos_weight is not None else None}"


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL), Ben-Baruch et al. 2020, on logits.

    Positives: ``-(1 - p) ** gamma_pos * log(p)``.
    Negatives: ``-p_m ** gamma_neg * log(1 - p_m)`` with the shifted probability
    ``p_m = max(p - clip, 0)``, which zeroes the loss of easy negatives
    (``p < clip``) entirely.

    With ``gamma_neg = gamma_pos = 0`` and ``clip = 0`` this is BCE (up to the
    ``eps`` clamp inside the logs).

    Args:
        gamma_neg: focusing exponent for negatives.
        gamma_pos: focusing exponent for positives.
        clip: probability margin for negatives (0 disables it).
        eps: floor inside the logarithms, as in the reference implementation.
        pos_weight: optional ``(n_labels,)`` multiplier of each label's positive
            term (not in the paper; accepted so ``build_loss`` treats all losses
            alike). ``None`` gives the paper's loss.
    """

    def __init__(
        self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8, pos_weight=None
    ):
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise ValueError("gamma_neg and gamma_pos must be >= 0")
        if not 0.0 <= clip < 1.0:
            raise ValueError("clip must be in [0, 1)")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)
        self.register_buffer("pos_weight", _as_pos_weight(pos_weight))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        # sigmoid(-x) is the accurate form of 1 - sigmoid(x) for confident positives.
        q = torch.sigmoid(-logits)
        if self.clip > 0:
            # Probability shifting: (1 - p) + clip, capped at 1.
            q_neg = (q + self.clip).clamp(max=1.0)
        else:
            q_neg = q

        loss_pos = targets * torch.log(p.clamp(min=self.eps))
        loss_neg = (1.0 - targets) * torch.log(q_neg.clamp(min=self.eps))
        if self.pos_weight is not None:
            loss_pos = loss_pos * self.pos_weight.to(logits.dtype)

        # Separate scalar-exponent powers instead of the reference's per-element
        # exponent tensor: identical for 0/1 targets, and an exponent of 0 is
        # skipped outright rather than relying on 0 ** 0 gradients.
        if self.gamma_pos > 0:
            loss_pos = loss_pos * q.clamp(min=_BASE_EPS).pow(self.gamma_pos)
        if self.gamma_neg > 0:
            # 1 - q_neg is the shifted probability p_m = max(p - clip, 0).
            loss_neg = loss_neg * (1.0 - q_neg).clamp(min=_BASE_EPS).pow(self.gamma_neg)

        # The paper sums over elements; we average so that the loss scale (and
        # hence learning rates / schedules) transfers directly from BCE.
        return -(loss_pos + loss_neg).mean()

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
            f"pos_weight={'set' if self.pos_weight is not None else None}"
        )


class SoftmaxFocalLoss(nn.Module):
    """Focal loss over one softmax (single-label rows): ``(1 - p_true) ** gamma * CE``, averaged over rows.

    With ``gamma=0`` and no ``weight`` it is exactly ``nn.CrossEntropyLoss``.
    """

    def __init__(self, gamma: float = 2.0, weight=None):
        super().__init__()
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        self.gamma = float(gamma)
        self.register_buffer("weight", _as_pos_weight(weight))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
        w = None if self.weight is None else self.weight.to(logits.dtype)
        ce = F.cross_entropy(logits, target, weight=w, reduction="none")
        if self.gamma != 0.0:
            ce = ce * (-torch.expm1(log_p)).clamp(min=_BASE_EPS).pow(self.gamma)  # 1 - p_true, accurately
        # Weighted like nn.CrossEntropyLoss: divide by the weights of the rows' classes, not the row count.
        return ce.sum() / (w[target].sum() if w is not None else ce.new_tensor(float(len(ce))))

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weight={'set' if self.weight is not None else None}"


class _OneHotToIndex(nn.Module):
    """A single-label loss fed the one-hot ``(batch, classes)`` targets every loader produces."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, targets.argmax(dim=-1))


def probabilities(logits: torch.Tensor, task: str = "multilabel") -> torch.Tensor:
    """The probabilities a head's logits stand for: a sigmoid per label, or one softmax over the classes."""
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if task == "multiclass" else torch.sigmoid(logits)


def build_loss(name: str, pos_weight: torch.Tensor | None = None, task: str = "multilabel", **kwargs) -> nn.Module:
    """Construct a loss module by name.

    Args:
        name: ``"bce"``, ``"focal"`` or ``"asl"`` (case-insensitive).
        pos_weight: optional ``(n_labels,)`` positive-term weights, e.g. from
            :func:`pos_weight_from_labels` (for ``task="multiclass"``: class
            weights, e.g. from :func:`class_weight_from_labels`).
        task: ``"multilabel"`` or ``"multiclass"`` (see the module docstring
            for what each name means there).
        **kwargs: forwarded to the loss constructor (e.g. ``gamma=1.0`` for
            focal, ``gamma_neg=2, clip=0.0`` for ASL).

    Raises:
        ValueError: for an unknown name, or a loss the task cannot use.
    """
    key = name.lower().strip()
    if task == "multiclass":
        return _OneHotToIndex(_multiclass_loss(key, pos_weight, kwargs))
    if task != "multilabel":
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if key == "bce":
        return nn.BCEWithLogitsLoss(pos_weight=_as_pos_weight(pos_weight), **kwargs)
    if key == "focal":
        return FocalLoss(pos_weight=pos_weight, **kwargs)
    if key == "asl":
        return AsymmetricLoss(pos_weight=pos_weight, **kwargs)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def _multiclass_loss(key: str, weight, kwargs: dict) -> nn.Module:
    if key == "bce":
        unknown = sorted(set(kwargs) - {"label_smoothing"})
        if unknown:
            raise ValueError(
                f"loss_kwargs {', '.join(unknown)}: not options of the cross-entropy that "
                "task='multiclass' trains with loss='bce' (it takes label_smoothing)"
            )
        return nn.CrossEntropyLoss(weight=_as_pos_weight(weight), **kwargs)
    if key == "focal":
        if kwargs.get("alpha") is not None:
            raise ValueError(
                "loss_kwargs alpha: focal loss with task='multiclass' is one softmax, with no "
                "positive/negative balance to weight; use pos_weight=true for class weights"
            )
        return SoftmaxFocalLoss(weight=weight, **{k: v for k, v in kwargs.items() if k != "alpha"})
    if key == "asl":
        raise ValueError(
            "loss='asl' is a multi-label loss; with task='multiclass' use 'bce' (cross-entropy) or 'focal'"
        )
    raise ValueError(f"unknown loss {key!r}; choose one of {', '.join(LOSSES)}")


def class_weight_from_labels(y: np.ndarray, clip: float = 10.0) -> torch.Tensor:
    """Per-class weights ``n_rows / (n_classes * count)`` of one-hot labels, capped at ``clip``.

    The cross-entropy counterpart of :func:`pos_weight_from_labels`: a class seen half as often
    weighs twice as much; a class never seen gets the cap (it cannot occur in the loss anyway).
    """
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"expected a 2-D (n_rows, n_classes) array, got shape {y.shape}")
    count = (y > 0).sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore"):
        w = np.where(count > 0, y.shape[0] / (y.shape[1] * np.maximum(count, 1.0)), np.inf)
    return torch.as_tensor(np.minimum(w, clip), dtype=torch.float32)


def pos_weight_from_labels(y: np.ndarray, clip: float = 10.0) -> torch.Tensor:
    """Per-label ``n_negative / n_positive``, capped at ``clip``.

    Up-weights the positive term of rare labels in BCE-style losses. The cap
    stops a label with a handful of positives (or none: its ratio is infinite)
    from dominating the gradient. Common labels (more positives than
    negatives) get a weight below 1.

    Args:
        y: ``(n_rows, n_labels)`` 0/1 training labels.
        clip: upper bound of each weight.

    Returns:
        Float32 tensor of shape ``(n_labels,)``.
    """
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"expected a 2-D (n_rows, n_labels) array, got shape {y.shape}")
    if clip <= 0:
        raise ValueError("clip must be > 0")
    pos = (y > 0).sum(axis=0).astype(np.float64)
    neg = y.shape[0] - pos
    with np.errstate(divide="ignore"):
        w = np.where(pos > 0, neg / np.maximum(pos, 1.0), np.inf)
    return torch.as_tensor(np.minimum(w, clip), dtype=torch.float32)
