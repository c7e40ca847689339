"""Box conversions (pure torch; no torchvision)."""

from __future__ import annotations

import torch


def xywh_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(x_min, y_min, w, h)` -> `(center_x, center_y, w, h)`; shape `(..., 4)`."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x + w / 2, y + h / 2, w, h), dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`(center_x, center_y, w, h)` -> `(x_min, y_min, x_max, y_max)`; shape `(..., 4)`."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)
