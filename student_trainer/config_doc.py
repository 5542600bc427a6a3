"""The config reference, read from the pydantic models in config.py: one source for three readers.

`trb-train --print-config` prints a resolved config as commented YAML (a file you can edit and
pass back with --config), docs/config.md is generated from the same walk, and `trb-train --help`
lists the methods (methods/plan.py's table). A field added to config.py appears in all three; its `description=` is the
one-line meaning (tests/student_trainer/test_config_doc.py fails for a field without one).

Regenerate the doc: `make config-doc` (python -m student_trainer.config_doc --write docs/config.md).
"""

from __future__ import annotations

import argparse
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from student_trainer.config import Config
from student_trainer.methods.plan import METHODS

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = "make config-doc"

def methods_help() -> str:
    """The method table as plain text for `--help`."""
    lines = ["methods (method.name; π̂_T is the teacher's top-k completed in the student's shape):"]
    for row in METHODS:
        fields = (row.behavior, row.loss, row.knobs, row.teacher_calls)
        for i, (label, text) in enumerate(zip(("behavior", "loss", "knobs", "teacher calls"), fields, strict=True)):
            first = f"  {row.name:<16}" if i == 0 else " " * 18
            lines.append(textwrap.fill(f"{label}: {text}", 100, initial_indent=first, subsequent_indent=" " * 20))
    return "\n".join(lines + ["", "Full descriptions and sources: docs/methods.md."])


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted name, type, default, meaning."""

    key: str
    type: str
    default: str
    description: str
    field: FieldInfo


def _yaml(value: Any) -> str:
    """A value as one line of flow-style YAML (what --set and a config file accept)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


_BOUNDS = [(annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<")]


def type_text(field: FieldInfo) -> str:
    """The annotation, plus bounds such as `>= 1`."""
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata for cls, attr, sign in _BOUNDS
              if isinstance(m, cls)]
    return " ".join([_type_name(field.annotation), *bounds])


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def default_text(field: FieldInfo) -> str:
    if "doc_default" in _extra(field):
        return str(_extra(field)["doc_default"])
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return _yaml(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "required"
    value = field.default.model_dump(mode="json") if isinstance(field.default, BaseModel) else field.default
    return _yaml(list(value) if isinstance(value, tuple) else value)


def _section(tp: Any) -> type[BaseModel] | None:
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def sections(model: type[BaseModel] = Config) -> Iterator[tuple[str, type[BaseModel]]]:
    """(name, section model) of each top-level section, in declaration order."""
    for name, field in model.model_fields.items():
        if (section := _section(field.annotation)) is not None:
            yield name, section


def keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[KeyDoc]:
    """Every leaf key of the config, depth first, in declaration order."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if (section := _section(field.annotation)) is not None:
            yield from keys(section, key + ".")
        else:
            yield KeyDoc(key, type_text(field), default_text(field), field.description or "", field)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


# ---- commented YAML (trb-train --print-config) ---------------------------------------------
def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, width=110, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")


def commented_yaml(cfg: Config | None = None) -> str:
    """The config as YAML with each key's meaning, type and default above it; defaults when `cfg` is None.

    Secret keys (teacher.api_key) are printed commented out and never with their value, so the
    output can be shared and passed back with --config without pinning a key.
    """
    lines = ["# trb-train config" + (" (resolved from --config and --set)" if cfg else " (the defaults)")
             + ": every key with its meaning, [type; default].",
             f"# Reference: docs/config.md (regenerate: {REGENERATE}). Use: trb-train --config FILE.", ""]
    lines += _yaml_lines(Config, cfg.model_dump(mode="json") if cfg is not None else None, "")
    return "\n".join(lines)


def _yaml_lines(model: type[BaseModel], values: dict[str, Any] | None, indent: str) -> list[str]:
    """One model's keys at `indent`, sections nested (`values` None: the defaults)."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        value = values.get(name) if values is not None else None
        if (section := _section(field.annotation)) is not None:
            lines += [f"{indent}{name}:  # {_first_line(section.__doc__)}"]
            lines += _yaml_lines(section, value if values is not None else None, indent + "  ")
            lines += [""] if not indent else []
            continue
        default = default_text(field)
        default = default if default == "required" else f"default {default}"
        lines += _comment(f"{field.description or ''} [{type_text(field)}; {default}]", indent)
        if values is None:
            value = _default_value(field)
        if _extra(field).get("secret"):
            shown = "<hidden>" if value else "null"
            lines += [f"{indent}# {name}: {shown}  (secret: never printed; uncomment to set one here)"]
        else:
            lines += [f"{indent}{name}: {_yaml(value)}"]
    return lines


def _default_value(field: FieldInfo) -> Any:
    if field.is_required():
        return None
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return list(field.default) if isinstance(field.default, tuple) else field.default


# ---- docs/config.md -------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def methods_table() -> list[str]:
    """The method table (methods/plan.py) as markdown lines: docs/config.md and docs/methods.md hold it."""
    out = ["| `method.name` | behavior policy | loss | knobs (`method.*`) | teacher calls |",
           "| --- | --- | --- | --- | --- |"]
    return out + [f"| `{r.name}` | " + " | ".join(map(_cell, (r.behavior, r.loss, r.knobs, r.teacher_calls))) + " |"
                  for r in METHODS]


def markdown() -> str:
    """docs/config.md: one table per section (key, type, default, meaning), then the methods."""
    out = ["# Config reference", "",
           f"Generated from `student_trainer/config.py` by `{REGENERATE}` (or `python -m "
           "student_trainer.config_doc --write docs/config.md`); do not edit by hand, a test checks it is current.",
           "",
           "Every key of a `trb-train` config. Set them in a YAML file (`--config`, see `recipes/`) or one",
           "at a time with `--set section.key=value` (the value is read as YAML). Unknown keys are refused",
           "with their dotted name. `trb-train --print-config` prints a resolved config in this form as",
           "commented YAML; `trb-train --check` validates a config, loads the student, reaches the teacher,",
           "checks the tokenizers and the data, and prints what the run would do, without training.", ""]
    for name, section in sections():
        out += [f"## {name}", "", _first_line(section.__doc__), "",
                "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{name}.{d.key}` | `{_cell(d.type)}` | `{_cell(d.default)}` | {_cell(d.description)} |"
                for d in keys(section, "")]
        out += [""]
    out += ["## Methods (`method.name`)", "", *methods_table(), "", "Details and sources: [methods.md](methods.md)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print (or --write) the config reference, docs/config.md.")
    parser.add_argument("--write", type=Path, help="Write it to this file instead of printing it.")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(markdown())
    else:
        print(markdown(), end="")


if __name__ == "__main__":
    main()
