"""Build the API reference (HTML) from the docstrings with pdoc; any warning fails the build.

    python docs/build_api.py                 # writes docs/api-html/ (git-ignored), exit 1 on any warning
    python docs/build_api.py --out DIR

Every public module of this checkout's ``ovss_fast`` is documented (private ones, ``_name``, are left out).
Two kinds of problem fail the build (exit status 1, each named on stderr):

- a warning raised while pdoc imports and renders the modules (a module that does not import, a name in
  ``__all__`` that does not resolve, a docstring pdoc cannot process, or any other warning);
- a cross-reference in a docstring (``:func:`x```, ``:mod:`x```, ``:class:`x```, ``:meth:`x```, ...) that names
  nothing: pdoc itself renders such a name as plain code without a word, so the script resolves each one, the
  way Sphinx would: absolute (``ovss_fast.ops.api.discrepancy``), relative to the package (``.dispatch``), or
  from the docstring's class and module (``seg``, ``HeadOptions``).

CI runs it after lint and before the tests (.ci/run); it needs the ``test`` extra (pdoc, and the optional
packages some modules import: open_clip, diffusers, gradio, triton).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ovss_fast"
ROLE = re.compile(r"(?::py)?:(mod|func|data|const|class|meth|attr|exc|obj):`([^`]+)`")


def public_modules() -> list[str]:
    """``ovss_fast`` and every submodule none of whose name parts starts with ``_``."""
    package = importlib.import_module(PACKAGE)
    names = [PACKAGE]
    for info in pkgutil.walk_packages(package.__path__, f"{PACKAGE}."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def resolve_lazy_exports(module: ModuleType) -> None:
    """Put the names ``__all__`` loads lazily (``ovss_fast.Segmenter``: a module ``__getattr__``) into the
    module's namespace, where pdoc looks for them; what ``import ovss_fast`` does is unchanged."""
    for name in getattr(module, "__all__", ()):
        if name not in vars(module):
            setattr(module, name, getattr(module, name))


def _attribute_path(obj: object, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(obj, ModuleType) and not hasattr(obj, part):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
                continue
            except ImportError:
                return False
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _import_prefix(name: str) -> tuple[ModuleType, list[str]] | None:
    """The longest importable module prefix of a dotted name, and the attribute path after it."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            return importlib.import_module(".".join(parts[:cut])), parts[cut:]
        except ImportError:
            continue
    return None


def resolves(target: str, module: ModuleType, cls: type | None) -> bool:
    """Whether a docstring reference names something, seen from ``module`` (and ``cls`` when the docstring is a
    class's or a method's)."""
    name = target.strip().lstrip("~").removesuffix("()")
    if name.startswith("."):
        package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
        dots = len(name) - len(name.lstrip("."))
        base = package.rsplit(".", dots - 1)[0] if dots > 1 else package
        name = f"{base}.{name.lstrip('.')}"
    head, *rest = name.split(".")
    if cls is not None and any(head in vars(k) for k in cls.__mro__):
        return _attribute_path(cls, [head, *rest])
    if head in vars(module):
        return _attribute_path(vars(module)[head], rest)
    found = _import_prefix(name)
    return found is not None and _attribute_path(found[0], found[1])


def _private(name: str) -> bool:
    """pdoc leaves ``_name`` out of the pages (not ``__init__``), so the check does too."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_docstring(obj: object) -> str:
    doc = getattr(obj, "__doc__", None) if isinstance(obj, (type, ModuleType)) or callable(obj) else None
    if isinstance(obj, (classmethod, staticmethod)):
        doc = obj.__func__.__doc__
    return doc if isinstance(doc, str) else ""


def broken_references(all_modules: dict) -> list[str]:
    """Every docstring reference that names nothing, as ``module.object: :role:`target```."""
    import pdoc.doc

    broken = []

    def visit(doc: pdoc.doc.Doc, module: ModuleType, cls: type | None) -> None:
        if doc.taken_from[0] != module.__name__:
            return  # imported from elsewhere: checked where it is defined
        if isinstance(doc, pdoc.doc.Class):
            cls = doc.obj
        # the object's own docstring: pdoc shows an inherited one (torch's nn.Module.forward) that is not ours
        own = doc.docstring if isinstance(doc, pdoc.doc.Variable) else _own_docstring(doc.obj)
        for role, target in ROLE.findall(own):
            if not resolves(target, module, cls):
                broken.append(f"{doc.fullname}: :{role}:`{target}`")
        if isinstance(doc, (pdoc.doc.Class, pdoc.doc.Module)):
            for member in doc.own_members:
                if not isinstance(member, pdoc.doc.Module) and not _private(member.name):
                    visit(member, module, cls)

    for module_doc in all_modules.values():
        visit(module_doc, module_doc.obj, None)
    return broken


def build(out: Path) -> list[str]:
    """Render every public module into ``out``; returns the problems found (empty: the build is good)."""
    import pdoc
    import pdoc.doc
    import pdoc.render

    sys.path.insert(0, str(ROOT))  # document this checkout, whatever is installed
    importlib.invalidate_caches()
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        package = importlib.import_module(PACKAGE)
        if Path(package.__file__).resolve().parents[1] != ROOT:
            return [f"imported {package.__file__}, not this checkout's package ({ROOT / PACKAGE})"]
        resolve_lazy_exports(package)
        pdoc.render.configure(docformat="restructuredtext", show_source=True)
        all_modules = {name: pdoc.doc.Module.from_name(name) for name in public_modules()}
        out.mkdir(parents=True, exist_ok=True)
        for module in all_modules.values():
            page = out / f"{module.fullname.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(pdoc.render.html_module(module, all_modules))
        (out / "index.html").write_text(pdoc.render.html_index(all_modules))
        (out / "search.js").write_text(pdoc.render.search_index(all_modules))
        problems += broken_references(all_modules)
    for w in caught:
        problems.insert(0, f"warning ({w.category.__name__}, {w.filename}:{w.lineno}): {w.message}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "api-html", help="output folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    problems = build(args.out)
    for problem in problems:
        print(f"docs/build_api.py: {problem}", file=sys.stderr)
    if problems:
        print(f"docs/build_api.py: FAILED, {len(problems)} problem(s) (warnings are errors)", file=sys.stderr)
        return 1
    pages = sum(1 for _ in args.out.rglob("*.html"))
    print(f"API reference: {pages} pages in {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
