"""The ``mmfl`` command line (typer).

Verbs: ``config show|schema``, ``sample-data``, ``data summary|import-csv``, ``train``, ``pca``,
``report``, ``predict``, ``site check``, ``flower``. Each verb lives in a small function here
that calls the library; bad input ends with a one-line message and exit code 2, never a
traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console

from multimodal_fl.config import ConfigError, config_schema, load_config


def _keep_argument_help() -> None:
    """Make ``typer.Argument(help=...)`` show in ``--help`` again.

    typer 0.20's ``TyperArgument`` sets ``self.help`` and then calls ``click.Argument.__init__``
    without it; click 8.2+ accepts ``help`` for arguments and sets it to ``None``, so every
    argument's help string was dropped. The help is set again after click's own ``__init__``.
    """
    from typer.core import TyperArgument

    init = TyperArgument.__init__
    if getattr(init, "keeps_help", False):
        return

    def __init__(self: TyperArgument, *args: Any, help: str | None = None,
                 **kwargs: Any) -> None:
        init(self, *args, help=help, **kwargs)
        if self.help is None:
            self.help = help

    __init__.keeps_help = True  # type: ignore[attr-defined]
    TyperArgument.__init__ = __init__  # type: ignore[method-assign]


_keep_argument_help()

app = typer.Typer(
    rich_markup_mode="markdown",  # a docstring paragraph is reflowed, not cut where its source is
    name="mmfl",
    help="Federated multimodal learning for hospital consortia.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check experiment configurations.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect and import site data.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: a.b=c (repeatable).")
]


def _print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, the message as written (never read as rich markup)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error message to stderr and exit with ``code``."""
    _print_error(message)
    raise typer.Exit(code)


def _why(exc: BaseException) -> str:
    """An exception as an error line: the package's own errors and plain ``ValueError`` /
    ``RuntimeError`` by their words (they are written for the user), any other by its class
    too (``KeyError: 'x'`` says little without it)."""
    kind = type(exc)
    if kind.__module__.startswith("multimodal_fl") or kind in (ValueError, RuntimeError):
        return str(exc) or kind.__name__
    return f"{kind.__name__}: {exc}"


def _load(config: Path, overrides: list[str] | None, *, saved: bool = False) -> object:
    try:
        return load_config(config, overrides or [], saved=saved)
    except ConfigError as exc:
        fail(str(exc))


@config_app.command("show")
def config_show(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved configuration (task resolved, site paths absolute)."""
    cfg = _load(config, set_)
    for line in cfg.advisories():  # type: ignore[attr-defined]
        sys.stderr.write(f"warning: {line}\n")
    data = cfg.resolved_dict()  # type: ignore[attr-defined]
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON schema of an experiment configuration."""
    sys.stdout.write(json.dumps(config_schema(), indent=2) + "\n")


@data_app.command("summary")
def data_summary(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
) -> None:
    """Per site: patients, positives, prevalence, modality coverage, labels by source, missingness,
    skips, notes.

    Warns of task features no patient of a site has a value for, and of a labels.csv the task
    does not read. Exits with code 2 when a site has no patients, naming its top skip and
    exclusion reasons.
    """
    from rich.progress import Progress

    from multimodal_fl.data import DataError, build_cohorts

    cfg: Any = _load(config, set_)
    try:
        with Progress(console=err_console, transient=True, disable=as_json) as progress:
            bars: dict[str, Any] = {}

            def tick(site: str, done: int, total: int) -> None:
                if site not in bars:
                    bars[site] = progress.add_task(f"reading {site}", total=total)
                progress.update(bars[site], completed=done)

            cohorts = build_cohorts(cfg, progress=tick)
    except DataError as exc:
        fail(str(exc))
    summaries = [c.summary() for c in cohorts.values()]
    if as_json:
        out = {"task": cfg.task.name, "sites": summaries}
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        _print_summary_tables(cfg.task.name, summaries)
    for s in summaries:
        if s["counts"].get("features_without_value"):
            names = ", ".join(f"'{n}'" for n in s["counts"]["features_without_value"])
            err_console.print(
                f"[bold yellow]warning:[/] {config} (task '{cfg.task.name}'): site "
                f"'{s['site']}': no patient has a value of feature(s) {names}: their codes "
                "match no usable record known by the cut-off there (a wrong code or unit, "
                "values that are not numbers in a valueQuantity, or data the site does not "
                "record; the skipped records, e.g. non_quantity_value, unknown_unit, name "
                "them)", highlight=False, soft_wrap=True)
    empty = [s["empty"] for s in summaries if "empty" in s]
    for message in empty:
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if empty:
        raise typer.Exit(2)


def _print_summary_tables(task: str, summaries: list[dict[str, Any]]) -> None:
    """The console view of ``mmfl data summary``: cohorts, missingness, reasons per site."""
    from rich.table import Table

    # the label sources only where some site reads labels.csv (a column fewer to squeeze)
    sources = any(s["counts"]["labels_from"]["labels_csv"] for s in summaries)
    columns = ["site", "n", "pos", "prev", "img", "txt", "tab",
               *(["csv/rule"] if sources else []), "valid/read", "skip", "note", "excl"]
    rows = []
    for s in summaries:
        counts = s["counts"]
        prev = "-" if s["prevalence"] is None else f"{s['prevalence']:.2f}"
        cov = ["-" if v is None else f"{v:.0%}" for v in s["coverage"].values()]
        labels = counts["labels_from"]
        rows.append([
            s["site"], str(s["patients"]), str(s["positives"]), prev, *cov,
            *([f"{labels['labels_csv']}/{labels['rule']}"] if sources else []),
            f"{counts.get('resources_validated', 0)}/{counts.get('resources_read', 0)}",
            str(sum(counts["skipped_by_reason"].values())),
            str(sum(counts.get("noted_by_reason", {}).values())),
            str(sum(counts["excluded_by_reason"].values())),
        ])
    table = Table(
        title=f"{task}: cohorts per site",
        caption="n: patients; pos: positives; img/txt/tab: share of patients with the "
        "modality; valid/read: FHIR resources validated/read; skip: bad records; note: "
        "records kept with a note (nonconforming_id, unitless_value); excl: patients outside "
        "the task" + ("; csv/rule: labels from labels.csv / from the task's rule"
                      if sources else ""),
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "site" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    # in a log or a pipe (80 columns by default) the table takes the width it needs: a cell
    # cut to "2…" says nothing; a terminal keeps its own width
    need = console.measure(table, options=console.options.update_width(400)).maximum
    out = console if console.is_terminal or need <= console.width else Console(width=need)
    out.print(table)
    for s in summaries:
        if "labels_csv_unused" in s["counts"]:
            err_console.print(f"[bold yellow]warning:[/] {s['site']}: "
                              f"{s['counts']['labels_csv_unused']}", highlight=False,
                              soft_wrap=True)
    miss = Table(title="feature missingness (fraction of patients without a value)")
    miss.add_column("feature")
    for s in summaries:
        miss.add_column(s["site"], justify="right")
    for feat in summaries[0]["missingness"] if summaries else []:
        miss.add_row(
            feat,
            *[
                "-" if s["missingness"][feat] is None else f"{s['missingness'][feat]:.0%}"
                for s in summaries
            ],
        )
    console.print(miss)
    for s in summaries:
        reasons = {
            **{f"skipped: {k}": v for k, v in s["counts"]["skipped_by_reason"].items()},
            **{f"excluded: {k}": v for k, v in s["counts"]["excluded_by_reason"].items()},
            **{f"noted: {k}": v for k, v in s["counts"].get("noted_by_reason", {}).items()},
        }
        if reasons:
            why = Table(title=f"{s['site']}: skipped records, excluded patients, notes")
            why.add_column("reason")
            why.add_column("count", justify="right")
            for k, v in reasons.items():
                why.add_row(k, str(v))
            console.print(why)


@data_app.command("import-csv")
def data_import_csv(
    csv_file: Annotated[Path, typer.Argument(help="The CSV file (one row per patient or "
                                             "per admission).")],
    mapping: Annotated[Path, typer.Option("--mapping", help="Mapping YAML "
                                          "(e.g. configs/mappings/mexico_covid.yaml).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (new or empty): the "
                                      "site, or one site per --split-by value.")],
    split_by: Annotated[str | None, typer.Option(
        "--split-by", help="Column whose value names each row's site.")] = None,
    min_site_size: Annotated[int, typer.Option(
        "--min-site-size", min=0, help="Pool sites with fewer patients into 'other'.")] = 0,
    on_error: Annotated[str | None, typer.Option(
        "--on-error", help="skip | fail (default: the mapping's on_error).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables.")] = False,
) -> None:
    """Import a flat CSV into site directories (FHIR NDJSON, labels.csv, images.csv)."""
    import time

    from rich.table import Table

    from multimodal_fl.data import DataError
    from multimodal_fl.data.csv_import import POOL_SITE as POOL_NAME
    from multimodal_fl.data.csv_import import import_csv
    from multimodal_fl.data.csv_mapping import MappingError

    start = time.perf_counter()
    try:
        result = import_csv(csv_file, mapping, out, split_by=split_by,
                            min_site_size=min_site_size, on_error=on_error)
    except (DataError, MappingError) as exc:
        fail(str(exc))
    wall = time.perf_counter() - start
    doc = result.summary()
    for line in result.warnings:
        err_console.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps({**doc, "wall_seconds": round(wall, 1)}, indent=2) + "\n")
        return
    table = Table(title=f"{doc['mapping']}: sites written to {out}",
                  caption="labelled: patients in labels.csv; rate: positives / labelled")
    for col in ("site", "patients", "rows", "labelled", "positives", "rate", "images",
                "values"):
        table.add_column(col, justify="left" if col in ("site", "values") else "right",
                         overflow="fold")
    for s in doc["sites"]:
        rate = "-" if s["positive_rate"] is None else f"{s['positive_rate']:.3f}"
        table.add_row(s["site"], str(s["patients"]), str(s["rows"]), str(s["labelled"]),
                      str(s["positives"]), rate, str(s["images"]),
                      ",".join(s["split_values"]))
    console.print(table)
    c = doc["counts"]
    console.print(f"rows: {c['rows_read']} read, {c.get('rows_not_kept', 0)} not kept by "
                  f"keep_rows, {c.get('rows_skipped', 0)} skipped, {c['rows_imported']} "
                  f"imported; {wall:.1f} s; report: {out / 'import_report.json'}",
                  highlight=False)
    if c.get("pooled_site_patients_below_minimum"):
        console.print(f"note: the pooled site '{POOL_NAME}' holds "
                      f"{c['pooled_site_patients_below_minimum']} patients, still fewer than "
                      f"--min-site-size {min_site_size}", highlight=False)
    if c.get("patients_kept_in_one_site"):
        console.print(f"{c['patients_kept_in_one_site']} patient(s) had rows under several "
                      f"--split-by values: each is kept whole at the site of its earliest row",
                      highlight=False)
    for skip in result.skipped[:20]:
        err_console.print(f"skipped: {skip.message()}", highlight=False, soft_wrap=True)
    if len(result.skipped) > 20:
        err_console.print(f"... and {len(result.skipped) - 20} more (import_report.json)")


# --------------------------------------------------------------------------- mmfl flower

EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine", help="inprocess | flower | local | centralized (overrides federated.engine)."
    ),
]


