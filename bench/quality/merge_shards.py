"""Join a sharded safetensors checkpoint (``model.safetensors.index.json``) into one file.

``train.py`` saves shards below 16 MiB (easy to copy off a GPU host); this joins them
into ``model.safetensors`` without touching tensor names, dtypes or values.

Usage::

    .venv/bin/python bench/quality/merge_shards.py SRC_DIR DST_DIR
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def merge(src: Path, dst: Path) -> Path:
    """Write ``dst/model.safetensors`` from the shards in ``src``; copy the json files."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors = {}
    metadata: dict[str, str] = {"format": "pt"}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / shard), "pt") as f:
            metadata.update(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    missing = set(index["weight_map"]) - set(tensors)
    if missing:
        raise ValueError(f"shards lack {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    dst.mkdir(parents=True, exist_ok=True)
    out = dst / "model.safetensors"
    save_file(dict(sorted(tensors.items())), str(out), metadata=metadata)
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(merge(Path(sys.argv[1]), Path(sys.argv[2])))
