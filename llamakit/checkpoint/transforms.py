"""Module swaps applied while loading: after the model is built on the meta device, before its weights are assigned.

A transform (quantization, a parallel layer, ...) replaces some of a model's modules with its own; the tensors
it owns keep the dtype and shape it gives them, not the model's. A model saved after a transform records it in
config.json (`"llamakit": {"transforms": [{"name": ..., settings}]}`), and load_model applies it again by name.
The protocol itself (Transform, register, apply_transforms) is in model/transforms.py, so that model code such as
model/quantize.py can define transforms; it is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import torch

import llamakit.model.quantize  # noqa: F401 (registers int8 and int4, which checkpoints record)
import llamakit.model.reward  # noqa: F401 (registers reward_head)
from llamakit.errors import CheckpointError
from llamakit.model.llama import Transformer
from llamakit.model.transforms import TRANSFORMS, Transform, applied, apply_transforms, register

__all__ = ["TRANSFORMS", "Transform", "applied", "apply_transforms", "from_records", "owned_dtypes", "register"]


def owned_dtypes(model: Transformer) -> dict[str, torch.dtype]:
    """The state entries the model's transforms own, with the dtype each keeps (never the model's dtype)."""
    return {name: dtype for transform in applied(model) for name, dtype in transform.owned(model).items()}


def from_records(records: object, where: Path) -> list[Transform]:
    """The transforms a config.json block records; CheckpointError for one unknown to this process."""
    if not isinstance(records, list) or not all(isinstance(r, dict) and "name" in r for r in records):
        raise CheckpointError(f"{where}: 'transforms' must be a list of {{\"name\": ...}} objects; the file is damaged")
    transforms = []
    for record in records:
        settings = {k: v for k, v in record.items() if k != "name"}
        cls = TRANSFORMS.get(record["name"])
        if cls is None:
            raise CheckpointError(f"{where}: the weights were saved after transform {record['name']!r}, which is not "
                                  f"registered here (known: {', '.join(sorted(TRANSFORMS)) or 'none'}); import the "
                                  "module that defines it (@llamakit.checkpoint.transforms.register) before loading")
        try:
            transforms.append(cls(**settings))
        except TypeError as e:
            raise CheckpointError(f"{where}: transform {record['name']!r} does not take the settings {settings} "
                                  f"({e})") from None
    return transforms