def _print_round_table_header(sites: list[str]) -> None:
    console.print("[bold]round  replied  train_loss  " + "  ".join(f"auc:{s}" for s in sites)
                  + "  auc:pooled")


def _starting(quiet: bool) -> Any:
    """A spinner on a terminal while the engines load (``--quiet`` or a log: nothing)."""
    from contextlib import nullcontext

    if quiet or not err_console.is_terminal:
        return nullcontext()
    return err_console.status("loading torch and the engines", spinner="dots")


def _progress_view(quiet: bool, cfg: Any, stop_after_round: int | None) -> Any:
    """The progress bars of ``mmfl train`` (and ``mmfl predict``: ``cfg`` None, no rounds) on
    stderr (``--quiet``: none; no callback)."""
    from contextlib import nullcontext

    from multimodal_fl.progress_view import ProgressView

    if quiet:
        return nullcontext(None)
    if cfg is None:
        return ProgressView(err_console)
    last = cfg.federated.rounds
    if stop_after_round is not None:
        last = min(last, stop_after_round)
    return ProgressView(err_console, last_round=last)


def _print_stopped(metrics: dict[str, Any], run_dir: Path) -> bool:
    """A run stopped after a round: print how to resume it (there are no results yet)."""
    import shlex

    stopped = metrics.get("stopped_after_round")
    if stopped is None:
        return False
    command = shlex.join(["mmfl", "train", "--resume", str(run_dir)])
    console.print(f"stopped after round {stopped}; resume with: {command}", highlight=False,
                  soft_wrap=True)
    return True


@app.command("train")
def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="Experiment YAML file.")] = None,
    engine: EngineOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory.")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the federated run in RUN_DIR.")
    ] = None,
    stop_after_round: Annotated[
        int | None, typer.Option("--stop-after-round", help="Stop after round k (resumable).")
    ] = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Remove the run already in --out first.")
    ] = False,
    no_report: Annotated[
        bool, typer.Option("--no-report", help="Do not end with RUN_DIR/report/.")
    ] = False,
) -> None:
    """Train one experiment: federated (default), local-only or centralized.

    One run per run directory: --out must be new or empty (--overwrite removes the run there
    first); --resume continues only an unfinished federated run of the same config and data.
    A completed run ends with RUN_DIR/report/ and RUN_DIR/model_card.json.
    """
    from multimodal_fl.config import ExperimentConfig

    with _starting(quiet):  # torch, MONAI and transformers take seconds to import
        from multimodal_fl.engines import ENGINES

    saved = False
    if stop_after_round is not None and stop_after_round < 1:
        fail(f"--stop-after-round {stop_after_round}: give a round, 1 or more")
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            fail(f"--out {out} with --resume {resume}: a resumed run is written into its own "
                 "directory; drop --out")
        if not (resume / "config.yaml").is_file():
            fail(f"--resume {resume}: no config.yaml there (not a run directory)")
        saved = config is None
        config = config or resume / "config.yaml"
        out = resume
    if config is None:
        fail("give CONFIG (an experiment YAML file) or --resume RUN_DIR")
    cfg = _load(config, set_, saved=saved)
    assert isinstance(cfg, ExperimentConfig)
    chosen = engine or cfg.federated.engine
    spec = ENGINES.get(chosen)
    if spec is None:
        fail(f"--engine {chosen!r}: expected one of {', '.join(ENGINES)}")
    _train_and_show(cfg, chosen, out=out, resume=resume is not None, overwrite=overwrite,
                    stop_after_round=stop_after_round, quiet=quiet, report=not no_report)


def _train_and_show(cfg: Any, chosen: str, *, out: Path | None, resume: bool = False,
                    overwrite: bool = False, stop_after_round: int | None = None,
                    quiet: bool = False, report: bool = True, loopback: Any = None) -> None:
    """Run ``cfg`` on engine ``chosen`` with progress bars and the round table; print the
    summary (``mmfl train``, and ``mmfl flower local CONFIG``)."""
    from rich.table import Table

    from multimodal_fl.data.errors import DataError
    from multimodal_fl.engines import ENGINES, run
    from multimodal_fl.engines.federated import round_row
    from multimodal_fl.federated.server import RoundRecord

    spec = ENGINES[chosen]
    names = sorted(s.name for s in cfg.sites)
    table_started = False

    def on_round(record: RoundRecord) -> None:
        nonlocal table_started
        if not table_started:
            _print_round_table_header(names)
            table_started = True
        console.print("  ".join(round_row(record, names)))

    try:
        with _progress_view(quiet, cfg, stop_after_round) as view:
            outcome = run(cfg, chosen, out_dir=out, resume=resume, overwrite=overwrite,
                          stop_after_round=stop_after_round,
                          on_round=None if quiet else on_round, progress=view,
                          report=report, loopback=loopback)
    except (DataError, ConfigError, ValueError, RuntimeError) as exc:
        fail(_why(exc))
        return
    except KeyboardInterrupt:
        _interrupted(out, spec.resumable)
    if _print_stopped(outcome.metrics, outcome.run_dir):
        return
    _print_notes(outcome.metrics, task=cfg.task.name)
    table = Table(title=f"{cfg.name}: {spec.label} — test AUC per site")
    table.add_column("site")
    table.add_column("test AUC [95% CI]")
    for site, doc in sorted(outcome.metrics.get("sites", {}).items()):
        table.add_row(site, _auc_text(doc.get("metrics", {}).get("test", {}).get("auc", {})))
    pooled = (outcome.metrics.get("pooled_from_histograms") or {}).get("overall")
    if pooled is not None:
        auc = pooled.get("auc") or {}
        n = len(pooled.get("sites", []))
        # the federated engines pool by a secure sum; centralized and local-only runs pool
        # the same histograms in this process
        how = ("secure sum" if outcome.metrics.get("engine") in ("inprocess", "flower")
               else "in process")
        table.add_row(f"pooled ({n} site{'' if n == 1 else 's'}, {how})" if n
                      else f"pooled ({how})",
                      _auc_text({**auc, "reason": pooled.get("reason")}))
    console.print(table)
    console.print(f"run directory: {outcome.run_dir}")
    _print_finished(outcome.finished)


