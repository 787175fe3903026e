"""CDIS losses: what makes a drone photo and its satellite tile embed to the same place.

total = w_nce · InfoNCE(pooled drone, pooled satellite)       — retrieval itself: each drone photo
                                                                 must pick its own tile in the batch
      + w_ce  · CE(part and global heads, location)           — structural invariance
      + w_align · (1 − cos(drone tokens, satellite tokens))   — spatial invariance
All terms are computed in float32 whatever the autocast dtype, so AMP changes speed, not the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model_backend.nn.cdiktnet.cdis import CDISOutput


@dataclass(frozen=True)
class CDISLossConfig:
    """Weights of the CDIS terms; defaults follow the paper family (METHOD.md)."""

    info_nce_weight: float = 1.0
    label_smoothing: float = 0.1
    """InfoNCE label smoothing: the batch may hold near-duplicate places, so do not demand certainty."""
    ce_weight: float = 0.1
    """Weight of the classifier cross-entropy (mean over heads and both views)."""
    alignment_weight: float = 1.0
    """1.3 on University-1652, 0.75 on SUES-200 (MEAN's settings); ~1.0 elsewhere."""
    max_logit_scale: float = 100.0
    """Upper bound on exp(logit scale), as CLIP does: stops the temperature collapsing under AMP."""

    @classmethod
    def for_dataset(cls, layout: str, **overrides: Any) -> CDISLossConfig:
        """The alignment weight the template used on each benchmark ('university1652', 'sues200', other)."""
        weight = {"university1652": 1.3, "sues200": 0.75}.get(layout, 1.0)
        return cls(**{"alignment_weight": weight, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CDISLossResult:
    """The total to backpropagate and each term before weighting, for logging."""

    total: torch.Tensor
    info_nce: torch.Tensor
    ce: torch.Tensor
    alignment: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in
                (("loss", self.total), ("info_nce", self.info_nce), ("ce", self.ce), ("alignment", self.alignment))}


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    """Leave autocast for the loss arithmetic: fp16 logits at scale 100 lose the small margins."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float,
                       label_smoothing: float = 0.1) -> torch.Tensor:
    """Mean of drone→satellite and satellite→drone cross-entropy over the batch's similarity matrix.

    Row i's positive is column i (the batch holds one pair per location); every other item in
    the batch is a negative, which is why large batches help.
    """
    with _no_autocast(a):
        a = F.normalize(a.float(), dim=1)
        b = F.normalize(b.float(), dim=1)
        logits = torch.as_tensor(logit_scale, device=a.device).float() * a @ b.t()
        target = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, target, label_smoothing=label_smoothing)
                + F.cross_entropy(logits.t(), target, label_smoothing=label_smoothing)) / 2


def heads_cross_entropy(drone_logits: list[torch.Tensor], sat_logits: list[torch.Tensor],
                        labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every classifier head of both views against the location labels, averaged."""
    all_logits = list(drone_logits) + list(sat_logits)
    if not all_logits:
        raise ValueError("The model has no classifier heads (n_classes=0); set ce_weight=0 or give n_classes.")
    with _no_autocast(all_logits[0]):
        return torch.stack([F.cross_entropy(lg.float(), labels) for lg in all_logits]).mean()


def alignment_loss(drone_tokens: torch.Tensor, sat_tokens: torch.Tensor) -> torch.Tensor:
    """1 − cosine between each pair's whole token maps (flattened), averaged over the batch.

    Flattening keeps token positions meaningful: the drone photo is cut around the same ground
    centre as its tile, so token k of both maps describes roughly the same place.
    """
    if drone_tokens.shape != sat_tokens.shape:
        raise ValueError(f"Token maps differ in shape ({tuple(drone_tokens.shape)} vs {tuple(sat_tokens.shape)}): "
                         "give both views the same input size.")
    with _no_autocast(drone_tokens):
        d = drone_tokens.float().flatten(1)
        s = sat_tokens.float().flatten(1)
        return 1 - F.cosine_similarity(d, s, dim=1, eps=1e-8).mean()


class CDISLoss(torch.nn.Module):
    """Combine the three CDIS terms from a `CDISOutput` (see `CDIKTNet.forward_train`)."""

    def __init__(self, config: CDISLossConfig | None = None) -> None:
        super().__init__()
        self.config = config or CDISLossConfig()

    def forward(self, out: CDISOutput, labels: torch.Tensor | None = None) -> CDISLossResult:
        cfg = self.config
        scale = out.logit_scale if out.logit_scale is not None else torch.tensor(1 / 0.07)
        scale = scale.float().clamp(max=cfg.max_logit_scale)
        nce = symmetric_info_nce(out.drone_pooled, out.sat_pooled, scale, cfg.label_smoothing)
        zero = nce.new_zeros(())
        ce = zero
        if cfg.ce_weight and labels is not None and (out.drone_logits or out.sat_logits):
            ce = heads_cross_entropy(out.drone_logits, out.sat_logits, labels)
        align = zero
        if cfg.alignment_weight and out.drone_tokens is not None and out.sat_tokens is not None:
            align = alignment_loss(out.drone_tokens, out.sat_tokens)
        total = cfg.info_nce_weight * nce + cfg.ce_weight * ce + cfg.alignment_weight * align
        return CDISLossResult(total=total, info_nce=nce, ce=ce, alignment=align)

