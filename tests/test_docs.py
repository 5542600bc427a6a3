"""The docs agree with the tree: docs/layout.md names every module and only files that exist, links and
paths in README.md and docs/ resolve, and the README lists every method. Pure file reading."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "decoders", "teacher_server", "student_trainer")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY = re.compile(r"^(?P<indent> *)(?P<name>\S+)(?: {2,}\S.*)?$")


def layout_tree() -> list[str]:
    """Every path the fenced blocks of docs/layout.md name, built from the indentation (two spaces a level)."""
    paths: list[str] = []
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (REPO / "docs" / "layout.md").read_text(), re.M | re.S)
    for block in blocks:
        parents: list[str] = []
        for line in block.splitlines():
            if not line.strip():
                continue
            m = ENTRY.match(line)
            assert m and len(m["indent"]) % 2 == 0, f"docs/layout.md: not a tree line: {line!r}"
            depth = len(m["indent"]) // 2
            assert depth <= len(parents), f"docs/layout.md: indented under no folder: {line!r}"
            parents = parents[:depth]
            paths.append("".join(parents) + m["name"])
            if m["name"].endswith("/"):
                parents.append(m["name"])
    return paths


def test_layout_names_every_module() -> None:
    named = {p for p in layout_tree() if p.endswith(".py")}
    modules = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")
               if p.name != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, "docs/layout.md does not name: " + ", ".join(missing)


def test_layout_names_only_files_that_exist() -> None:
    gone = [p for p in layout_tree() if not (REPO / p).exists()]
    assert not gone, "docs/layout.md names what is not there: " + ", ".join(gone)


def test_the_init_files_layout_leaves_out_hold_no_code() -> None:
    for package in PACKAGES:
        for init in (REPO / package).rglob("__init__.py"):
            body = ast.parse(init.read_text()).body
            docstring = body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            code = body[1:] if docstring else body
            assert not code, f"{init.relative_to(REPO)} holds code: name it in docs/layout.md"


def anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_relative_links_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path, _, anchor = target.partition("#")
            if re.match(r"[a-z]+:", path):
                continue
            file = (doc.parent / path) if path else doc
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, "\n".join(broken)


def test_paths_the_docs_name_exist() -> None:
    """A file of the repository named in prose (`student_trainer/rollouts/targets.py`, `bench/soak.py:12`)
    is there: a module that moves takes its mentions with it."""
    top = "shared|decoders|teacher_server|student_trainer|tests|bench|scripts|deploy|recipes"
    pattern = re.compile(rf"(?<![\w/.-])((?:{top})/[\w./-]*\.(?:py|sh|yaml|md|txt|jsonl))")
    gone = sorted({f"{doc.relative_to(REPO)}: {p}" for doc in DOCS for p in pattern.findall(doc.read_text())
                   if not (REPO / p).exists()})
    assert not gone, "\n".join(gone)


def test_readme_and_recipes_list_every_method() -> None:
    plan = ast.parse((REPO / "student_trainer" / "methods" / "plan.py").read_text())
    methods = [call.args[0].value for call in ast.walk(plan)
               if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "MethodRow"]
    assert "offline_kd" in methods
    readme = (REPO / "README.md").read_text()
    assert not [m for m in methods if f"`{m}`" not in readme], "README.md: a method is missing from its list"
    for recipe in sorted((REPO / "recipes").rglob("*.yaml")):
        listed = re.search(r"^\s*name: \w+\s+# (.*)$", recipe.read_text(), re.M)
        if listed:
            assert listed[1].split(" | ") == methods, f"{recipe.relative_to(REPO)}: its comment lists {listed[1]}"


def test_readme_fits_a_few_screens() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines: move detail to docs/"