def _interrupted(out: Path | None, resumable: bool) -> NoReturn:
    """Ctrl-C (or SIGTERM) during ``mmfl train``: what became of the run, and what to do."""
    from multimodal_fl.rundir import RunDirError, read_manifest

    if out is None:
        fail("interrupted: the run stopped where it was; its folder is under runs/ (give "
             "--out to name it, and to resume it)", code=130)
    try:
        manifest = read_manifest(out)
    except RunDirError:
        manifest = None
    if manifest is not None and manifest.status == "completed":
        fail(f"interrupted after the run in {out} completed, before its report and model card "
             f"were written: `mmfl report {out}` writes both", code=130)
    more = f"; continue it with `mmfl train --resume {out}`" if resumable else ""
    fail(f"interrupted: the run in {out} stopped where it was{more}", code=130)


def _print_notes(metrics: dict[str, Any], *, task: str) -> None:
    """The features without a value at a site, the run's model-selection note and what
    became of the recalibration."""
    from multimodal_fl.engines.recalibration import recalibration_line

    unseen = (metrics.get("standardisation") or {}).get("features_without_value") or {}
    for name, sites in unseen.items():
        err_console.print(f"[bold yellow]warning:[/] task '{task}': "
                          f"feature '{name}' has no value at site(s) "
                          f"{', '.join(repr(s) for s in sites)} "
                          "(none, fewer than the site's min_cell patients, or a 0/1 feature "
                          "with fewer than min_cell patients of a value): its codes may "
                          "match nothing there", highlight=False, soft_wrap=True)
    note = (metrics.get("selection_detail") or {}).get("note")
    if note:
        console.print(f"model selection: {note}", highlight=False, soft_wrap=True)
    line = recalibration_line(metrics)
    if line:
        console.print(line, highlight=False, soft_wrap=True, markup=False)


def _auc_text(auc: dict[str, Any]) -> str:
    """One AUC cell of the console summary: the value [CI], or why there is none.

    A pooled AUC from coarsened counts (no interval; ``lower`` and ``upper``: the bounds
    within which the patient-level AUC is guaranteed to lie) shows those bounds when they
    are more than 0.01 apart: its binned value alone can sit far from the patient-level AUC.
    """
    if auc.get("value") is None:
        return f"not shown ({auc.get('reason')})"
    if auc.get("lo") is not None:
        return f"{auc['value']:.3f} [{auc['lo']:.3f}, {auc['hi']:.3f}]"
    lower, upper = auc.get("lower"), auc.get("upper")
    if lower is not None and upper is not None and upper - lower > 0.01:
        return (f"{auc['value']:.3f} (coarsened counts: the exact AUC lies between "
                f"{lower:.3f} and {upper:.3f})")
    return f"{auc['value']:.3f}"


def _print_finished(finished: Any) -> None:
    """What the end of a completed run wrote: its report and its model card."""
    if finished is None:
        return
    if finished.report_html is not None:
        console.print(f"report: {finished.report_html}")
    console.print(f"model card: {finished.card_md}")


@app.command("report")
def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (e.g. federated, "
                                                   "local and centralized runs of one config).")],
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: "
                                             "RUN_DIR/report of the first run).")] = None,
) -> None:
    """Write the fairness and generalisability report (report.json + report.html).

    Built from what the sites disclosed (RUN_DIR/disclosed/), metrics.json and the cross-site
    matrix: the server's run directory of a deployment is enough.
    """
    from multimodal_fl.evaluation.report import OldRunDirectory, write_report
    from multimodal_fl.rundir import RunDirError, describe_status, read_manifest

    for run in run_dirs:
        if not run.exists():
            fail(f"{run}: does not exist; give a run directory (`mmfl train --out RUN_DIR`)")
        if (run / "metrics.json").is_file():
            continue
        try:
            manifest = read_manifest(run)
        except RunDirError:
            manifest = None
        if manifest is None:
            fail(f"{run}: not a run directory (no metrics.json); run `mmfl train` first")
        why = f" ({manifest.error})" if manifest.error else ""
        fail(f"{run}: the {manifest.engine} run there is {describe_status(run, manifest)}{why} "
             "and has no "
             f"results yet; finish it with `mmfl train --resume {run}`")
    target = out or run_dirs[0] / "report"
    try:
        json_path, html_path = write_report(run_dirs, target)
    except OldRunDirectory as exc:
        fail(f"report: {exc}")
    except json.JSONDecodeError as exc:
        fail(f"report: a JSON file of the runs is not valid JSON ({exc}); was a run stopped "
             "while writing it?")
    except (ValueError, KeyError, FileNotFoundError) as exc:
        fail(f"report: {_why(exc)}")
    console.print(f"report: {html_path}\n        {json_path}")
    if out is None and len(run_dirs) == 1:
        _refresh_model_card(run_dirs[0], json_path)


