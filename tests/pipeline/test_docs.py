"""docs/ stand alone: every ``docs/<file>.md#anchor`` cited in the repository (code, notebooks,
README, params, profiles, tests, docs) names an existing file and one of its headings, links
between the docs resolve, and no text file refers to the project's notes outside the
repository (only the offline data under ../shared/data may be named)."""

import re
import subprocess
from pathlib import Path

from markdown_it import MarkdownIt
from mdit_py_plugins.anchors import anchors_plugin

from replication.pipeline.parameters import load_yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
# "docs/<file>.md" optionally followed by "#anchor" (anchors: GitHub slugs, letters, digits, -, _)
CITATION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
# Markdown link targets inside docs/*.md: (file.md), (file.md#anchor) or (#anchor)
LINK = re.compile(r"\]\(((?:[\w.-]+\.md)?(?:#[\w-]+)?)\)")
# The external notes, spelt in two pieces so that this file does not match itself.
NOTES = "REPLI" + "CATION.md"
OUTSIDE = re.compile(r"\.\./shared/(?!data\b)")  # a path into ../shared outside its data folder
SKIP_DIRS = {".git", ".venv", ".dvc", "results", "data", "__pycache__", ".pytest_cache"}


def heading_anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of every heading (level 1-6) of a Markdown text, duplicates
    numbered -1, -2, ... as GitHub does (markdown-it-py with mdit-py-plugins' anchors)."""
    md = MarkdownIt("commonmark").use(anchors_plugin, min_level=1, max_level=6)
    return {t.attrGet("id") for t in md.parse(markdown) if t.type == "heading_open"}


def broken_citations(texts: dict[str, str], docs_dir: Path) -> list[str]:
    """Citations in ``texts`` (name -> content) of files or anchors missing from ``docs_dir``,
    and, for texts that are themselves docs/*.md, their relative links; one message each."""
    anchors: dict[str, set[str] | None] = {}

    def check(where: str, doc: str, anchor: str | None, shown: str) -> str | None:
        if doc not in anchors:
            path = docs_dir / doc
            anchors[doc] = heading_anchors(path.read_text(encoding="utf-8")) if path.is_file() else None
        if anchors[doc] is None:
            return f"{where}: {shown}: no file docs/{doc}"
        if anchor and anchor not in anchors[doc]:
            return (f"{where}: {shown}: no heading with anchor #{anchor} in docs/{doc} "
                    f"(anchors: {', '.join(sorted(anchors[doc]))})")
        return None

    problems = []
    for name, text in texts.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{name}:{lineno}"
            found = [(m.group(1), m.group(2), m.group(0)) for m in CITATION.finditer(line)]
            if name.startswith("docs/") and name.endswith(".md"):
                for m in LINK.finditer(line):
                    target, _, anchor = m.group(1).partition("#")
                    found.append((target or name.removeprefix("docs/"), anchor or None, m.group(1)))
            for doc, anchor, shown in found:
                problem = check(where, doc, anchor, shown)
                if problem:
                    problems.append(problem)
    return problems


def _generated_outputs() -> set[str]:
    """Outs of the dvc.yaml stages (``${paths.x}`` resolved from its vars): files the pipeline
    writes, e.g. figures/*.md with their captions. They follow the code that writes them (which
    is checked here) at the next ``dvc repro``, so they are not checked themselves."""
    dvc = load_yaml(REPO / "dvc.yaml")
    names = {}
    for block in dvc.get("vars", []):
        for group, values in block.items():
            for key, value in values.items():
                names[f"${{{group}.{key}}}"] = str(value)
    outs = set()
    for stage in dvc.get("stages", {}).values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            outs.add(re.sub(r"\$\{[\w.]+\}", lambda m: names[m.group(0)], path))
    return outs


def repository_texts() -> dict[str, str]:
    """Every UTF-8 text file git tracks or would track (untracked but not ignored), relative
    path -> content, except the pipeline's generated outputs. Without git (an unpacked copy),
    every file outside SKIP_DIRS."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                  if p.is_file() and not SKIP_DIRS & set(p.relative_to(REPO).parts)]
    generated = _generated_outputs()
    texts = {}
    for name in sorted(filter(None, listed)):
        path = REPO / name
        if name in generated or any(name.startswith(out + "/") for out in generated):
            continue
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def test_repository_citations_resolve():
    texts = repository_texts()
    assert {"README.md", "params.yaml", "docs/method.md"} <= texts.keys()
    cited = sum(len(CITATION.findall(t)) for t in texts.values())
    assert cited >= 50, f"only {cited} citations of docs/ found: is the scan reading the code?"
    problems = broken_citations(texts, DOCS)
    assert not problems, "\n".join(problems)


def test_no_reference_to_notes_outside_the_repository():
    hits = [f"{name}:{lineno}: {line.strip()[:120]}"
            for name, text in repository_texts().items()
            for lineno, line in enumerate(text.splitlines(), 1)
            if NOTES in line or OUTSIDE.search(line)]
    assert not hits, "references to notes outside the repository:\n" + "\n".join(hits)


def test_checker_reports_misspelt_anchor_and_missing_file(tmp_path):
    guide = "# Guide\n\n## Radius search\n\n## Radius search\n\n```\n## not a heading\n```\n"
    (tmp_path / "guide.md").write_text(guide + "\nSee [x](#radius-search-1).\n")
    # names built in pieces, so that the scan of the repository does not see them here
    cite, missing = "docs/" + "guide.md", "docs/" + "nowhere.md"
    texts = {
        "a.py": f"# ok {cite}#radius-search, ok {cite}#radius-search-1, ok {cite}\n",
        "b.py": f"# misspelt {cite}#radius-serch\n",
        "c.py": f"# fenced code is no heading {cite}#not-a-heading\n",
        "d.py": f"# missing {missing}#x\n",
        cite: guide + "[ok](#radius-search-1) [bad](#nope) [bad](other.md)\n",
    }
    problems = broken_citations(texts, tmp_path)
    assert [p.split(":")[0] for p in problems] == ["b.py", "c.py", "d.py", cite, cite], problems
    assert "#radius-serch" in problems[0] and "radius-search-1" in problems[0]
    assert f"no file {missing}" in problems[2]
    assert "#nope" in problems[3] and "other.md" in problems[4]
