"""Write docs/configuration.md's field reference from the pydantic models.

Run ``python scripts/gen_config_docs.py`` after changing ``multimodal_fl/config.py``;
``tests/test_config.py`` fails when the committed page is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal_fl.config import ExperimentConfig, TaskSpec  # noqa: E402

BEGIN = "<!-- BEGIN GENERATED FIELD REFERENCE -->"
END = "<!-- END GENERATED FIELD REFERENCE -->"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "")
    text = text.replace("datetime.", "").replace("multimodal_fl.config.", "")
    return text.replace("<class '", "").replace("'>", "").replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`"


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _sub_model(arg)
        if found is not None:
            return found
    return None


def render(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    """Append one table per model, depth first."""
    out.append(f"\n### `{prefix or '<root>'}` ({model.__name__})\n")
    doc = (model.__doc__ or "").strip().splitlines()
    if doc:
        out.append(doc[0] + "\n")
    out.append("| key | type | default | meaning |")
    out.append("| --- | --- | --- | --- |")
    subs: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
        sub = _sub_model(field.annotation)
        if sub is not None and not (model is ExperimentConfig and name == "task"):
            key = f"{prefix}.{name}" if prefix else name
            if str(field.annotation).startswith("list["):
                key += "[]"
            subs.append((key, sub))
    for key, sub in subs:
        render(sub, key, out)


def generate() -> str:
    """The generated reference section (between the markers)."""
    out: list[str] = [BEGIN, "\n## Experiment file"]
    render(ExperimentConfig, "", out)
    out.append("\n## Task file (`task:` inline, a path, or a shipped name)")
    render(TaskSpec, "task", out)
    out.append("\n" + END)
    return "\n".join(out) + "\n"


def main() -> None:
    """Rewrite the generated part of docs/configuration.md in place."""
    path = ROOT / "docs" / "configuration.md"
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + generate() + tail.lstrip("\n"))


if __name__ == "__main__":
    main()