def _refresh_model_card(run: Path, report_json: Path) -> None:
    """The run's own report was (re)written: its model card repeats the report's per-site cells
    (a run trained with --no-report, or interrupted before its end, gets its card here)."""
    from multimodal_fl.config import ExperimentConfig
    from multimodal_fl.engines.finish import write_model_card
    from multimodal_fl.rundir import RunDirError, read_manifest

    try:
        manifest = read_manifest(run)
    except RunDirError:
        return
    if manifest is None or manifest.status != "completed":
        return
    try:
        cfg = load_config(run / "config.yaml", [], saved=True)
    except ConfigError as exc:  # the report stands; only the card could not be refreshed
        console.print(f"model card not rewritten: {exc}", highlight=False, soft_wrap=True)
        return
    assert isinstance(cfg, ExperimentConfig)
    _, card_md = write_model_card(run, cfg, manifest, report_json=report_json)
    console.print(f"model card: {card_md}")


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A completed run directory.")],
    site_dir: Annotated[Path, typer.Argument(help="The site directory to score.")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write (patient_id, score, "
                                      "score_raw, label, predicted); not inside RUN_DIR or "
                                      "SITE_DIR.")],
    model_site: Annotated[
        str | None,
        typer.Option("--model-site", help="Local-only runs: whose model to use."),
    ] = None,
    site_name: Annotated[
        str | None, typer.Option("--site-name", help="The site's name (default: its folder's).")
    ] = None,
    own_threshold: Annotated[bool, typer.Option(
        "--own-threshold", help="With --site-name naming a training site of a global model: "
        "its own threshold (the one its report applied), not the run's global one.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the file already at --out.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Score a site's patients with a trained model, at the run's decision threshold.

    A federated or centralized run has one global model; a local-only run one per site
    (choose with --model-site). The label column is the task's label as the site's records
    give it; predicted is score >= the run's threshold (its model card's: a global model's is
    the sites' common threshold, else their median; --own-threshold uses a training site's
    own). Prints the records skipped, the modalities present and why patients were not
    scored. --out must be a new file outside RUN_DIR and SITE_DIR (--overwrite replaces a file).
    """
    from multimodal_fl.data.errors import DataError

    _check_predict_out(out, run_dir, site_dir, overwrite=overwrite)
    with _starting(quiet):
        from multimodal_fl.engines.predict import predict_site
    try:
        with _progress_view(quiet, None, None) as view:
            result = predict_site(run_dir, site_dir, model_site=model_site, site_name=site_name,
                                  own_threshold=own_threshold, progress=view)
    except (DataError, ConfigError, ValueError, RuntimeError) as exc:
        fail(_why(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.frame.to_csv(out, index=False)
    _print_prediction(result)
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)


def _check_predict_out(out: Path, run_dir: Path, site_dir: Path, *, overwrite: bool) -> None:
    """``mmfl predict --out``: a CSV file that may be written, checked before any work.

    Refused: a folder, a path inside the run or the site directory (the run's own files, and the
    site's records, are never replaced), an existing file without ``--overwrite``, a parent
    that is a file or not writable.
    """
    if out.is_dir():
        fail(f"--out {out}: is a folder; give a CSV file name")
    target = out.resolve()
    for what, folder in (("RUN_DIR", run_dir), ("SITE_DIR", site_dir)):
        if target.is_relative_to(folder.resolve()):
            fail(f"--out {out}: inside {what} {folder}; predictions are never written into the "
                 "run or the site directory: give a file outside both")
    if out.exists() and not overwrite:
        fail(f"--out {out}: a file is already there; give another --out or --overwrite to "
             "replace it")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        fail(f"--out {out}: {parent} is not writable")


def _print_prediction(result: Any) -> None:
    """What ``mmfl predict`` did: the model, the threshold and why, and what the data lacked."""
    positive = int(result.frame["predicted"].sum())
    lines = [f"site {result.site}: {len(result.frame)} patients scored with {result.model}; "
             f"{positive} predicted positive at threshold {result.threshold:.4g} "
             f"({result.threshold_source}); recalibration: {result.recalibration}"]
    if result.skipped:
        lines.append("records skipped: " + ", ".join(
            f"{reason} {n}" for reason, n in sorted(result.skipped.items(), key=lambda r: -r[1])))
    n = len(result.frame)
    have = ", ".join(f"{m} {k}/{n}" for m, k in result.modalities.items())
    lines.append(f"modalities of the model: {have}")
    absent = [m for m, k in result.modalities.items() if k == 0]
    if absent:
        lines.append(f"  no patient has {' or '.join(absent)}: every score is made without it, "
                     "unlike the model's training data, so scores (and who is predicted "
                     "positive) shift")
    if result.features_without_value:
        names = ", ".join(f"'{f}'" for f in result.features_without_value)
        lines.append(f"  no patient has a value of feature(s) {names}: the model sees them "
                     "missing for everyone (their codes match no record known by the cut-off "
                     "here: a wrong code or unit, data the site does not record, or a site "
                     "of another task)")
    if result.excluded:
        lines.append(f"{result.excluded} not scored: " + ", ".join(
            f"{why} {k}" for why, k in sorted(result.not_scored.items(), key=lambda r: -r[1])))
    console.print("\n".join(lines), highlight=False, soft_wrap=True, markup=False)


site_app = typer.Typer(help="A hospital's own view of its site.", no_args_is_help=True)
app.add_typer(site_app, name="site")


@site_app.command("check")
def site_check_cmd(
    site_dir: Annotated[Path, typer.Argument(help="The site directory.")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="The experiment the site would join: shows what each request "
        "kind would release from its data.")] = None,
    set_: SetOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="The site's name (default: the "
                                             "config's for this folder, else the folder's).")
                    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of text.")] = False,
    node_config: Annotated[str, typer.Option(
        "--node-config", help="The node config the site's SuperNode will start with (as "
        "`mmfl flower supernode --node-config`): the policy in force is the stricter of it "
        "and policy.yaml.")] = "",
) -> None:
    """Show a site its disclosure policy and, with --config, what each message would release.

    A dry run at the hospital: nothing is written and nothing leaves. The policy is
    SITE_DIR/policy.yaml (docs/data-contract.md) and, with --node-config, the SuperNode's;
    the experiment config and a request can make it stricter, never looser.
    """
    from multimodal_fl.data.errors import DataError

    if not site_dir.is_dir():
        fail(f"{site_dir}: not a directory; give a site directory")
    from multimodal_fl.data.sites import discover_site

    try:
        discover_site(site_dir)  # an empty folder, a cohort's root or a run is no site
    except DataError as exc:
        fail(str(exc))
    if (site_dir / "policy.yaml").exists() and not (site_dir / "policy.yaml").is_file():
        fail(f"{site_dir / 'policy.yaml'}: not a file")
    cfg: Any = _load(config, set_) if config is not None else None
    with _starting(as_json):
        from multimodal_fl.engines.site_check import site_check
    try:
        doc = site_check(site_dir, cfg, name=name,
                         node_config=_check_node_policy(node_config) or None)
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    _print_site_check(doc)


def _print_site_check(doc: dict[str, Any]) -> None:
    """``mmfl site check`` as text: policy, thresholds, splits, then each kind."""
    out = [f"site {doc['site']} ({doc['site_dir']})", "policy:"]
    out += [f"  {k}: {v!r}  [{doc['origin'][k]}]" for k, v in doc["policy"].items()]
    if "state" in doc:
        out.append("  " + _state_line(doc["state"], doc["policy"].get("max_epsilon")))
    elif doc["policy"].get("max_epsilon") is not None:
        out.append("  note: without state_dir, max_epsilon counts each run from 0; set "
                   "state_dir to count every run against one budget")
    if "min_cell" not in doc:
        out.append("give --config CONFIG to see what each request kind would release")
        console.print("\n".join(out), highlight=False, soft_wrap=True, markup=False)
        return
    mc = doc["min_cell"]
    out.append(f"min_cell: {mc['effective']} (the largest of package floor {mc['package floor']}, "
               f"policy {mc['policy']}, config {mc['config']}; a request may raise it)")
    out.append("splits (your own counts; a count leaves only as 0 or >= min_cell):")
    for split, row in doc["splits"].items():
        may = "may leave" if row["counts_may_leave"] else "suppressed"
        out.append(f"  {split}: {row['n']} patients, {row['positives']} positive  [{may}]")
    out.append("per request kind:")
    for kind, entry in doc["kinds"].items():
        out.append(f"  {kind}: " + _kind_line(kind, entry))
    console.print("\n".join(out), highlight=False, soft_wrap=True, markup=False)


def _state_line(state: dict[str, Any], budget: float | None) -> str:
    """What the policy's ``state_dir`` holds: the epsilon spent over every run, the sums."""
    if state["epsilon"] is None:
        spent = "no private fit counted yet"
    else:
        spent = (f"{state['private_fits']} private fit(s) counted, epsilon "
                 f"{state['epsilon']:.3g} at delta {state['delta']:g} ({state['accountant']})")
        if budget is not None:
            spent += f" of max_epsilon {budget:g}"
    grids = state.get("grids") or []
    on = (f", histograms on {' and '.join(map(str, grids))} bins "
          "(another grid only over the same sites)") if grids else ""
    return (f"state_dir {state['dir']}: {spent}; {state['secure_sums']} secure sum(s) "
            f"recorded (one set of sites per content){on}")


def _kind_line(kind: str, entry: dict[str, Any]) -> str:
    """One request kind's line of ``mmfl site check``."""
    if kind == "pca":
        return _pca_line(entry)
    if kind == "secure_sum":
        return _secure_sum_line(entry)
    if not entry.get("released"):
        return f"not answered: {entry.get('refused') or entry.get('failed')}"
    carried = [f"n_samples {entry['n_samples']}"] if entry.get("n_samples") else []
    carried += [f"{entry['weights']} weight arrays"] if entry.get("weights") else []
    for field in ("metrics", "arrays", "documents"):
        if entry.get(field):
            carried.append(f"{field} {', '.join(entry[field])}")
    line = "releases " + ("; ".join(carried) or "nothing")
    if entry.get("holds"):
        line += f" in its reply; holds {entry['holds']} for a secure sum (secure_sum below)"
    suppressed = entry.get("suppressed", [])
    return line + "".join(f"\n      suppressed: {s}" for s in suppressed)


def _pca_line(entry: dict[str, Any]) -> str:
    """``mmfl site check``'s pca line: per modality and split, the rows, or the refusal."""
    reasons = {r.get("refused") for r in entry.values()}
    if entry and None not in reasons and len(reasons) == 1:
        return f"not answered: {reasons.pop()}"
    return "; ".join(f"{m}: {r['n']} patients, " + (
        f"not answered: {r['refused']}" if r.get("refused") else
        f"at most {r['rank_cap']} rows" + (" (declines)" if r["rank_cap"] == 0 else ""))
        for m, r in entry.items())


def _secure_sum_line(entry: dict[str, Any]) -> str:
    """``mmfl site check``'s secure_sum line: each vector the site holds, joined or not."""
    if not entry:
        return "holds no vector to sum"
    out = []
    for vector, step in entry.items():
        if step.get("released"):
            out.append(f"{vector}: joins (its first step releases arrays "
                       f"{', '.join(step.get('arrays', []))}: public keys; the vector leaves "
                       "only masked, and only the total of at least 3 sites is unmasked)")
        else:
            out.append(f"{vector}: not answered: {step.get('refused') or step.get('failed')}")
    return "per vector held, its first step:" + "".join(f"\n      {line}" for line in out)


@app.command("pca")
def pca_cmd(
    config: ConfigArg,
    features: Annotated[
        str, typer.Option("--features", help="image | tabular | text: the space to analyse.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (pca.json, PNGs).")],
    n_components: Annotated[
        int | None, typer.Option("--n-components", help="Components to keep (default 10).")
    ] = None,
    site_rank: Annotated[
        int | None,
        typer.Option(
            "--site-rank", min=1,
            help="Rows of S·Vᵀ each site sends (default: all, exact). Fewer send less and "
            "reveal less; the error this causes is bounded and reported.",
        ),
    ] = None,
    svd_solver: Annotated[
        str,
        typer.Option(
            "--svd-solver",
            help="auto | full | covariance_eigh (full keeps tiny variances accurate).",
        ),
    ] = "auto",
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="inprocess | flower (a SuperLink and one SuperNode per site on 127.0.0.1); "
            "default: federated.engine when it is flower, else inprocess.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds before a Flower run is stopped.")
    ] = 3600.0,
    set_: SetOpt = None,
) -> None:
    """Federated PCA of one feature space: how do the sites' cohorts differ?

    Runs the protocol over the sites (in process, or on Flower with --engine flower; only
    counts, means, S·Vᵀ blocks and aggregate score distributions reach the server) and
    writes OUT/pca.json, OUT/pca_sites.png and OUT/pca_variance.png (docs/pca.md). Across
    hospitals: `mmfl flower run CONFIG --server-factory
    multimodal_fl.engines.flower_jobs:pca_analysis_job --site-factory
    multimodal_fl.engines.flower_jobs:pca_analysis_site -c pca-features=tabular`
    (docs/deployment.md).
    """
    from multimodal_fl.config import ExperimentConfig
    from multimodal_fl.data.errors import DataError
    from multimodal_fl.federated.pca import SVD_SOLVERS
    from multimodal_fl.pca.analysis import FEATURES, run_pca_analysis

    if features not in FEATURES:
        fail(f"--features {features!r}: expected one of {', '.join(FEATURES)}")
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: a file; give a new or empty folder")
    stray = sorted(e.name for e in out.iterdir() if e.name not in PCA_OUTPUTS) \
        if out.is_dir() else []
    if stray:  # an earlier analysis is replaced; anything else is the user's and stays
        fail(f"--out {out}: holds {', '.join(repr(n) for n in stray[:3])}, which no PCA "
             "analysis writes; give a new or empty folder")
    if svd_solver not in SVD_SOLVERS:
        fail(f"--svd-solver {svd_solver!r}: expected one of {', '.join(SVD_SOLVERS)}")
    cfg = _load(config, set_)
    assert isinstance(cfg, ExperimentConfig)
    chosen = engine or ("flower" if cfg.federated.engine == "flower" else "inprocess")
    if chosen not in {"inprocess", "flower"}:
        fail(f"--engine {chosen!r}: mmfl pca runs on inprocess or flower")
    if chosen == "flower":
        if n_components is not None and n_components < 1:
            fail(f"--n-components {n_components}; a positive integer is expected")
        _pca_on_flower(config, set_, features, out, n_components=n_components,
                       site_rank=site_rank, svd_solver=svd_solver, timeout=timeout)
        return
    try:
        result = run_pca_analysis(cfg, features, out, n_components=n_components,
                                  site_rank=site_rank, svd_solver=svd_solver)
    except (DataError, ValueError, RuntimeError) as exc:
        fail(_why(exc))
    _print_pca(result.document, [result.json_path, result.sites_png, result.variance_png])


