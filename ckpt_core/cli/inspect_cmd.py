"""``ckpt inspect PATH``: steps, states, tensors, shapes, dtypes, bytes, manifest.

PATH is a folder of ``step-<N>`` folders (lists them, then shows the newest or
``--step N``), a DCP step folder, or a safetensors folder (an HF export). DCP
metadata is read with the restricted unpickler, so inspecting an untrusted
checkpoint runs no code from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from ckpt_core.cli import storage_args

HELP = "show a checkpoint's steps, states, tensors (shape, dtype, bytes) and manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint folder, a step folder, or an export (or URI)")
    parser.add_argument("--step", type=int, default=None, help="which step of a folder to show")
    parser.add_argument("--limit", type=int, default=50, help="tensors to list (0: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    storage_args.add_argument(parser)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def list_steps(folder: str) -> list[dict[str, Any]]:
    """Committed steps and leftover temporary folders, with their state."""
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage import layout, manifest

    rows = []
    pinned = _pinned(folder)
    for s in layout.committed_steps(folder):
        path = layout.step_dir(folder, s)
        try:
            found = manifest.read(path)
        except CheckpointError:
            rows.append({"step": s, "status": "damaged manifest", "bytes": None})
            continue
        problems = manifest.check_sizes(path, found)
        rows.append(
            {
                "step": s,
                "status": ("ok" if not problems else "no manifest" if found is None else "damaged")
                + (", pinned" if s in pinned else ""),
                "bytes": manifest.total_bytes(found) if found else None,
            }
        )
    for name in layout.listdir(folder):
        if name.startswith(layout.TMP_PREFIX):
            rows.append({"step": name, "status": "uncommitted (ignored)", "bytes": None})
    return rows


def _pinned(folder: str) -> set[int]:
    """Steps pinned in ``pins.json`` (``ckpt pin``); a malformed file is reported, not fatal."""
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage.pins import read_pins

    try:
        return set(read_pins(folder))
    except CheckpointError as exc:
        logging.getLogger(__name__).warning("%s", exc)
        return set()


def describe_dcp(folder: str) -> dict[str, Any]:
    """States and tensors of a DCP step folder, from its ``.metadata``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ckpt_core.storage.safe_metadata import read_metadata

    metadata = read_metadata(folder)
    tensors, states = [], {}
    for key, meta in sorted(metadata.state_dict_metadata.items()):
        state = key.split(".", 1)[0]
        info = states.setdefault(state, {"entries": 0, "bytes": 0})
        info["entries"] += 1
        if isinstance(meta, TensorStorageMetadata):
            numel = 1
            for d in meta.size:
                numel *= d
            nbytes = numel * meta.properties.dtype.itemsize
            info["bytes"] += nbytes
            tensors.append(
                {
                    "key": key,
                    "shape": list(meta.size),
                    "dtype": str(meta.properties.dtype).replace("torch.", ""),
                    "bytes": nbytes,
                    "chunks": len(meta.chunks),
                }
            )
        else:
            tensors.append({"key": key, "shape": None, "dtype": "object", "bytes": None})
    return {"format": "dcp", "states": states, "tensors": tensors}


def _safetensors_files(folder: str) -> list[tuple[str, str]]:
    """``(name relative to folder, path to open)`` of every ``*.safetensors`` under ``folder``
    (a local folder, checked by :func:`resolve_file`, or a URI: the objects listed)."""
    import os

    from ckpt_core.storage import layout
    from ckpt_core.storage.hf_reader import resolve_file

    if layout.is_uri(folder):
        fs, inner = layout.filesystem(folder)
        base = inner.rstrip("/") + "/"
        rels = sorted(p[len(base) :] for p in fs.find(inner) if p.startswith(base))
        return [(r, layout.join(folder, r)) for r in rels if r.endswith(".safetensors")]
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                rel = os.path.relpath(os.path.join(root, name), folder)
                out.append((rel, resolve_file(folder, rel, what=f"{folder} file")))  # no FIFO
    return out


def describe_safetensors(folder: str) -> dict[str, Any]:
    """Tensors of every ``*.safetensors`` file under a folder or URI (headers only)."""
    from ckpt_core.storage.hf_reader import open_safetensors
    from ckpt_core.storage.hf_writer import SAFETENSORS_DTYPES

    itemsize = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}
    tensors = []
    for rel, path in _safetensors_files(folder):
        with open_safetensors(path) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape = list(sl.get_shape())
                dtype = sl.get_dtype()
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * itemsize[dtype] if dtype in itemsize else None
                tensors.append(
                    {"key": f"{rel}:{key}", "shape": shape, "dtype": dtype, "bytes": nbytes}
                )
    return {"format": "safetensors", "states": {}, "tensors": tensors}


