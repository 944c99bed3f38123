"""What a checkpoint was saved with: device mesh, placements per parameter family, pipeline split.

The manager writes :func:`describe_layout`'s dict as the manifest's ``"mesh"``::

    {"shape": [2, 2], "dim_names": ["dp_shard", "tp"], "device_type": "cpu",
     "placements": ["Shard(dim=0)", "Shard(dim=0)"],         # the first DTensor's (as before)
     "root": {"shape": [1, 2, 2], "dim_names": ["pp", "dp_shard", "tp"]},
     "families": {"layers.*.attention.wq.weight": ["dp_shard: StridedShard(0)", "tp: Shard(0)"],
                  "tok_embeddings.weight": ["dp_shard: Shard(0)"], "norm.weight": []},
     "pipeline": [{"ranks": [0, 1, 2, 3], "parts": [{"layers": ["0", "1"],
                   "modules": ["norm", "output", "tok_embeddings"]}]}]}

``families`` folds layer numbers into ``*`` (an empty list: a whole tensor on
every rank); ``pipeline`` lists each distinct split of the model over ranks: the
layers and other top-level modules each model part of those ranks holds (one
part per rank without pipeline parallel). Manifests written before this have
only the first four keys, or ``null``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


def family_of(fqn: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``layers.*.attention.wq.weight``."""
    return _NUMBER.sub("*", fqn)


def _placement(p: Any) -> str:
    dim = getattr(p, "dim", None)
    if "Strided" in type(p).__name__:  # FSDP2 over a TP dim-0 shard: interleaved rows
        return f"StridedShard({dim})"
    if p.is_shard() and dim is not None:
        return f"Shard({dim})"
    return "Replicate()" if p.is_replicate() else type(p).__name__


def placements_of(value: Any) -> list[str]:
    """``["<mesh dim>: <placement>", ...]`` of a DTensor; ``[]`` for a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return []
    names = value.device_mesh.mesh_dim_names or [str(i) for i in range(value.device_mesh.ndim)]
    return [f"{name}: {_placement(p)}" for name, p in zip(names, value.placements, strict=True)]


def pipeline_split(model_parts: Sequence[nn.Module], group: Any = None) -> list[dict[str, Any]]:
    """Which layers and modules each rank's model parts hold, grouped by identical splits.

    One ``all_gather_object`` over ``group`` (collective: every rank calls it).
    """
    mine = []
    for part in model_parts:
        layers = getattr(part, "layers", None)
        held = sorted(layers.keys(), key=_layer_order) if isinstance(layers, nn.ModuleDict) else []
        modules = sorted(
            name for name, child in part.named_children() if child is not None and name != "layers"
        )
        mine.append({"layers": held, "modules": modules})
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        every: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
    else:
        every = [mine]
    out: list[dict[str, Any]] = []
    for rank, parts in enumerate(every):
        for entry in out:
            if entry["parts"] == parts:
                entry["ranks"].append(rank)
                break
        else:
            out.append({"ranks": [rank], "parts": parts})
    return out


def _layer_order(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 30, key)


def describe_layout(
    model_sd: Mapping[str, Any], split: list[dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """The manifest's ``"mesh"`` record (module docstring); ``None`` when nothing is split."""
    from torch.distributed.tensor import DTensor

    first = next((v for v in model_sd.values() if isinstance(v, DTensor)), None)
    if first is None and (split is None or len(split) <= 1):
        return None
    out: dict[str, Any] = {}
    if first is not None:
        mesh = first.device_mesh
        out = {
            "shape": list(mesh.shape),
            "dim_names": list(mesh.mesh_dim_names or []),
            "device_type": mesh.device_type,
            "placements": [str(p) for p in first.placements],
        }
        root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
        out["root"] = {"shape": list(root.shape), "dim_names": list(root.mesh_dim_names or [])}
    families: dict[str, list[str]] = {}
    for fqn, value in model_sd.items():
        if not hasattr(value, "shape"):
            continue
        family, placements = family_of(fqn), placements_of(value)
        if families.setdefault(family, placements) != placements:
            families[fqn] = placements  # a member that differs from its family: by name
    out["families"] = families
    if split is not None:
        out["pipeline"] = split
    return out


def layout_lines(mesh: Any) -> list[str]:
    """Human lines for ``ckpt inspect`` from a manifest's ``"mesh"`` (old or new form).

    A record of an unexpected shape (a damaged or foreign manifest) is shown as it is.
    """
    try:
        return _layout_lines(mesh)
    except (TypeError, AttributeError, ValueError):
        return [f"mesh {mesh!r}"]


def _layout_lines(mesh: Any) -> list[str]:
    if not isinstance(mesh, dict):
        return ["layout: one process, no mesh" if mesh is None else f"mesh {mesh!r}"]
    root = mesh.get("root") if isinstance(mesh.get("root"), dict) else mesh
    names, shape = root.get("dim_names") or [], root.get("shape") or []
    dims = " x ".join(f"{n}={s}" for n, s in zip(names, shape, strict=False)) or str(shape)
    lines = [f"mesh {dims} ({mesh.get('device_type', '?')})"]
    families = mesh.get("families")
    if isinstance(families, dict):
        for family, placements in families.items():
            shown = ", ".join(map(str, placements)) if placements else "whole on every rank"
            lines.append(f"  {family}: {shown}")
    elif mesh.get("placements") is not None:
        lines.append(f"  placements {mesh.get('placements')}")
    pipeline = mesh.get("pipeline")
    if isinstance(pipeline, list):
        for entry in pipeline:
            if not isinstance(entry, dict):
                continue
            parts = "; ".join(
                f"layers {','.join(map(str, p.get('layers', []))) or '-'}"
                + (f" + {','.join(map(str, p.get('modules', [])))}" if p.get("modules") else "")
                for p in entry.get("parts", [])
                if isinstance(p, dict)
            )
            lines.append(f"  ranks {entry.get('ranks')}: {parts}")
    return lines