#: What ``mmfl pca`` writes into ``--out`` (a rerun replaces them).
PCA_OUTPUTS = frozenset({"pca.json", "pca_sites.png", "pca_variance.png", "flower"})


def _pca_on_flower(config: Path, set_: list[str] | None, features: str, out: Path, *,
                   n_components: int | None, site_rank: int | None, svd_solver: str,
                   timeout: float) -> None:
    """``mmfl pca --engine flower``: ``mmfl flower local`` with the PCA analysis factories."""
    from multimodal_fl.engines.flower_jobs import PCA_SERVER_FACTORY, PCA_SITE_FACTORY

    options = [f"pca-features={features}", f"pca-svd-solver={svd_solver}",
               f"pca-n-components={n_components or 0}", f"pca-site-rank={site_rank or 0}"]
    flower_local(config=config, site=None, server_factory=PCA_SERVER_FACTORY,
                 site_factory=PCA_SITE_FACTORY, run_config=options, set_=set_, out=out,
                 timeout=timeout)
    if not (out / "pca.json").is_file():
        fail(f"the Flower run ended without writing {out / 'pca.json'}; see the logs in "
             f"{out / 'flower'}")


def _print_pca(doc: dict[str, Any], paths: list[Path]) -> None:
    """The console view of a ``pca.json``: bytes per site, variance, loadings, notes."""
    from rich.table import Table

    table = Table(title=f"federated PCA of {doc['features']} features: n={doc['n_samples']}, "
                  f"d={doc['n_features']}, k={doc['n_components']}")
    for col in ("site", "n", "bytes sent", "raw bytes", "sent / raw"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, row in doc["sites"].items():
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        table.add_row(site, str(row["n"]), f"{row['bytes_sent']:,}", f"{row['raw_bytes']:,}",
                      ratio)
    console.print(table)
    ratios = ", ".join(f"{100 * r:.1f}%" for r in doc["explained_variance_ratio"][:5])
    console.print(f"explained variance ratio (first components): {ratios}; "
                  f"{100 * doc['cumulative_variance_ratio'][-1]:.1f}% in {doc['n_components']}")
    for i, loadings in enumerate(doc["top_loadings"][:2]):
        top = ", ".join(f"{name} {value:+.2f}" for name, value in loadings[:4])
        console.print(f"PC{i + 1} loadings: {top}", highlight=False)
    for note in doc["notes"][2:]:
        console.print(f"[yellow]note[/]: {note}", highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in paths)}")


flower_app = typer.Typer(
    help="Run the package's ServerApp / ClientApp on Flower: one SuperLink, one SuperNode per "
    "site (docs/deployment.md).",
    no_args_is_help=True,
)
app.add_typer(flower_app, name="flower")
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
ServerFactoryOpt = Annotated[
    str,
    typer.Option(
        "--server-factory", help="'module:callable' returning a ServerJob (the ServerApp calls it)."
    ),
]
SiteFactoryOpt = Annotated[
    str,
    typer.Option(
        "--site-factory",
        help="'module:callable' taking (site_name, site_dir, run_config), returning a Site.",
    ),
]
RunConfigOpt = Annotated[
    list[str] | None,
    typer.Option("--run-config", "-c", help="A run-config entry key=value (repeatable)."),
]
FlowerOutOpt = Annotated[
    Path, typer.Option("--out", help="Where the ServerApp writes weights and result.json.")
]


def _flower_module() -> Any:
    try:
        from multimodal_fl.federated import flower
    except ImportError as exc:
        fail(f"the Flower engine needs Flower 1.42: pip install 'multimodal_fl[flower]' ({exc})")
    return flower


def _flower_run_config(pairs: list[str] | None) -> dict[str, bool | int | float | str]:
    import tomllib

    out: dict[str, bool | int | float | str] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(f"--run-config {pair!r}: expected key=value, e.g. rounds=3 or name='x'")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word is a string
        if not isinstance(value, bool | int | float | str):
            fail(f"--run-config {pair!r}: the value must be a bool, number or string")
        out[key.strip()] = value
    return out


def _flower_exec(cmd: list[str]) -> None:
    import os
    import shlex

    env = _flower_module().flower_env()
    err_console.print("$ " + " ".join(shlex.quote(c) for c in cmd), highlight=False)
    os.execve(cmd[0], cmd, env)


