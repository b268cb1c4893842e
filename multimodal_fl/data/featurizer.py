"""``FHIRFeaturizer``: FHIR data -> a task's feature table, as a scikit-learn transformer.

::

    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from multimodal_fl.data.featurizer import FHIRFeaturizer

    sites = ["hospital_a/", "hospital_b/"]             # site directories, bundle files or dicts
    y = FHIRFeaturizer(task="covid_oxygen_24h").cohort_labels(sites)   # aligned with the rows
    model = make_pipeline(FHIRFeaturizer(task="covid_oxygen_24h"),
                          HistGradientBoostingClassifier()).fit(sites, y)

Rows are the task's cohort patients (one per patient, sites in input order, patients sorted
by id), so ``y`` must come from :meth:`FHIRFeaturizer.cohort_labels` (or
:meth:`FHIRFeaturizer.cohort`) on the same input. A pre-built cohort table (a DataFrame
with the feature columns, e.g. ``SiteCohort.table``) is also accepted as ``X``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from multimodal_fl.config import DataConfig, TaskSpec, check_timezone, load_task
from multimodal_fl.data.cohort import build_cohort, build_cohort_from_resources
from multimodal_fl.data.tasks import feature_names

__all__ = ["FHIRFeaturizer"]

Source = str | Path | dict[str, Any]


class FHIRFeaturizer(TransformerMixin, BaseEstimator):
    """Turn FHIR site data into a task's feature table (one row per cohort patient).

    Parameters
    ----------
    task
        A shipped task name, a task YAML path, an inline mapping, or a TaskSpec.
    on_error
        ``"skip"`` bad records (counted in ``last_cohorts_``) or ``"fail"``.
    validation
        ``"task"`` (validate only the resources the task uses) or ``"all"``.
    allowance_hours
        Override the task's presentation allowance (None keeps the task's).
    timezone
        The sites' time zone (IANA name), as ``data.timezone`` of an experiment: dates
        without a time are read in it.
    keep_empty_features
        Keep feature columns that have no value at all in the data seen by ``fit`` (as in
        ``SimpleImputer``); by default they are dropped (``empty_features_``), because
        some estimators (``HistGradientBoostingClassifier`` in scikit-learn 1.9) fail on
        an all-NaN column.

    Attributes
    ----------
    task_ : TaskSpec
        The resolved task.
    feature_names_out_ : ndarray of str
        The output columns.
    empty_features_ : list of str
        Task features dropped because they had no value in the fit data.
    """

    def __init__(
        self,
        task: str | dict[str, Any] | TaskSpec = "covid_oxygen_24h",
        *,
        on_error: Literal["skip", "fail"] = "skip",
        validation: Literal["task", "all"] = "task",
        allowance_hours: float | None = None,
        timezone: str = "UTC",
        keep_empty_features: bool = False,
    ) -> None:
        self.task = task
        self.on_error = on_error
        self.validation = validation
        self.allowance_hours = allowance_hours
        self.timezone = timezone
        self.keep_empty_features = keep_empty_features

    # ------------------------------------------------------------------ sklearn API

    def fit(self, X: Any, y: Any = None) -> FHIRFeaturizer:
        """Resolve the task and the output columns (no data is learnt).

        Parameters
        ----------
        X
            Site directories, FHIR JSON/NDJSON files, Bundle/resource dicts, or a cohort
            table; checked to be one of those.
        y
            Ignored.

        Returns
        -------
        FHIRFeaturizer
            self.
        """
        self._fit_table(X)
        return self

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> pd.DataFrame:
        """``fit(X).transform(X)``, reading ``X`` once."""
        table = self._fit_table(X)
        return self._select(table)

    def _fit_table(self, X: Any) -> pd.DataFrame:
        self._check_input(X)
        self.task_ = self._resolve_task()
        table = self.cohort(X)
        names = feature_names(self.task_)
        self.empty_features_ = [] if self.keep_empty_features else [
            n for n in names if not table[n].notna().any()]
        self.feature_names_out_ = np.asarray(
            [n for n in names if n not in self.empty_features_], dtype=object)
        return table

    def _select(self, table: pd.DataFrame) -> pd.DataFrame:
        out = table[list(self.feature_names_out_)].astype(float)
        out.index = pd.Index(table["row_id"], name="patient_id")
        return out

    def transform(self, X: Any) -> pd.DataFrame:
        """The feature table of ``X``'s cohort patients.

        Returns
        -------
        DataFrame
            Columns ``feature_names_out_`` (float, NaN when missing); index ``patient_id``
            (``"<site>/<patient_id>"`` when several sources are given).
        """
        check_is_fitted(self, "task_")
        return self._select(self.cohort(X))

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """The output column names."""
        check_is_fitted(self, "task_")
        return np.asarray(self.feature_names_out_, dtype=object)

    # ------------------------------------------------------------------ helpers

    def cohort(self, X: Any) -> pd.DataFrame:
        """The full cohort table of ``X`` (labels, sites, modalities), rows as in transform.

        Adds ``row_id``: ``<site>/<patient_id>``.
        """
        task = getattr(self, "task_", None) or self._resolve_task()
        if isinstance(X, pd.DataFrame):
            missing = [c for c in feature_names(task) if c not in X.columns]
            if missing:
                raise ValueError(
                    f"FHIRFeaturizer got a DataFrame without the task's feature columns "
                    f"{missing[:5]}{'...' if len(missing) > 5 else ''}; pass site "
                    "directories, FHIR files or Bundle dicts, or a SiteCohort.table")
            table = X.copy()
            if "row_id" not in table.columns:
                table["row_id"] = (table["site"].astype(str) + "/" + table["patient_id"]
                                   .astype(str)) if {"site", "patient_id"} <= set(table.columns) \
                    else [str(i) for i in table.index]
            return table
        try:
            check_timezone(self.timezone)
        except ValueError as exc:
            raise ValueError(f"FHIRFeaturizer timezone: {exc}") from None
        data = DataConfig(on_error=self.on_error, validation=self.validation,
                          timezone=self.timezone)
        sources = self._check_input(X)
        tables = []
        loose: list[tuple[dict[str, Any] | Path, str]] = []
        cohorts = []
        for src in sources:
            if isinstance(src, dict):
                loose.append((src, f"<dict {len(loose)}>"))
                continue
            path = Path(src)
            if path.is_dir():
                cohorts.append(build_cohort(path, task, data=data, site_name=path.name))
            else:
                loose.append((path, path.name))
        if loose:
            cohorts.append(build_cohort_from_resources(loose, task, data=data))
        for c in cohorts:
            tables.append(c.table)
        self.last_cohorts_ = cohorts
        table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
            columns=["site", "patient_id", "label", *feature_names(task)])
        table["row_id"] = table["site"].astype(str) + "/" + table["patient_id"].astype(str)
        return table

    def cohort_labels(self, X: Any) -> np.ndarray:
        """Labels (0/1) aligned with the rows of ``transform(X)``.

        Parameters
        ----------
        X
            The same input as given to ``transform``: site directories, FHIR files, Bundle
            dicts, or a cohort table with a ``label`` column (``cohort(sites)``,
            ``SiteCohort.table``) -- not the feature table ``transform`` returns.

        Returns
        -------
        ndarray of int
            One label per row of ``transform(X)``.
        """
        if isinstance(X, pd.DataFrame) and "label" not in X.columns:
            raise ValueError(
                "FHIRFeaturizer.cohort_labels got a table without a 'label' column (the "
                "feature table transform returns has none); pass what transform was given: "
                "site directories, FHIR files or Bundle dicts, or a cohort table from "
                "cohort(sites) or SiteCohort.table")
        return self.cohort(X)["label"].to_numpy(dtype=int)

    def _resolve_task(self) -> TaskSpec:
        task = load_task(self.task)
        if self.allowance_hours is not None:
            task = task.model_copy(update={"index": task.index.model_copy(
                update={"allowance_hours": float(self.allowance_hours)})})
        return task

    @staticmethod
    def _check_input(X: Any) -> list[Source]:
        if isinstance(X, pd.DataFrame):
            return []
        items: Sequence[Any] = [X] if isinstance(X, str | Path | dict) else X
        if isinstance(items, np.ndarray) or not isinstance(items, Sequence):
            raise ValueError(
                f"FHIRFeaturizer expects a list of site directories, FHIR .json/.ndjson "
                f"files or Bundle/resource dicts (or a cohort table), got "
                f"{type(X).__name__}")
        for item in items:
            if isinstance(item, dict):
                continue
            if not isinstance(item, str | Path):
                raise ValueError(f"FHIRFeaturizer input item {item!r} is not a path or a "
                                 "FHIR dict")
            if not Path(item).exists():
                raise ValueError(f"FHIRFeaturizer input '{item}' does not exist")
        return list(items)

