"""Inference shared by validation, evaluate, promote and predict: class probabilities of a split."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.data import SplitData, make_dataset
from pipeline.device import autocast


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None = None,
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) float32 and labels (N,) of every item of ``loader``, in order.

    The model is put in eval mode; ``dtype`` autocasts (None: full precision); ``channels_last`` feeds
    the batches in that memory format (as the model was trained).
    """
    model.eval()
    probs, labels = [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        probs.append(logits.float().softmax(1).cpu().numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(probs), np.concatenate(labels)


def score_split(model: nn.Module, data: SplitData, split: str, device: torch.device, batch_size: int) -> np.ndarray:
    """Class probabilities (n, K) float32 of one split's images (no augmentation), in the split's row order."""
    from monai.data import DataLoader

    loader = DataLoader(make_dataset(data, split), batch_size=batch_size, shuffle=False, num_workers=0)
    return predict(model, loader, device)[0]