def _flower_table(result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"Flower run: {result.completed_rounds} round(s), {result.seconds:.1f} s")
    for column in ("round", "sites replied", "failed", "train loss", "seconds"):
        table.add_column(column)
    for row in result.history:
        loss = row.get("train_loss")
        table.add_row(
            str(row["round"]),
            ", ".join(row["replied"]),
            ", ".join(sorted(row["failed"]) + sorted(row["rejected"])
                      + [f"{s} (evaluate)" for s in sorted(row.get("eval_failed") or {})])
            or "-",
            "-" if loss is None else f"{loss:.4f}",
            f"{row['seconds']:.1f}",
        )
    console.print(table)


def _insecure_warning(what: str) -> None:
    err_console.print(
        f"[bold yellow]warning:[/] {what} over plain HTTP (--insecure): nothing is encrypted "
        "and any SuperNode may connect; for loopback trials only (docs/deployment.md)",
        highlight=False, soft_wrap=True,
    )  # fmt: skip


def _tls_files(
    certs: Path | None, certfile: Path | None, keyfile: Path | None, ca_certfile: Path | None
) -> Any:
    """The SuperLink's TLS files from --certs DIR and/or the three --ssl-* options (or None)."""
    flower = _flower_module()
    if certs is not None:
        if not certs.is_dir():
            fail(f"--certs {certs}: no such folder (make it with `mmfl flower certs {certs}`)")
        base = flower.TlsFiles.in_folder(certs)
        return flower.TlsFiles(
            ca_cert=(ca_certfile or base.ca_cert).resolve(),
            server_cert=(certfile or base.server_cert).resolve(),
            server_key=(keyfile or base.server_key).resolve(),
        )
    if certfile is None and keyfile is None and ca_certfile is None:
        return None
    if certfile is None or keyfile is None or ca_certfile is None:
        given = {"--ssl-certfile": certfile, "--ssl-keyfile": keyfile,
                 "--ssl-ca-certfile": ca_certfile}
        missing = ", ".join(k for k, v in given.items() if v is None)
        fail(f"TLS needs all three of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile "
             f"(missing {missing}), or --certs DIR")
    return flower.TlsFiles(ca_certfile.resolve(), certfile.resolve(), keyfile.resolve())


@flower_app.command("superlink", context_settings=_PASS_THROUGH)
def flower_superlink(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535,
                                      help="The one HTTP port (Fleet, Control, apps).")] = 8000,
    certs: Annotated[Path | None, typer.Option(
        help="Folder of `mmfl flower certs` (ca.crt, server.pem, server.key).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(
        "--ssl-certfile", help="The SuperLink's certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(
        "--ssl-keyfile", help="The SuperLink's private key (PEM, mode 0600).")] = None,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(
        "--ssl-ca-certfile", help="The CA certificate that signed it.")] = None,
    enable_supernode_auth: Annotated[bool, typer.Option(
        "--enable-supernode-auth",
        help="Admit only SuperNodes registered with `flwr supernode register` (needs TLS).")
    ] = False,
    insecure: Annotated[bool, typer.Option(
        help="Plain HTTP, no certificates (on 127.0.0.1 only; prints a warning).")] = False,
) -> None:
    """Start a SuperLink: TLS, optionally registered SuperNodes only; runtime installs off.

    Extra options go to flower-superlink (--database, ...).
    """
    flower = _flower_module()
    tls = _tls_files(certs, ssl_certfile, ssl_keyfile, ssl_ca_certfile)
    if tls is not None and insecure:
        fail("--insecure and certificates together: drop --insecure to use TLS")
    if tls is None and not insecure and flower.is_loopback(host):
        fail("give --certs DIR (made by `mmfl flower certs DIR`) or --ssl-certfile, "
             "--ssl-keyfile and --ssl-ca-certfile; or --insecure for a plain-HTTP trial on "
             "127.0.0.1")
    try:
        cmd = flower.superlink_command(
            port, host=host, tls=tls, supernode_auth=enable_supernode_auth
        )
    except flower.CredentialsError as exc:
        fail(str(exc))
    if tls is None:
        _insecure_warning(f"SuperLink on {host}:{port}")
    _flower_exec(cmd + list(ctx.args))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: One node-config entry as Flower reads it: ``key=value``, the value quoted or one word.
_NODE_ENTRY = re.compile(r"""\s*([^\s=]+)=('[^']*'|"[^"]*"|\S+)\s*""")


def _check_node_policy(node_config: str) -> dict[str, Any]:
    """The node config's entries; a node config the site's policy reader would refuse fails
    here, in one line (before Flower starts)."""
    if not node_config.strip():
        return {}
    from flwr.common.config import parse_config_args

    from multimodal_fl.federated.disclosure import NODE_POLICY_FILE, NODE_POLICY_KEYS, node_policy

    pos = 0  # every word key=value, a text value quoted: Flower's parser drops a bare word
    while pos < len(node_config.rstrip()):  # silently and boxes a bad value naming no option
        entry = _NODE_ENTRY.match(node_config, pos)
        if entry is None:
            word = node_config[pos:].split()[0]
            fail(f"--node-config {node_config!r}: {word!r} is not key=value; expected e.g. "
                 "\"min-cell=20 max-epsilon=8 policy-file='/etc/mmfl/policy.yaml'\"")
        key, value = entry.groups()
        if not (value[0] in "'\"" or value in ("true", "false") or _is_number(value)):
            fail(f"--node-config {key}={value}: a text value needs quotes, {key}='{value}' "
                 "(numbers and true/false go bare)")
        pos = entry.end()
    try:
        entries = parse_config_args([node_config])
    except (ValueError, TypeError) as exc:
        fail(f"--node-config {node_config!r}: {exc}; expected key=value pairs, e.g. "
             "\"min-cell=20 max-epsilon=8\"")
    known = [*NODE_POLICY_KEYS, NODE_POLICY_FILE]
    for key in entries:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            if key in ("site-name", "site-dir"):
                hint = "the site's name and folder are the SuperNode's own options (--name, " \
                       "SITE_DIR), not its policy; "
            fail(f"--node-config {key}: not a site-policy key; {hint}expected one of "
                 f"{', '.join(known)}")
    try:
        node_policy(entries)
    except ConfigError as exc:
        fail(str(exc))
    return dict(entries)


@flower_app.command("supernode", context_settings=_PASS_THROUGH)
def flower_supernode(
    ctx: typer.Context,
    site_dir: Annotated[Path, typer.Argument(help="This site's data directory.")],
    superlink: Annotated[str, typer.Option(help="host:port of the SuperLink.")] = "127.0.0.1:8000",
    name: Annotated[str | None, typer.Option(help="Site name (default: the dir's name).")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535,
                                      help="This SuperNode's own port (one per node).")] = 9094,
    root_certificates: Annotated[Path | None, typer.Option(
        "--root-certificates", help="The CA certificate (ca.crt of `mmfl flower certs`).")
    ] = None,
    auth_key: Annotated[Path | None, typer.Option(
        "--auth-key", help="This site's private key (`mmfl flower keys`), registered at the "
        "SuperLink.")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Plain HTTP to a SuperLink on 127.0.0.1 (prints a warning).")] = False,
    node_config: Annotated[str, typer.Option(
        "--node-config", help="The site's policy as node config, e.g. \"min-cell=20 "
        "max-epsilon=8 secure-aggregation=true\" (or policy-file='PATH': text in quotes); "
        "stricter of it and SITE_DIR/policy.yaml.")] = "",
) -> None:
    """Start the SuperNode of one site (node config site-name, site-dir, its policy).

    Extra options go to flower-supernode (--max-retries, ...).
    """
    from multimodal_fl.data import DataError
    from multimodal_fl.data.sites import discover_site

    try:  # a wrong folder fails here, not in the first request of a run
        discover_site(site_dir)
    except DataError as exc:
        fail(f"{exc}; give the site's data directory (`mmfl site check SITE_DIR --config "
             "CONFIG` shows what it holds)")
    _check_node_policy(node_config)
    flower = _flower_module()
    if root_certificates is not None and insecure:
        fail("--insecure and --root-certificates together: drop --insecure to use TLS")
    try:
        host, _ = flower.split_address(superlink)
        if root_certificates is None and not insecure and flower.is_loopback(host):
            fail("give --root-certificates CA.crt (the ca.crt of `mmfl flower certs`), or "
                 "--insecure for a plain-HTTP trial with a SuperLink on 127.0.0.1")
        cmd = flower.supernode_command(
            superlink, port, site_dir, site_name=name, root_certificates=root_certificates,
            auth_key=auth_key, node_config=node_config,
        )  # fmt: skip
    except (flower.CredentialsError, ValueError) as exc:
        fail(str(exc))
    if root_certificates is None:
        _insecure_warning(f"SuperNode to {superlink}")
    _flower_exec(cmd + list(ctx.args))


