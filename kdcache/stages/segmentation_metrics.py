"""How good a segmentation model is: the confusion matrix over the labelled pixels of a split, its mean
intersection-over-union (mIoU) and its pixel accuracy: the matrix and each class's IoU as torchvision's reference
scripts compute them (references/segmentation/utils.py, ConfusionMatrix), the mean as mmsegmentation takes it.

The confusion matrix counts, over every pixel whose label is not IGNORE_INDEX (255: padding, borders), how often
true class i was predicted as class j (rows: the label, columns: the prediction); it is summed over the whole split
before any ratio, so a metric is the split's, not a mean over images. A class's IoU is TP / (TP + FP + FN), its
diagonal entry over its row plus its column less the diagonal; mIoU is the mean over the classes present in the
split's labels or predictions (those with TP + FP + FN > 0), as mmsegmentation's `nanmean` of the per-class IoU
takes it: a class that neither occurs nor is predicted has no IoU, rather than an IoU of 0 or 1. Pixel accuracy is
the trace over the sum: the share of labelled pixels predicted right (what top-1 accuracy is, per pixel).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.data.dense import IGNORE_INDEX, DenseBatch
from kdcache.runtime import autocast


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """int64 [C, C] counts of (label i, prediction j) over the pixels whose label is not IGNORE_INDEX; predictions
    and labels are integer maps of the same shape."""
    labelled = labels != IGNORE_INDEX
    pairs = labels[labelled].long() * num_classes + predictions[labelled].long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScore:
    """A split's mIoU and pixel accuracy, its mean cross-entropy per labelled pixel, and what they were counted
    over: images, labelled pixels, and the classes the mean IoU is taken over (present in labels or predictions)."""

    miou: float
    pixel_acc: float
    loss: float
    images: int
    pixels: int
    classes: int

    def metrics(self) -> dict[str, float]:
        """The metrics.csv columns: test_miou, test_pixel_acc, test_loss."""
        return {"test_miou": self.miou, "test_pixel_acc": self.pixel_acc, "test_loss": self.loss}


def scores(confusion: Tensor, loss_sum: float = 0.0, images: int = 0) -> SegmentationScore:
    """mIoU (over the classes with TP + FP + FN > 0; 0 when there are none) and pixel accuracy of a confusion
    matrix [C, C], with the summed cross-entropy `loss_sum` made a mean per labelled pixel."""
    confusion = confusion.double().cpu()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    pixels = int(confusion.sum())
    miou = float((hits[present] / union[present]).mean()) if present.any() else 0.0
    return SegmentationScore(miou, float(hits.sum()) / max(pixels, 1), loss_sum / max(pixels, 1), images, pixels,
                             int(present.sum()))


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, batches: Iterable[DenseBatch], num_classes: int) -> SegmentationScore:
    """A model's score over a split's un-augmented batches (normalised images, label maps): its per-pixel argmax
    against the labels, and the cross-entropy of its logits over the labelled pixels. The model is left in eval
    mode."""
    model.eval()
    confusion, loss_sum, images = torch.zeros(num_classes, num_classes, dtype=torch.long), 0.0, 0
    for x, masks in batches:
        with autocast(x.device):
            logits = model(x).float()
        confusion += confusion_matrix(logits.argmax(1), masks, num_classes).cpu()
        loss_sum += float(F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum"))
        images += len(x)
    return scores(confusion, loss_sum, images)
