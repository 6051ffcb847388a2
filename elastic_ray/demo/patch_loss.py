"""Training-only auxiliary loss for the demo VLMs: label every image token with what it shows.

Learned from answer tokens alone, a from-scratch vision tower grounds slowly: the text model
must find an object among 196 image tokens before the tower gets a useful gradient. This head
reads the projected image tokens (the text model's inputs) and predicts, per patch, the grid
cell it lies in and the shape, colour and size of the object it covers ("none" on background).

Shape, colour and size are scored against the text model's own embeddings of those words, so
a patch of a red circle lands near the embeddings of " red" and " circle": the vectors a
question uses to ask for it ("What color is the circle?"). Without this, finding an object by
its shape stays near chance while reading the shape at a given cell is easy.
The head is dropped after training; the saved model is a plain LLaVA.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elastic_ray.data.shapes import BACKGROUND, CELLS, COLORS, NOISE, SHAPES, SIZES, Scene
from elastic_ray.data.shapes_v2 import DetailedScene

ATTRIBUTES = (SHAPES, tuple(COLORS), SIZES)


def patch_targets(scene: Scene, patch: int) -> torch.Tensor:
    """(num_patches, 4) long tensor of (cell, shape, colour, size) ids; attribute 0 is "none".

    A v2 scene's renderer records which object each pixel shows; in a v1 scene an object is any
    pixel off the background grey, and it belongs to the object of the cell it lies in."""
    if isinstance(scene, DetailedScene):
        return label_targets(scene.object_map, [_attribute_ids(o) for o in scene.objects], patch)
    pixels = np.asarray(scene.image, dtype=np.int16)
    foreground = np.abs(pixels - BACKGROUND).max(-1) > 3 * NOISE
    labels = (_cell_map(pixels.shape[0]) + 1) * foreground  # 1 + cell, 0 on background
    by_cell = [[0, 0, 0] for _ in CELLS]
    for o in scene.objects:
        by_cell[o.cell] = _attribute_ids(o)
    return label_targets(labels, by_cell, patch)


def label_targets(labels: np.ndarray, attributes: list[list[int]], patch: int) -> torch.Tensor:
    """Patch targets from a (side, side) map of labels (0 = background, k = the object whose
    attribute ids are `attributes[k - 1]`): each patch takes its centre's cell and the attributes
    of the label covering most of it, if at least 1/16 of it."""
    side = labels.shape[0]
    n = side // patch
    counts = np.eye(len(attributes) + 1, dtype=np.int32)[labels][..., 1:]  # (side, side, objects)
    counts = counts.reshape(n, patch, n, patch, len(attributes)).sum((1, 3)).reshape(n * n, len(attributes))
    centre_cell = _cell_map(side)[patch // 2::patch, patch // 2::patch].reshape(-1)
    covered = np.array(attributes, dtype=np.int64)[counts.argmax(-1)] * (counts.max(-1) >= patch * patch // 16)[:, None]
    return torch.from_numpy(np.concatenate([centre_cell[:, None], covered], axis=1))


def _cell_map(side: int) -> np.ndarray:
    """(side, side) grid cell index (row-major) of every pixel."""
    band = np.arange(side) * 3 // side
    return band[:, None] * 3 + band[None, :]


def _attribute_ids(o) -> list[int]:
    return [1 + words.index(w) for words, w in zip(ATTRIBUTES, (o.shape, o.color, o.size))]


class PatchHead(nn.Module):
    """Per-patch classifiers: a linear layer for the cell, word embeddings for the attributes."""

    def __init__(self, hidden: int, word_ids: list[list[int]]):
        super().__init__()
        self.cell = nn.Linear(hidden, len(CELLS))
        self.none = nn.Parameter(torch.zeros(len(word_ids), hidden))  # the "no object" class per attribute
        self.word_ids = [torch.tensor(ids) for ids in word_ids]

    def forward(self, features: torch.Tensor, targets: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the four fields; features (B, P, H), targets (B, P, 4), embeddings (V, H)."""
        features = features.float().flatten(0, 1)
        targets = targets.flatten(0, 1)
        loss = F.cross_entropy(self.cell(features), targets[:, 0])
        for i, ids in enumerate(self.word_ids):
            classes = torch.cat([self.none[i:i + 1], embeddings[ids].float()])
            loss = loss + F.cross_entropy(features @ classes.T, targets[:, i + 1])
        return loss / (1 + len(self.word_ids))


def attribute_word_ids(tokenizer) -> list[list[int]]:
    """Token ids of " circle", " red", " large", ...: one token per word, in ATTRIBUTES order."""
    ids = [[tokenizer(" " + w, add_special_tokens=False).input_ids for w in words] for words in ATTRIBUTES]
    assert all(len(t) == 1 for words in ids for t in words), "attribute words must be single tokens"
    return [[t[0] for t in words] for words in ids]