@flower_app.command("certs")
def flower_certs(
    out: Annotated[Path, typer.Argument(help="Folder to write ca.crt, ca.key, server.pem, "
                                              "server.key into (created, mode 0700).")],
    name: Annotated[str | None, typer.Option(
        help="The SuperLink's host name as SuperNodes dial it, or its IP address (default: "
        "localhost; with --renew: the renewed certificate's names).")
    ] = None,
    dns: Annotated[list[str] | None, typer.Option(
        "--dns", help="Another DNS name of the SuperLink (repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option(
        "--ip", help="An IP address of the SuperLink (repeatable; 127.0.0.1 and ::1 are "
        "always included).")] = None,
    days: Annotated[int, typer.Option(help="The SuperLink certificate's validity.")] = 365,
    ca_days: Annotated[int, typer.Option(help="The CA's validity.")] = 3650,
    renew: Annotated[bool, typer.Option(
        help="Keep the CA in OUT; sign a new SuperLink certificate and key with it.")] = False,
) -> None:
    """Make a CA and the SuperLink's TLS certificate and key (EC P-384), one line per file."""
    flower = _flower_module()
    try:
        written = flower.make_certificates(
            out, name=name, dns=dns or [], ips=ip or [], days=days, ca_days=ca_days, renew=renew
        )
    except flower.CredentialsError as exc:
        fail(str(exc))
    for item in written:
        console.print(item.line(), highlight=False, soft_wrap=True)


@flower_app.command("keys")
def flower_keys(
    site: Annotated[str, typer.Argument(help="The site's name (its SuperNode's site-name).")],
    out: Annotated[Path, typer.Argument(help="Folder to write SITE.key and SITE.pub into.")],
    connection: Annotated[str | None, typer.Option(
        help="The SuperLink connection in flwr's config.toml, for the printed step.")] = None,
) -> None:
    """Make a site's SuperNode key pair and print how to register it."""
    flower = _flower_module()
    try:
        keys, written = flower.make_site_keys(site, out)
    except flower.CredentialsError as exc:
        fail(str(exc))
    for item in written:
        console.print(item.line(), highlight=False, soft_wrap=True)
    for line in flower.registration_steps(keys, connection=connection):
        console.print(line, highlight=False, soft_wrap=True)


@flower_app.command("app")
def flower_app_cmd(
    dest: Annotated[Path, typer.Argument(help="Directory to write the Flower App into.")],
    server_factory: ServerFactoryOpt,
    site_factory: SiteFactoryOpt,
    run_config: RunConfigOpt = None,
) -> None:
    """Write the package's Flower App (a pyproject.toml) for `flwr run DEST CONNECTION`."""
    flower = _flower_module()
    entries: dict[str, bool | int | float | str] = {
        "server-factory": server_factory,
        "site-factory": site_factory,
    }
    entries.update(_flower_run_config(run_config))
    _check_factories(entries)
    ours = [f for f in (server_factory, site_factory)
            if flower.LEGACY_FACTORIES.get(f, f).startswith("multimodal_fl.engines.flower_jobs:")]
    if ours and "experiment" not in entries:
        fail(f"{ours[0]} needs the experiment in its run config, which `mmfl flower app` does "
             "not write: `mmfl flower run CONFIG` writes it (its OUT/flower/app can be submitted "
             "again with flwr run), or write the app with "
             "multimodal_fl.engines.flower_jobs.experiment_run_config(cfg, run_dir=...)")
    written = flower.write_app_dir(dest, entries)
    console.print(f"wrote {written / 'pyproject.toml'}")


def _check_connection(connection: str | None) -> None:
    """The SuperLink connection ``flwr run`` will use exists and names a SuperLink address.

    Without one, Flower falls back to a local *simulation* of its own (a SuperLink it starts
    and leaves running, files in ~/.flwr), which is not a deployment of the sites.
    """
    import tomllib

    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = home / "config.toml"
    try:
        doc = tomllib.loads(path.read_text()) if path.is_file() else {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        fail(f"{path}: not a readable Flower configuration ({exc})")
    links = doc.get("superlink", {}) if isinstance(doc.get("superlink"), dict) else {}
    name = connection or links.get("default")
    if not name:
        fail(f"no --connection and no default SuperLink in {path}; give --connection NAME, a "
             "[superlink.NAME] table with the SuperLink's address there (docs/deployment.md)")
    entry = links.get(name)
    if not isinstance(entry, dict) or "address" not in entry:
        fail(f"--connection {name}: {path} has no [superlink.{name}] table with an address; "
             "mmfl flower run submits to a running SuperLink (docs/deployment.md)")


def _flower_entries(
    config: Path | None,
    set_: list[str] | None,
    server_factory: str | None,
    site_factory: str | None,
    run_config: list[str] | None,
    *,
    run_dir: Path,
    site_out: Path | None,
) -> tuple[dict[str, bool | int | float | str], Any]:
    """Run-config entries: the experiment's (CONFIG) or the factories', then -c overrides."""
    entries: dict[str, bool | int | float | str] = {}
    cfg = None
    if config is not None:
        from multimodal_fl.engines.flower_jobs import experiment_run_config

        cfg = _load(config, set_)
        entries.update(experiment_run_config(cfg, run_dir=run_dir, site_out=site_out))  # type: ignore[arg-type]
    elif not (server_factory and site_factory):
        fail("give CONFIG (an experiment YAML file), or both --server-factory and --site-factory")
    if server_factory:
        entries["server-factory"] = server_factory
    if site_factory:
        entries["site-factory"] = site_factory
    entries.update(_flower_run_config(run_config))
    _check_factories(entries)
    return entries, cfg


def _check_factories(entries: dict[str, bool | int | float | str]) -> None:
    """A malformed factory reference fails here, not in the ServerApp (whose Python, maybe on
    another machine, imports it)."""
    for key in ("server-factory", "site-factory"):
        ref = str(entries.get(key, ""))
        module, _, attr = ref.partition(":")
        if key in entries and not (all(p.isidentifier() for p in module.split("."))
                                   and all(p.isidentifier() for p in attr.split("."))):
            fail(f"--{key} {ref!r}: expected 'package.module:callable', e.g. "
                 "'multimodal_fl.engines.flower_jobs:experiment_site'")


def _flower_report(out: Path, result: Any) -> None:
    """Print what the run wrote: a PCA analysis's pca.json, else the round table (the
    experiment's metrics.json if there is one, else the result)."""
    from types import SimpleNamespace

    metrics = out / "metrics.json"
    pca_json = out / "pca.json"
    if pca_json.is_file():  # the PCA analysis job (flower_jobs.pca_analysis_job)
        _print_pca(json.loads(pca_json.read_text()),
                   [pca_json, out / "pca_sites.png", out / "pca_variance.png"])
    elif metrics.is_file():
        doc = json.loads(metrics.read_text())
        rounds = doc.get("rounds", [])
        seconds = sum(float(r.get("seconds", 0.0)) for r in rounds)
        _flower_table(
            SimpleNamespace(history=rounds, completed_rounds=len(rounds), seconds=seconds)
        )
        console.print(f"run directory: {out}")
    elif result is not None and result.history:
        _flower_table(result)


FlowerConfigArg = Annotated[
    Path | None, typer.Argument(help="Experiment YAML (trains it as `mmfl train` does).")
]
FlowerServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server-factory", help="'module:callable' returning a ServerJob (the ServerApp calls it)."
    ),
]
FlowerSiteOpt = Annotated[
    str | None,
    typer.Option(
        "--site-factory",
        help="'module:callable' taking (site_name, site_dir, run_config), returning a Site.",
    ),
]