def inspect_path(path: str, step: int | None = None) -> dict[str, Any]:
    """Everything ``ckpt inspect`` prints, as a dict."""
    from ckpt_core.errors import CheckpointError
    from ckpt_core.storage import layout, manifest

    if not layout.exists(path):
        raise CheckpointError(f"{path} does not exist.")
    out: dict[str, Any] = {"path": path}
    target = path
    if not layout.exists(layout.join(path, ".metadata")) and not layout.exists(
        layout.join(path, manifest.MANIFEST_NAME)
    ):
        out["steps"] = list_steps(path)
        committed = layout.committed_steps(path)
        if step is None and committed:
            step = committed[-1]
        if step is not None:
            if step not in committed:
                raise CheckpointError(f"{path} has no committed step {step}: {committed}")
            target = layout.step_dir(path, step)
    out["shown"] = target
    out["manifest"] = manifest.read(target)
    if layout.exists(layout.join(target, ".metadata")):
        try:
            out.update(describe_dcp(target))
            if out["manifest"] is None:
                _torchtitan(out, target)
        except CheckpointError as exc:
            if "steps" not in out:
                raise
            out["error"] = str(exc)  # still show the other steps (their status tells)
    elif any(n.endswith(".safetensors") for n in layout.listdir(target)):
        local = not layout.is_uri(target)
        out.update(describe_safetensors(layout.filesystem(target)[1] if local else target))
    elif "steps" not in out or out["steps"]:
        raise CheckpointError(f"{target} holds no DCP .metadata and no safetensors files.")
    return out


def _torchtitan(out: dict[str, Any], target: str) -> None:
    """Show a torchtitan step for what it is: its top-level weights are one ``model`` state."""
    from ckpt_core.storage.safe_metadata import read_metadata
    from ckpt_core.torchtitan.keys import torchtitan_evidence

    evidence = torchtitan_evidence(read_metadata(target).state_dict_metadata)
    if evidence is None:
        return
    out["torchtitan"] = evidence
    states: dict[str, dict[str, int]] = {}
    for name, s in out.get("states", {}).items():
        own = name in ("optimizer", "lr_scheduler", "dataloader", "train_state", "model")
        merged = states.setdefault(name if own else "model", {"entries": 0, "bytes": 0})
        merged["entries"] += s["entries"]
        merged["bytes"] += s["bytes"]
    out["states"] = states


def _print(info: dict[str, Any], limit: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from ckpt_core.policy.parallel_layout import layout_lines

    console = Console()
    if "steps" in info:
        table = Table(title=f"steps in {info['path']}")
        for col in ("step", "status", "size"):
            table.add_column(col)
        for row in info["steps"]:
            size = _human(row["bytes"]) if row["bytes"] is not None else "-"
            table.add_row(str(row["step"]), row["status"], size)
        console.print(table)
    man = info.get("manifest")
    console.print(f"[bold]{info['shown']}[/bold]")
    if man:
        model = man.get("model") or {}
        console.print(
            f"  kind {man.get('kind')}, step {man.get('step')}, world size {man.get('world_size')}"
        )
        for line in layout_lines(man.get("mesh")):  # mesh, placements, pipeline split
            console.print(f"  {line}", markup=False)
        console.print(f"  converters {json.dumps(man.get('converters'))}")
        console.print(f"  model adapter {model.get('adapter')}, versions {man.get('versions')}")
        console.print(
            f"  files {len(man['files'])}, {_human(manifest_bytes(man))} (checksums {_algo(man)})"
        )
    elif info.get("torchtitan"):
        console.print(
            f"  a torchtitan checkpoint (no manifest.json; entry {info['torchtitan']!r}), q/k in "
            "its interleaved layout: read it with ckpt convert SRC DST --from torchtitan "
            '--model ARCH, or \\[checkpoint.initial_load] format = "torchtitan"'
        )
    else:
        console.print("  no manifest.json")
    for state, s in info.get("states", {}).items():
        console.print(f"  state {state}: {s['entries']} entries, {_human(s['bytes'])} of tensors")
    tensors = info.get("tensors", [])
    shown = tensors if limit <= 0 else tensors[:limit]
    if shown:
        table = Table(title=f"tensors ({len(shown)} of {len(tensors)})")
        for col in ("key", "shape", "dtype", "bytes"):
            table.add_column(col)
        for t in shown:
            size = _human(t["bytes"]) if t.get("bytes") is not None else "-"
            shape = "-" if t["shape"] is None else str(t["shape"])
            table.add_row(t["key"], shape, t["dtype"], size)
        console.print(table)


def manifest_bytes(man: dict[str, Any]) -> int:
    return sum(int(e["size"]) for e in man["files"].values())


def _algo(man: dict[str, Any]) -> str:
    algos = {str(e.get("checksum", "")).split(":")[0] for e in man["files"].values()}
    return ", ".join(sorted(algos)) or "none"


def run(args: argparse.Namespace, extra: list[str]) -> int:
    storage_args.apply(args, args.path)
    info = inspect_path(args.path, args.step)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        _print(info, args.limit)
    if "error" in info:
        print(f"ckpt inspect: error: {info['error']}", file=sys.stderr)
        return 1
    return 0
