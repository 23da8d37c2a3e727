#!/usr/bin/env python3
"""Write pip-style ``.dist-info`` metadata (name, version, entry points) for source trees into a site directory.

    python3 bench/dispatch/entry_point_fallback.py /tmp/site . moe_plugins/sentinel moe_plugins/flashinfer_onesided

Used by ``scripts/gpu_dispatch.sh`` only when ``pip install -e`` fails on a GPU host (no index, old
setuptools): the code is then imported from ``PYTHONPATH``, and this metadata lets hostcore's registry find
the plugins through their ``hostcore.plugins`` entry points exactly as after a pip install.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib


def write(site: Path, root: Path) -> Path | None:
    pyproject = root / "pyproject.toml"
    if not pyproject.exists():
        return None
    project = tomllib.loads(pyproject.read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n" for group, items in groups.items()))
    return info


def main() -> int:
    site = Path(sys.argv[1])
    for root in sys.argv[2:]:
        info = write(site, Path(root))
        print(f"wrote {info}" if info else f"skipped {root}: no pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
