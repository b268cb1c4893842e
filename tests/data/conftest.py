"""Session fixtures: the shared Synthea bundles extracted into a temporary site."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SYNTHEA = SHARED / "synthea"


def _extract(tgz: Path, member_dir: str, dest: Path) -> Path:
    """Extract ``member_dir/`` of ``tgz`` into ``dest/fhir`` (a site directory)."""
    with tarfile.open(tgz) as tar:
        tar.extractall(dest / "_x", filter="data")
    (dest / "fhir").parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(dest / "_x" / member_dir), str(dest / "fhir"))
    shutil.rmtree(dest / "_x")
    return dest


@pytest.fixture(scope="session")
def synthea_covid_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared Synthea COVID-19 bundles as one site (``<tmp>/site/fhir/*.json``)."""
    tgz = SYNTHEA / "synthea_covid_dev.tgz"
    if not tgz.is_file():
        pytest.skip(f"shared data not found: {tgz}")
    return _extract(tgz, "hw_dev", tmp_path_factory.mktemp("covid") / "site")


@pytest.fixture(scope="session")
def synthea_alzheimers_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared Synthea Alzheimer's bundles as one site."""
    tgz = SYNTHEA / "synthea_r4_alzheimers.tgz"
    if not tgz.is_file():
        pytest.skip(f"shared data not found: {tgz}")
    return _extract(tgz, "synthea_ad", tmp_path_factory.mktemp("alz") / "site")
