"""A hospital's policy: ``mmfl site check``, ``policy.yaml`` errors and the SuperNode's node
config (stricter of each)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from multimodal_fl.cli import app
from multimodal_fl.config import ConfigError, SitePolicy, load_config
from multimodal_fl.federated.disclosure import node_policy, site_policy, stricter_policy

runner = CliRunner()


@pytest.fixture
def site_b(tiny_sample: Path, tmp_path: Path) -> Path:
    """A copy of the tiny COVID-19 site_b (10 training patients, 7 of them with an image)."""
    return Path(shutil.copytree(tiny_sample / "covid_oxygen" / "site_b", tmp_path / "site_b"))


def test_site_check_shows_the_policy_and_where_it_comes_from(site_b: Path) -> None:
    plain = runner.invoke(app, ["site", "check", str(site_b)])
    assert plain.exit_code == 0, plain.output
    assert "min_cell: 5  [default]" in plain.output
    assert "give --config CONFIG" in plain.output
    (site_b / "policy.yaml").write_text("min_cell: 12\nanswers: [info, fit]\n")
    res = runner.invoke(app, ["site", "check", str(site_b)])
    assert f"min_cell: 12  [{site_b / 'policy.yaml'}]" in res.output
    assert "answers: ['info', 'fit']" in res.output and "timezone: None  [default]" in res.output


def test_site_check_shows_what_the_state_dir_has_spent_and_summed(
        site_b: Path, tmp_path: Path) -> None:
    from multimodal_fl.federated.site_state import SiteState
    from multimodal_fl.training.privacy import PrivacyLedger

    (site_b / "policy.yaml").write_text("max_epsilon: 8\n")
    res = runner.invoke(app, ["site", "check", str(site_b)])
    assert "without state_dir, max_epsilon counts each run from 0" in res.output
    (site_b / "policy.yaml").write_text("max_epsilon: 8\nstate_dir: ../kept\n")
    res = runner.invoke(app, ["site", "check", str(site_b)])
    assert res.exit_code == 0, res.output
    assert f"state_dir {tmp_path / 'kept'}: no private fit counted yet; 0 secure sum(s)" \
        in res.output
    ledger = PrivacyLedger("rdp", [(1.0, 0.5, 3)], [{"round": 1, "epsilon": 6.48,
                                                      "delta": 1e-5}])
    ledger.save(tmp_path / "kept" / "privacy.json")
    state = SiteState(tmp_path / "kept", "site_b")
    three = ["site_a", "site_b", "site_c"]
    state.record_sums({"a" * 64: three, "grid:100:site_a,site_b,site_c": three})
    res = runner.invoke(app, ["site", "check", str(site_b)])
    assert ("1 private fit(s) counted, epsilon 6.48 at delta 1e-05 (rdp) of max_epsilon 8; "
            "1 secure sum(s) recorded (one set of sites per content), histograms on 100 bins"
            ) in res.output
    doc = json.loads(runner.invoke(app, ["site", "check", str(site_b), "--json"]).output)
    assert doc["state"]["epsilon"] == 6.48 and doc["state"]["secure_sums"] == 1
    assert doc["state"]["grids"] == [100]
    (tmp_path / "kept" / "privacy.json").write_text("{}")
    bad = runner.invoke(app, ["site", "check", str(site_b)])
    assert bad.exit_code != 0 and "not a privacy ledger" in bad.output


def test_site_check_shows_the_policy_a_supernode_node_config_would_put_in_force(
        site_b: Path, tmp_path: Path) -> None:
    (site_b / "policy.yaml").write_text("min_cell: 8\n")
    kept = tmp_path / "kept"
    res = runner.invoke(app, ["site", "check", str(site_b), "--node-config",
                              f"min-cell=13 state-dir='{kept}'"])
    assert res.exit_code == 0, res.output
    assert "policy.yaml and node config (the stricter)]" in res.output  # 13 over 8
    assert f"state_dir {kept}: no private fit counted yet" in res.output
    doc = json.loads(runner.invoke(app, ["site", "check", str(site_b), "--json",
                                         "--node-config", "min-cell=13"]).output)
    assert doc["policy"]["min_cell"] == 13 and "node config" in doc["origin"]["min_cell"]
    bad = runner.invoke(app, ["site", "check", str(site_b), "--node-config", "min-cel=13"])
    assert bad.exit_code != 0 and "did you mean 'min-cell'?" in bad.output


def test_site_check_meets_the_budget_spent_so_far_and_spends_none_of_it(
        site_b: Path, tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    """With a DP experiment the check asks for a fit: against a state_dir it reads the
    ledger of every run (a budget already spent is refused, as a run would be) and writes
    nothing there (before, a check would have counted its own fit against the budget)."""
    from multimodal_fl.training.privacy import PrivacyLedger

    config = tiny_config("covid_oxygen", modalities={"text": {"enabled": False}},
                         privacy={"dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}})
    spent = PrivacyLedger("rdp", [(1.0, 0.5, 3)], [{"round": 1, "epsilon": 6.48,
                                                     "delta": 1e-5}])
    budget = spent.epsilon(1e-5) + 0.01  # any further step goes over it
    (site_b / "policy.yaml").write_text(f"max_epsilon: {budget}\nstate_dir: ../kept\n")
    args = ["site", "check", str(site_b), "--config", str(config), "--name", "site_b"]

    fresh = runner.invoke(app, args)  # nothing spent yet: one step fits the budget
    assert fresh.exit_code == 0, fresh.output
    assert "fit: releases" in fresh.output
    assert not (tmp_path / "kept").exists() or not any((tmp_path / "kept").iterdir())

    spent.save(tmp_path / "kept" / "privacy.json")
    before = (tmp_path / "kept" / "privacy.json").read_bytes()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "fit: not answered" in res.output and "counted over every run" in res.output
    assert (tmp_path / "kept" / "privacy.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["privacy.json"]


def test_site_check_shows_what_each_kind_would_release(
    site_b: Path, tiny_config: Callable[..., Path]
) -> None:
    config = tiny_config("covid_oxygen")
    res = runner.invoke(app, ["site", "check", str(site_b), "--config", str(config),
                              "--name", "site_b"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "min_cell: 10 (the largest of package floor 5, policy 5, config 10" in out
    assert "train: 10 patients, 2 positive  [suppressed]" in out  # 2 positives < 10
    assert "info: releases n_samples 10" in out
    assert "suppressed: group 'encoders.image.': 7 patients < min_cell 10" in out
    assert "moments: releases" in out and "seen in fewer than 10 patients" in out
    assert "image (train): 7 patients, at most 0 rows (declines)" in out
    assert "evaluate: releases nothing" in out
    assert "validation metrics and histograms: patients: 4 < min_cell 10" in out
    assert "suppressed: overall: fewer than 10 patients" in out  # its report document
    # a policy that answers fewer kinds, and a stricter threshold, show as such
    (site_b / "policy.yaml").write_text("min_cell: 11\nanswers: [info, predict]\n")
    res = runner.invoke(app, ["site", "check", str(site_b), "--config", str(config), "--json"])
    doc = json.loads(res.output)
    assert doc["min_cell"]["effective"] == 11 and doc["site"] == "site_b"
    assert doc["kinds"]["info"]["refused"] == ("site site_b: fewer than 11 training patients "
                                               "(site policy min_cell=11)")
    assert doc["kinds"]["fit"]["refused"] == "site policy does not answer 'fit' requests"
    assert not (site_b / "egress.jsonl").exists() and not list(site_b.rglob("*.npz"))


@pytest.mark.parametrize(("text", "words"), [
    ("min_cell: 2\n", "'min_cell': Input should be greater than or equal to 5 (got 2)"),
    ("answerz: [fit]\n", "unknown key 'answerz'; did you mean 'answers'?"),
    ("answers: [fitt]\n", "unknown request kind(s) ['fitt']"),
    ("min_cell: [\n", "not valid YAML at line 2, column 1"),
])
def test_a_bad_policy_is_one_line(site_b: Path, text: str, words: str) -> None:
    (site_b / "policy.yaml").write_text(text)
    res = runner.invoke(app, ["site", "check", str(site_b)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "policy.yaml" in lines[0], res.output
    assert "Traceback" not in res.output


def test_the_stricter_of_policy_yaml_and_the_node_config_holds(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("min_cell: 8\nanswers: [info, fit, predict]\n")
    node = {"min-cell": 6, "subgroup-summaries": "false", "answers": "fit, evaluate, predict",
            "site-dir": "/data/a"}
    policy, origin = site_policy(tmp_path, node)
    assert policy.min_cell == 8  # the file's, stricter
    assert policy.subgroup_summaries is False  # the node's, stricter
    assert policy.share_local_model is True and policy.answers == ["fit", "predict"]
    assert origin["min_cell"] == f"{tmp_path / 'policy.yaml'} and node config (the stricter)"
    assert origin["subgroup_summaries"] == "node config"
    assert origin["share_local_model"] == "default"
    # looser node settings never loosen the file's
    loose, _ = site_policy(tmp_path, {"min-cell": 5, "share-local-model": True})
    assert loose.min_cell == 8
    pf = tmp_path / "elsewhere.yaml"
    pf.write_text("min_cell: 20\nshare_local_model: false\n")
    assert node_policy({"policy-file": str(pf), "min-cell": 9}) == SitePolicy(
        min_cell=20, share_local_model=False)
    assert stricter_policy(SitePolicy(answers=None), SitePolicy(answers=["fit"])).answers == [
        "fit"]


def test_secure_aggregation_required_on_either_side_holds(tmp_path: Path) -> None:
    """Requiring secure aggregation is the stricter value: either the data steward's file or
    the SuperNode's operator can require it, neither can drop the other's requirement."""
    (tmp_path / "policy.yaml").write_text("secure_aggregation: true\n")
    policy, origin = site_policy(tmp_path, {"secure-aggregation": "false"})
    assert policy.secure_aggregation is True
    assert origin["secure_aggregation"].endswith("(the stricter)")
    (tmp_path / "policy.yaml").write_text("min_cell: 8\n")
    policy, origin = site_policy(tmp_path, {"secure-aggregation": "true"})
    assert policy.secure_aggregation is True and origin["secure_aggregation"] == "node config"
    assert site_policy(tmp_path)[0].secure_aggregation is False
    with pytest.raises(ConfigError, match="node config secure-aggregation='always': expected"):
        node_policy({"secure-aggregation": "always"})


@pytest.mark.parametrize(("node", "words"), [
    ({"min-cell": 3}, "node config min-cell=3: Input should be greater than or equal to 5"),
    ({"subgroup-summaries": "maybe"}, "node config subgroup-summaries='maybe': expected true"),
    ({"answers": "fit,guess"}, "node config answers='fit,guess'"),
    ({"policy-file": "/nowhere/policy.yaml"}, "node config policy-file='/nowhere/policy.yaml'"),
])
def test_a_bad_node_policy_is_one_line(node: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        node_policy(node)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_supernode_site_takes_its_node_config_policy(
    tiny_sample: Path, tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    from multimodal_fl.engines.flower_jobs import experiment_run_config, experiment_site
    from multimodal_fl.federated.disclosure import SiteRefused
    from multimodal_fl.federated.protocol import Kind, Request

    cfg = load_config(tiny_config("covid_oxygen"))
    run_config = experiment_run_config(cfg, run_dir=tmp_path / "server",
                                       site_out=tmp_path / "site")
    # what the ClientApp hands the site factory: the node config under "node."
    run_config.update({"node.site-dir": "x", "node.min-cell": 13, "node.answers": "info,fit",
                       "node.state-dir": str(tmp_path / "kept")})
    site = experiment_site("site_b", tiny_sample / "covid_oxygen" / "site_b", run_config)
    assert site.gate.policy.min_cell == 13  # type: ignore[attr-defined]
    # the state across runs: the budget's ledger and the secure-sum record live there
    assert site.state.root == tmp_path / "kept"  # type: ignore[attr-defined]
    assert site.secure.state is site.state  # type: ignore[attr-defined]
    with pytest.raises(SiteRefused, match="fewer than 13 training patients"):
        site.handle(Request(Kind.INFO, 0))
    with pytest.raises(SiteRefused, match="does not answer 'moments'"):
        site.handle(Request(Kind.MOMENTS, 0))
    # a zone in the SuperNode's policy-file holds for the site's dates (policy.yaml's would too)
    (tmp_path / "node_policy.yaml").write_text("timezone: Australia/Brisbane\n")
    run_config.update({"node.policy-file": str(tmp_path / "node_policy.yaml")})
    site = experiment_site("site_b", tiny_sample / "covid_oxygen" / "site_b", run_config)
    assert site.cfg.data.timezone == "Australia/Brisbane"  # type: ignore[attr-defined]


def test_site_check_refuses_what_is_no_site_and_node_config_flower_would_drop(
        site_b: Path, tmp_path: Path) -> None:
    """Found by a CLI bug hunt: an empty folder showed the default policy; 'min-cell 20'
    (no '=') was dropped by Flower's parser and the site ran under min_cell 5; an unquoted
    text value got Flower's boxed message, naming no option."""
    (tmp_path / "nothing").mkdir()
    empty = runner.invoke(app, ["site", "check", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "site directory is empty" in empty.output
    # a folder of sites is not "empty": it holds sites, one of which is wanted
    sites = runner.invoke(app, ["site", "check", str(tmp_path)])
    assert sites.exit_code == 2 and "holds 1 site folder(s) (site_b), not one site's data" in \
        " ".join(sites.output.split())
    res = runner.invoke(app, ["site", "check", str(site_b), "--node-config", "min-cell 20"])
    assert res.exit_code == 2 and "'min-cell' is not key=value" in res.output
    res = runner.invoke(app, ["site", "check", str(site_b), "--node-config",
                              "policy-file=pol.yaml"])
    assert res.exit_code == 2
    assert "policy-file=pol.yaml: a text value needs quotes, policy-file='pol.yaml'" in \
        " ".join(res.output.split())
    # a quoted value may hold spaces: one entry, read as Flower reads it
    spaced = tmp_path / "my policies" / "node.yaml"
    spaced.parent.mkdir()
    spaced.write_text("min_cell: 17\n")
    res = runner.invoke(app, ["site", "check", str(site_b), "--node-config",
                              f"policy-file='{spaced}' subgroup-summaries=false"])
    assert res.exit_code == 0, res.output
    assert "min_cell: 17" in res.output and "subgroup_summaries: False" in res.output


def test_site_check_follows_the_gate_for_pca_and_lists_the_secure_sums(
    site_b: Path, tiny_config: Callable[..., Path]
) -> None:
    """Found by a bug hunt: pca showed as answered under a policy whose ``answers`` left it
    out, and the secure sums a run asks for were never listed (calibrate "releases nothing"
    while its histogram leaves, masked, through secure_sum)."""
    config = str(tiny_config("covid_oxygen"))
    args = ["site", "check", str(site_b), "--config", config, "--name", "site_b"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "calibrate: releases nothing in its reply; holds validation_histograms" in out
    assert "secure_sum: per vector held, its first step:" in out
    assert "validation_histograms: " in out.split("secure_sum:")[1]
    (site_b / "policy.yaml").write_text("answers: [info, init, moments, fit, evaluate, "
                                        "calibrate, predict]\n")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "pca: not answered: site policy does not answer 'pca' requests" in res.output
    assert "validation_histograms: not answered: site policy does not answer 'secure_sum' " \
           "requests" in res.output
    doc = json.loads(runner.invoke(app, [*args, "--json"]).output)
    assert all(row["rank_cap"] == 0 and row["refused"] for row in doc["kinds"]["pca"].values())
