"""A site that cannot be built (a bug hunt: the SuperNode served an empty folder): the
SuperNode refuses such a folder at start, and a failure no gate saw is in the site's egress
log all the same (it had no line)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import load_config
from multimodal_fl.federated.protocol import Kind, Request


def test_a_supernode_refuses_an_empty_site_folder_at_start(tmp_path: Path) -> None:
    (tmp_path / "site_a").mkdir()
    result = CliRunner().invoke(app, ["flower", "supernode", str(tmp_path / "site_a"),
                                      "--insecure"])
    assert result.exit_code == 2
    assert "site directory is empty" in result.output


def test_a_site_that_cannot_be_built_has_its_egress_line(
        tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    from multimodal_fl.engines.flower_jobs import experiment_run_config, experiment_site

    cfg = load_config(tiny_config())
    run_config = {**experiment_run_config(cfg, run_dir=tmp_path / "run",
                                          site_out=tmp_path / "out"),
                  "flower-run-id": 7}
    experiment_site.record_failure(  # type: ignore[attr-defined]
        "site_x", tmp_path / "empty", run_config, Request(Kind.FIT, 2),
        "DataError while building the site")
    lines = (tmp_path / "out" / "sites" / "site_x" / "egress.jsonl").read_text().splitlines()
    entry = json.loads(lines[-1])
    assert {k: entry[k] for k in ("site", "kind", "round", "released", "failed")} == {
        "site": "site_x", "kind": "fit", "round": 2, "released": False,
        "failed": "DataError while building the site"}
    assert entry["run"] == {"dir": str(tmp_path / "run"), "flower_run_id": 7}