@flower_app.command("run")
def flower_run(
    config: FlowerConfigArg = None,
    server_factory: FlowerServerOpt = None,
    site_factory: FlowerSiteOpt = None,
    run_config: RunConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path, typer.Option("--out", help="Run directory, on the SuperLink's machine.")
    ] = Path("runs/flower"),
    connection: Annotated[
        str | None, typer.Option(help="SuperLink connection in $FLWR_HOME/config.toml.")
    ] = None,
) -> None:
    """Submit CONFIG (or any server job and site) to a running SuperLink with `flwr run`.

    The ServerApp runs on the SuperLink's machine and writes --out there; each SuperNode
    keeps its own files (see docs/deployment.md).
    """
    flower = _flower_module()
    _check_connection(connection)
    out = out.resolve()
    if config is not None and not (server_factory or site_factory) and out.exists():
        _refuse_a_run_in(out)  # seen from here: the SuperLink's machine, or a shared disk
    entries, _ = _flower_entries(
        config, set_, server_factory, site_factory, run_config, run_dir=out, site_out=None
    )
    marker = out / "flower" if config is not None else out
    entries.setdefault("out-dir", str(marker))
    app_dir = flower.write_app_dir(marker / "app", entries)
    result_dir = Path(str(entries["out-dir"]))
    (result_dir / "result.json").unlink(missing_ok=True)  # an earlier run's must not be read
    code, run_id = flower.submit_run(flower.flwr_run_command(app_dir, connection))
    if code != 0 or run_id is None:
        fail(f"flwr run exited with {code}" + ("" if run_id else " before the run started"))
    status = flower.run_status(run_id, connection)
    log_cmd = f"flwr log {run_id}" + (f" {connection}" if connection else "")
    if status is not None and not status[0].endswith("completed"):
        fail(f"Flower run {run_id} ended {status[0]}"
             + (f" ({status[1]})" if status[1] else "") + f"; its log: {log_cmd}")
    try:
        result = flower.load_result(str(result_dir))
    except FileNotFoundError as exc:
        if status is None:
            fail(f"{exc} (if the SuperLink runs on another machine, the result is there; "
                 f"{log_cmd} shows how the run ended)")
        console.print(f"Flower run {run_id} completed; its run directory {out} is on the "
                      "SuperLink's machine", highlight=False, soft_wrap=True)
        return
    _flower_report(out, result)


def _refuse_a_run_in(out: Path) -> None:
    """As ``mmfl train``: one run per run directory (``flower run``, which has no
    ``--overwrite``), checked before Flower starts."""
    from multimodal_fl.rundir import RUN_LOCK, RunDirError, prepare_run_dir

    if out.is_dir() and {e.name for e in out.iterdir()} <= {"flower", RUN_LOCK}:
        return  # the app of a submission that did not start a run: written again
    try:
        prepare_run_dir(out)
    except RunDirError as exc:
        fail(str(exc).replace(" or --overwrite to remove it first", ""))


@flower_app.command("local")
def flower_local(
    config: FlowerConfigArg = None,
    site: Annotated[
        list[Path] | None,
        typer.Option("--site", help="A site directory (repeatable; default: CONFIG's sites)."),
    ] = None,
    server_factory: FlowerServerOpt = None,
    site_factory: FlowerSiteOpt = None,
    run_config: RunConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory.")] = Path("runs/flower"),
    timeout: Annotated[float, typer.Option(min=1, help="Seconds before the run is stopped.")
                       ] = 3600.0,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="With CONFIG: remove the run in --out first.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Run on this machine: a SuperLink and one SuperNode per site, on 127.0.0.1.

    With CONFIG, trains the experiment exactly as `mmfl train CONFIG --engine flower` does
    (the same weights as in process) and writes the same run directory, run.json, report and
    model card included; Flower's own files go to OUT/flower.
    """
    flower = _flower_module()
    out = out.resolve()
    if config is not None and not (server_factory or site_factory):
        _flower_local_experiment(config, site, set_, run_config, out, timeout=timeout,
                                 overwrite=overwrite, quiet=quiet)
        return
    if overwrite:
        fail("--overwrite removes an experiment's run: it needs CONFIG without factories")
    entries, cfg = _flower_entries(
        config, set_, server_factory, site_factory, run_config, run_dir=out, site_out=out
    )
    if site:
        sites = {d.name: d.resolve() for d in site}
        if len(sites) != len(site):
            fail("site directories must have distinct names (they name the sites); got "
                 f"{', '.join(str(d) for d in site)}")
    elif cfg is not None:
        sites = {s.name: Path(s.path) for s in cfg.sites}
    else:
        fail("give the sites: --site DIR (repeatable), or CONFIG")
    for name, path in sites.items():
        if not path.is_dir():
            fail(f"site {name}: directory {path} does not exist or is not a directory")
    work = out / "flower" if config is not None else out
    entries.setdefault("out-dir", str(work / "out"))
    entries["min-nodes"] = len(sites)
    console.print(f"{len(sites)} SuperNodes and a SuperLink on 127.0.0.1; logs in {work}")
    try:
        result = flower.run_loopback(sites, entries, work, timeout=timeout)
    except flower.FlowerRunError as exc:
        fail(str(exc))
    _flower_report(out, result)


def _flower_local_experiment(config: Path, site: list[Path] | None, set_: list[str] | None,
                             run_config: list[str] | None, out: Path, *, timeout: float,
                             overwrite: bool, quiet: bool) -> None:
    """``mmfl flower local CONFIG``: ``mmfl train CONFIG --engine flower`` with the
    deployment's own options (``--timeout``, ``-c`` transport keys)."""
    from multimodal_fl.config import ExperimentConfig

    if site:
        fail("--site with CONFIG: the sites are CONFIG's (change them there, or with "
             "--set); --site names the sites of a --site-factory")
    with _starting(quiet):
        from multimodal_fl.engines.flower_jobs import LoopbackOptions
    cfg = _load(config, set_)
    assert isinstance(cfg, ExperimentConfig)
    try:
        loopback = LoopbackOptions(timeout, _flower_run_config(run_config))
    except ValueError as exc:
        fail(str(exc))
    _train_and_show(cfg, "flower", out=out, overwrite=overwrite, quiet=quiet, loopback=loopback)


@app.command("sample-data")
def sample_data_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (e.g. sample_data).")],
    seed: Annotated[int, typer.Option("--seed", help="Generation seed.")] = 0,
    profile: Annotated[
        str, typer.Option("--profile", help="default (4 sites per task), tiny (tests) or "
                          "scale (--patients over --sites, for benchmarks).")
    ] = "default",
    leaky_encounters: Annotated[bool, typer.Option(
        "--leaky-encounters",
        help="Negative control: the COVID-19 encounter class and stay follow the 72 h label "
             "(as in generator 1.0). Off by default.")] = False,
    patients: Annotated[int | None, typer.Option(
        "--patients", help="scale profile: patients per task (default 1000).")] = None,
    sites: Annotated[int | None, typer.Option(
        "--sites", help="scale profile: sites per task (default 20).")] = None,
) -> None:
    """Write the generated multi-site cohorts (COVID-19 oxygen, Alzheimer's) into OUT."""
    from rich.table import Table

    from multimodal_fl.sample_data import GENERATOR_VERSION, PROFILES, generate

    if profile not in PROFILES:
        fail(f"--profile '{profile}' is not a profile; expected one of {', '.join(PROFILES)}")
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a folder")
    try:
        summaries = generate(out, seed=seed, profile=profile, leaky_encounters=leaky_encounters,
                             patients=patients, sites=sites)
    except ValueError as exc:
        fail(str(exc))
    leaky = ", LEAKY ENCOUNTERS (negative control)" if leaky_encounters else ""
    table = Table(title=f"sample data v{GENERATOR_VERSION} (seed {seed}, {profile}{leaky}) "
                        f"-> {out}")
    for col in ("task", "site", "patients", "positives", "excluded", "images", "notes"):
        table.add_column(col)
    for s in summaries:
        table.add_row(s.task, s.site, str(s.patients), str(s.positives), str(s.excluded),
                      str(s.images), str(s.notes))
    console.print(table)
    console.print(f"routes per site: {out / 'README.md'}; content hashes: {out / 'MANIFEST.json'}")


def main() -> None:
    """Entry point of ``mmfl`` and ``python -m multimodal_fl``.

    A file-system error no command turned into its own message (an output path under a file,
    a folder that cannot be written) ends in one line naming the path, not a traceback.
    SIGTERM (``kill``, ``docker stop``, a batch scheduler's time limit) ends a command as
    Ctrl-C does: a run records that it stopped and releases its lock.
    """
    import signal

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, terminated)
    try:
        app()
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        _print_error(f"{where}{exc.strerror or exc}")
        sys.exit(2)
