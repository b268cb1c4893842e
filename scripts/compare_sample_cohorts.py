"""Do two generated sample-data folders give the shipped tasks the same cohorts?

After a generator change, this says whether any model input moved: for each shipped task
and each site it builds the cohort table from both folders (``multimodal_fl.data``) and
compares every column (features, labels, index times, notes, image paths relative to the
folder, ``max_feature_time``). Images are compared by ``MANIFEST.json`` hashes (decoded
pixels), since the table holds their paths only.

Usage::

    python scripts/compare_sample_cohorts.py OLD_FOLDER NEW_FOLDER

Exit status 0 when every table and every image hash agrees, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from multimodal_fl.config import load_task
from multimodal_fl.data.cohort import build_cohort
from multimodal_fl.sample_data import TASKS

IMAGE_SUFFIXES = (".png", ".dcm", ".nii", ".nii.gz")


def comparable_table(root: Path, folder: str, site: str, task: str) -> pd.DataFrame:
    """The cohort table of one site, with image paths relative to ``root`` and notes joined.

    Parameters
    ----------
    root
        A folder written by ``mmfl sample-data``.
    folder, site
        Sample task folder (``covid_oxygen``) and site name.
    task
        Shipped task name (``covid_oxygen_72h``).

    Returns
    -------
    pandas.DataFrame
        The table, ready for ``DataFrame.equals``.
    """
    table = build_cohort(root / folder / site, load_task(task), check_images=False).table
    base = root.resolve()
    table["image_path"] = [None if p is None else Path(p).relative_to(base).as_posix()
                           for p in table["image_path"]]
    table["notes"] = ["\x00".join(n) for n in table["notes"]]
    return table


def image_hashes(root: Path) -> dict[str, str]:
    """Image file -> decoded-content hash, from the folder's ``MANIFEST.json``."""
    files: dict[str, str] = json.loads((root / "MANIFEST.json").read_text())["files"]
    return {k: v for k, v in files.items() if k.lower().endswith(IMAGE_SUFFIXES)}


def main(argv: list[str]) -> int:
    """Compare the folders; print one line per task and site."""
    if len(argv) != 2:
        print("usage: python scripts/compare_sample_cohorts.py OLD_FOLDER NEW_FOLDER")
        return 2
    old, new = Path(argv[0]), Path(argv[1])
    same = True
    for folder, tasks in TASKS.items():
        sites = sorted(p.name for p in (old / folder).iterdir() if p.is_dir())
        for task in tasks:
            for site in sites:
                a = comparable_table(old, folder, site, task)
                b = comparable_table(new, folder, site, task)
                diff = [c for c in a.columns if c not in b.columns or not a[c].equals(b[c])]
                ok = a.columns.equals(b.columns) and not diff
                same &= ok
                print(f"{task} {site}: {len(a)} patients, {int(a['label'].sum())} positive: "
                      + ("identical" if ok else f"DIFFERENT ({', '.join(diff) or 'columns'})"))
    images_same = image_hashes(old) == image_hashes(new)
    print(f"images: {len(image_hashes(old))} files, "
          + ("identical content" if images_same else "DIFFERENT"))
    return 0 if same and images_same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
