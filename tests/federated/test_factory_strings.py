"""Every ``multimodal_fl...:name`` reference the docs print resolves, and so do the old names.

Run configs name their server job and site as ``"module:callable"`` strings that the ServerApp,
the ClientApp and the site worker import with :func:`~multimodal_fl.federated.flower.load_object`
(``mmfl flower run/local --server-factory/--site-factory`` pass them through unchanged). A
string printed in ``docs/*.md`` or ``README.md`` that no longer resolves is a broken command for
whoever copies it; a factory that moved keeps its old name in ``LEGACY_FACTORIES``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from multimodal_fl.federated.flower import LEGACY_FACTORIES, load_object

REPO = Path(__file__).resolve().parents[2]

#: ``multimodal_fl.a.b:name`` (or ``:name.attr``), as it appears in prose, code spans or commands.
REFERENCE = re.compile(r"\bmultimodal_fl(?:\.\w+)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def documented_references() -> list[str]:
    """Every ``multimodal_fl...:name`` string in ``docs/*.md`` and ``README.md``, sorted."""
    pages = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
    found = {m.group(0) for page in pages if page.is_file()
             for m in REFERENCE.finditer(page.read_text())}
    return sorted(found)


def test_the_docs_print_factory_references() -> None:
    refs = documented_references()
    assert "multimodal_fl.federated.flower:server_app" in refs  # the scan finds what is there
    assert "multimodal_fl.federated.flower:client_app" in refs


@pytest.mark.parametrize("ref", documented_references())
def test_every_documented_reference_resolves(ref: str) -> None:
    assert load_object(ref, "docs") is not None


@pytest.mark.parametrize("old", sorted(LEGACY_FACTORIES))
def test_old_factory_names_resolve_to_the_same_objects(old: str) -> None:
    new = LEGACY_FACTORIES[old]
    assert new != old and not new.startswith("multimodal_fl.federated.flower_app:")
    assert load_object(old, "server-factory") is load_object(new, "server-factory")


def test_the_old_flower_app_factories_are_all_aliased() -> None:
    old = "multimodal_fl.federated.flower_app"
    names = ("experiment_job", "experiment_site", "pca_analysis_job", "pca_analysis_site")
    assert {f"{old}:{name}" for name in names} <= set(LEGACY_FACTORIES)


def test_the_factory_constants_name_what_they_are() -> None:
    from multimodal_fl.engines import flower_jobs

    assert load_object(flower_jobs.SERVER_FACTORY, "server-factory") is flower_jobs.experiment_job
    assert load_object(flower_jobs.SITE_FACTORY, "site-factory") is flower_jobs.experiment_site
    assert load_object(flower_jobs.PCA_SERVER_FACTORY, "server-factory") is (
        flower_jobs.pca_analysis_job
    )
    assert load_object(flower_jobs.PCA_SITE_FACTORY, "site-factory") is (
        flower_jobs.pca_analysis_site
    )


def test_a_bad_reference_says_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"expected 'package\.module:callable'"):
        load_object("multimodal_fl.engines.flower_jobs", "site-factory")
    with pytest.raises(ValueError, match="has no attribute"):
        load_object("multimodal_fl.engines.flower_jobs:nothing_here", "site-factory")


def test_the_cli_refuses_a_malformed_factory_or_no_superlink_before_flower_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both reached Flower before: a ServerApp traceback, or Flower's own local simulation
    (a SuperLink started and left running, ~/.flwr written)."""
    from typer.testing import CliRunner

    from multimodal_fl.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["flower", "app", str(tmp_path / "app"), "--server-factory", "foo",
                              "--site-factory", "bar"])
    assert res.exit_code == 2 and "--server-factory 'foo': expected" in res.output
    assert not (tmp_path / "app").exists()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    ok = ["--server-factory", "multimodal_fl.engines.flower_jobs:experiment_job",
          "--site-factory", "multimodal_fl.engines.flower_jobs:experiment_site"]
    res = runner.invoke(app, ["flower", "run", *ok, "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "no --connection and no default SuperLink" in res.output
    assert "[superlink.NAME] table" in res.output  # printed as written, not read as markup
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n[superlink.local]\noptions.num-supernodes = 2\n')
    res = runner.invoke(app, ["flower", "run", *ok, "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "has no [superlink.local] table with an address" in res.output
    assert not (tmp_path / "run").exists()


def test_flower_app_refuses_the_experiment_factories_without_an_experiment(
        tmp_path: Path) -> None:
    """The app was written, and `flwr run` then ended in a ServerApp traceback: "run config has
    no 'experiment'" (a hospital's walk-through)."""
    from typer.testing import CliRunner

    from multimodal_fl.cli import app

    res = CliRunner().invoke(app, [
        "flower", "app", str(tmp_path / "app"),
        "--server-factory", "multimodal_fl.engines.flower_jobs:experiment_job",
        "--site-factory", "multimodal_fl.engines.flower_jobs:experiment_site", "-c", "rounds=2"])
    assert res.exit_code == 2 and "needs the experiment in its run config" in res.output
    assert "mmfl flower run CONFIG" in res.output and not (tmp_path / "app").exists()
    res = CliRunner().invoke(app, [  # the old names lead to the same factories
        "flower", "app", str(tmp_path / "app"),
        "--server-factory", "multimodal_fl.federated.flower_app:experiment_job",
        "--site-factory", "tests.federated.test_flower:toy_site"])
    assert res.exit_code == 2 and "needs the experiment" in res.output
    ok = CliRunner().invoke(app, [
        "flower", "app", str(tmp_path / "toy"), "--server-factory",
        "tests.federated.test_flower:toy_job", "--site-factory",
        "tests.federated.test_flower:toy_site", "-c", "rounds=2"])
    assert ok.exit_code == 0 and (tmp_path / "toy" / "pyproject.toml").is_file()
