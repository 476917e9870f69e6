"""The README and docs/ pages stay true: every relative link and every repository path they name exists,
docs/index.md lists every page, and the API reference build (docs/build_api.py) catches broken
docstring references. The build itself runs in CI (.ci/run), not here: it imports every module."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted(DOCS.glob("*.md"))]

# Pages that other branches add (linked from docs/index.md already). A link to one of them is accepted only
# while the page is absent; once it exists it is checked like any other. Empty this set when they have landed.
PENDING: set[Path] = set()  # pages linked before they exist (none now)

# files the code writes, named in the docs as outputs: bench/bench_discrepancy.py --device cuda appends here
OUTPUTS = {"bench/results_gpu.json"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w/.:-])((?:ovss_fast|csrc|bench|tests|docs)/[\w./*{},<>-]*[\w}>/])")


def prose(page: Path) -> str:
    """The page without fenced code blocks (commands there are not links)."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", prose(page), re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", prose(page))  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if dest in PENDING and not dest.exists():
            continue
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_in_the_docs_exist(page):
    missing = []
    for path in PATH.findall(page.read_text()):
        if re.search(r"[*{<]|NAME", path) or path.startswith("docs/api-html") or path in OUTPUTS:
            continue  # a pattern or a placeholder; the built, git-ignored reference; an output
        if not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_index_lists_every_docs_page_and_the_readme_links_the_index():
    listed = {(DOCS / t.partition("#")[0]).resolve() for t in links(DOCS / "index.md")}
    unlisted = [p.name for p in DOCS.glob("*.md") if p != DOCS / "index.md" and p.resolve() not in listed]
    assert not unlisted, f"docs/index.md does not link {unlisted}"
    assert "docs/index.md" in links(ROOT / "README.md")


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into a docs/ page"


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_user_pages_name_no_issue_numbers(page):
    # the docs say what is true now; the history is in git and the dated measurements in bench/RESULTS.md
    found = re.findall(r"\bissues? #?\d+", page.read_text(), re.I)
    assert not found, f"{page.relative_to(ROOT)} names {found}"


def build_api():
    spec = importlib.util.spec_from_file_location("build_api", DOCS / "build_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_build_resolves_docstring_references_and_flags_broken_ones():
    api = build_api()
    import ovss_fast.kernels
    import ovss_fast.ops.options

    kernels = ovss_fast.kernels
    assert api.resolves("ovss_fast.kernels.reference.pamr", ovss_fast, None)
    assert api.resolves("~ovss_fast.ops.options.HeadOptions", ovss_fast, None)
    assert api.resolves(".dispatch", kernels, None)  # relative to the package
    assert api.resolves("HeadOptions", ovss_fast.ops.options, None)  # a name of the docstring's module
    assert api.resolves("from_kwargs()", ovss_fast.ops.options, ovss_fast.ops.options.HeadOptions) == hasattr(
        ovss_fast.ops.options.HeadOptions, "from_kwargs")
    # what the package re-layout left behind must fail the build
    assert not api.resolves("ovss_fast.reference", ovss_fast, None)
    assert not api.resolves(".nothing_here", kernels, None)
    assert not api.resolves("HeadOptions.no_such_field", ovss_fast.ops.options, None)


def test_api_build_documents_every_public_module():
    modules = build_api().public_modules()
    assert {"ovss_fast", "ovss_fast.ops", "ovss_fast.kernels.reference", "ovss_fast.pipeline.segmenter"} <= set(
        modules)
    assert not [m for m in modules if any(part.startswith("_") for part in m.split("."))]
