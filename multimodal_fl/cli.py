"""The ``mmfl`` command line (typer).

Verbs: ``config show|schema``, ``sample-data``, ``data summary``, ``train``, ``pca``,
``report``, ``flower``. Each verb lives in a small function here that calls the
library; bad input ends with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from multimodal_fl.config import ConfigError, config_schema, load_config

app = typer.Typer(
    name="mmfl",
    help="Federated multimodal learning for hospital consortia.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check experiment configurations.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect site data.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config value: a.b=c (repeatable).")
]


def fail(message: str, code: int = 2) -> None:
    """Print an error message to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None) -> object:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


@config_app.command("show")
def config_show(
    config: ConfigArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved configuration (task resolved, site paths absolute)."""
    cfg = _load(config, set_)
    data = cfg.resolved_dict()  # type: ignore[attr-defined]
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON schema of an experiment configuration."""
    sys.stdout.write(json.dumps(config_schema(), indent=2) + "\n")


def main() -> None:
    """Entry point for ``python -m multimodal_fl``."""
    app()
