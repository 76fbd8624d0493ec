"""Reference fixtures read from mdistiller's CIFAR models: parameter names, shapes and outputs.

`tests/fixtures/mdistiller/<model>.json` holds, for num_classes=100, every state-dict key of
mdistiller's model with its shape, and the logits that mdistiller's model gives in eval mode, in
float64, for `reference_state_dict(...)` weights on `reference_input()`. Equal names and shapes
mean mdistiller's released checkpoints load with strict=True; equal logits mean they compute the
same function once loaded.
"""

import json
import math
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "mdistiller"


def load_fixture(name: str) -> dict:
    """The fixture of one model: its state-dict shapes and reference logits."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


def reference_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Deterministic float64 weights for the given keys: scaled normals, positive BN variances."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
        elif len(shape) >= 2:  # conv / linear weight: keep activations O(1) through deep nets
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
        else:  # biases, BN affine, running means
            base = 1.0 if key.endswith(".weight") else 0.0
            state[key] = base + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return state


def reference_input() -> torch.Tensor:
    """Two float64 CIFAR-sized images."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
