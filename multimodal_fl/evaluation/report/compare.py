"""Which runs one report may compare, and what each is called in it.

A report compares models on the same patients under the same rules. Before any prediction
is read, :func:`comparable_labels` refuses, in one line naming the differing keys:

- a run that did not complete (``run.json`` says ``running``, ``stopped`` or ``failed``);
- the same run given twice (the same folder, or a copy of it: the same ``run_id``);
- runs whose :data:`MUST_AGREE` keys differ: the task, the data (each site's fingerprint in
  ``run.json``; the sites and the cohort rules in ``config.yaml``), the seed and the split
  fractions (together they decide every patient's split), and the evaluation settings.

A key that one run does not record (a hand-made run directory, an older run without
``run.json``) is not compared. Runs that differ in other keys are compared, and labelled by
their engine and, where two runs share an engine, by the keys that tell them apart:
``inprocess (algorithm=fedavg)`` and ``inprocess (algorithm=fedprox)``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Any

from multimodal_fl.evaluation.report.load import RunData, RunIdentity, load_run, read_identity

__all__ = ["LABEL_IGNORES", "MUST_AGREE", "IncomparableRuns", "comparable_labels", "load_runs"]

#: Keys every compared run must share (``fnmatch`` patterns over flattened keys):
#: ``fingerprint.<site>`` is the site's data fingerprint from ``run.json``, ``sites`` the sorted
#: site names; ``data.on_error`` and ``data.validation`` decide which records enter a cohort.
MUST_AGREE: tuple[str, ...] = (
    "task.*", "fingerprint.*", "sites", "data.on_error", "data.validation", "seed",
    "training.split.*", "evaluation.*",
)

#: Keys that never tell runs apart in a label: names, places, the engine (the label's first
#: word), logging and where the computation ran.
LABEL_IGNORES: tuple[str, ...] = (
    "name", "sites.*", "data.cache_dir", "federated.engine", "federated.tracker",
    "training.device", "training.num_threads",
)


class IncomparableRuns(ValueError):
    """Runs one report cannot compare (the message names the runs and the differing keys)."""


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _facts(run: RunIdentity) -> dict[str, Any]:
    """The keys :data:`MUST_AGREE` covers that this run records."""
    facts = {k: v for k, v in run.settings.items()
             if _matches(k, MUST_AGREE) and not k.startswith("sites.")}
    names = sorted(str(v) for k, v in run.settings.items()
                   if fnmatch.fnmatchcase(k, "sites.*.name"))
    if names:
        facts["sites"] = names
    if run.manifest is not None:
        for site, doc in run.manifest.data.items():
            facts[f"fingerprint.{site}"] = doc.get("fingerprint")
        facts["sites"] = sorted(run.manifest.data)
    return facts


def _short(value: Any, width: int = 40) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _refuse_unfinished(runs: Sequence[RunIdentity]) -> None:
    for run in runs:
        m = run.manifest
        if m is not None and m.status != "completed":
            raise IncomparableRuns(
                f"{run.path}: the run is {m.status}, it has no final predictions; finish it "
                "(mmfl train --resume RUN_DIR) or leave it out")


def _refuse_repeats(runs: Sequence[RunIdentity]) -> None:
    seen: dict[str, RunIdentity] = {}
    for run in runs:
        first = seen.setdefault(run.run_id, run)
        if first is not run:
            raise IncomparableRuns(
                f"{first.path} and {run.path} are the same run (run id "
                f"{_short(run.run_id, 16)}); give each run once")


def _refuse_differences(runs: Sequence[RunIdentity]) -> None:
    """Compare every run with the first on the keys both record."""
    base = _facts(runs[0])
    for run in runs[1:]:
        facts = _facts(run)
        keys = sorted(k for k in set(base) & set(facts) if base[k] != facts[k])
        if not keys:
            continue
        shown = [f"{k} ({_short(base[k])} vs {_short(facts[k])})" for k in keys[:4]]
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        raise IncomparableRuns(
            f"{runs[0].path} and {run.path} cannot be compared, they differ in "
            f"{'; '.join(shown)}{more}; a report compares runs of one task on the same data, "
            "seed, splits and evaluation settings")


def _distinguishing(runs: Sequence[RunIdentity]) -> list[str]:
    """Keys whose values differ among ``runs`` (other than the ignored ones)."""
    keys = set().union(*(r.settings for r in runs))
    return sorted(k for k in keys
                  if not _matches(k, LABEL_IGNORES) and not _matches(k, MUST_AGREE)
                  and len({repr(r.settings.get(k)) for r in runs}) > 1)


def _group_labels(runs: Sequence[RunIdentity]) -> list[str]:
    """Labels for runs of one engine: the engine and the keys that tell them apart."""
    engine = runs[0].engine
    if len(runs) == 1:
        return [engine]
    keys = _distinguishing(runs)
    if not keys:
        return [f"{engine} ({r.path.name})" for r in runs]
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    names = tails if len(set(tails)) == len(tails) else keys
    return [engine + " (" + ", ".join(f"{n}={r.settings.get(k)}" for n, k in zip(names, keys,
                                                                              strict=True)) + ")"
            for r in runs]


def comparable_labels(runs: Sequence[RunIdentity]) -> list[str]:
    """Check that the runs may share one report; return each run's label.

    Parameters
    ----------
    runs : sequence of RunIdentity
        In the order given.

    Returns
    -------
    list of str
        Unique labels, in the same order.

    Raises
    ------
    IncomparableRuns
        For the same run twice, or runs whose :data:`MUST_AGREE` keys differ.
    """
    if not runs:
        raise IncomparableRuns("give at least one run directory")
    _refuse_unfinished(runs)
    _refuse_repeats(runs)
    _refuse_differences(runs)
    labels: dict[int, str] = {}
    for engine in dict.fromkeys(r.engine for r in runs):
        members = [i for i, r in enumerate(runs) if r.engine == engine]
        for i, label in zip(members, _group_labels([runs[i] for i in members]), strict=True):
            labels[i] = label
    named = [labels[i] for i in range(len(runs))]
    # still equal (folders of one name in different places): number them
    return [f"{label} #{named[:i + 1].count(label)}" if named.count(label) > 1 else label
            for i, label in enumerate(named)]


def load_runs(run_dirs: Sequence[str | os.PathLike[str]]) -> list[RunData]:
    """Read run directories that may share a report, each labelled (see the module docstring).

    Parameters
    ----------
    run_dirs : sequence of path-like

    Returns
    -------
    list of RunData

    Raises
    ------
    IncomparableRuns
        Before any prediction is read.
    """
    identities = [read_identity(p) for p in run_dirs]
    labels = comparable_labels(identities)
    return [load_run(r.path, label=label) for r, label in zip(identities, labels, strict=True)]
