"""The public face: one version, every module reachable from ``import pyrovi as pv``, no module
hidden by a function, an API reference that lists everything public, and import arrows that
point down (no cycles, no lower layer importing a higher one).

The import checks read the source with ``ast`` (no imports run), so they see imports inside
functions too: a deferred import hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import types

import pytest

import pyrovi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "pyrovi")


# --------------------------------------------------------------------------- modules


def _all_modules() -> list:
    """Every module and subpackage of pyrovi, dotted, from the files (``pyrovi.models.vae``, ...)."""
    return sorted(m.name for m in pkgutil.walk_packages(pyrovi.__path__, "pyrovi."))


def _public_modules() -> list:
    return [m for m in _all_modules() if not m.rpartition(".")[2].startswith("_")]


TOP_LEVEL = sorted(m.name for m in pkgutil.iter_modules(pyrovi.__path__) if not m.name.startswith("_"))
#: the one known case: ``from .evaluate import evaluate`` in pyrovi/__init__.py hides the module
#: pyrovi/evaluate.py behind the function; the module becomes pyrovi/evaluation.py at merge.
SHADOWED: dict = {}


def _xfail_known(name: str):
    if name in SHADOWED:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=SHADOWED[name]))
    return name


# --------------------------------------------------------------------------- version


def test_version_has_one_home():
    from pyrovi import _version

    assert pyrovi.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", pyrovi.__version__)
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pyrovi._version.__version__"}


def test_installed_metadata_agrees_with_the_package():
    importlib_metadata = pytest.importorskip("importlib.metadata")
    try:
        installed = importlib_metadata.version("pyrovi")
    except importlib_metadata.PackageNotFoundError:
        pytest.skip("pyrovi is not installed (pip install -e .)")
    assert installed == pyrovi.__version__, "reinstall (pip install -e .) after changing pyrovi/_version.py"


# --------------------------------------------------------------------------- reachability and shadowing


@pytest.mark.parametrize("name", [_xfail_known(m) for m in _all_modules()])
def test_no_module_is_shadowed(name):
    """``import pyrovi.X`` is the module X, and ``pyrovi.X`` (when it exists) is that same module."""
    module = importlib.import_module(name)
    assert isinstance(module, types.ModuleType)
    parent, _, short = name.rpartition(".")
    got = getattr(importlib.import_module(parent), short, module)
    assert got is module, f"{parent}.{short} is {type(got).__name__} {got!r}, not the module {name}"


def test_every_module_reachable_from_a_fresh_import_and_import_stays_light():
    """In a fresh interpreter: ``import pyrovi`` loads no matplotlib, yet every module is ``pv.<name>``."""
    names = [m for m in TOP_LEVEL if f"pyrovi.{m}" not in SHADOWED]
    code = (
        "import json, sys, types\n"
        "import pyrovi as pv\n"
        "light = 'matplotlib' not in sys.modules\n"
        f"names = {names!r}\n"
        "bad = [n for n in names if not isinstance(getattr(pv, n, None), types.ModuleType)]\n"
        "missing = [n for n in pv.__all__ if not hasattr(pv, n)]\n"
        "print(json.dumps(dict(light=light, bad=bad, missing=missing, dir_ok=set(names) <= set(dir(pv)))))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"light": True, "bad": [], "missing": [], "dir_ok": True}


def test_all_lists_the_public_modules_and_they_resolve():
    for name in ("data", "models", "guides", "objectives", "priors", "diagnostics", "plots", "report",
                 "distributed", "uses", "fit", "evaluate", "diagnose", "vq_metrics", "load_run", "Run"):
        assert name in pyrovi.__all__, name
    for name in pyrovi.__all__:
        assert getattr(pyrovi, name) is not None
    with pytest.raises(AttributeError):
        pyrovi.no_such_thing  # noqa: B018
    assert getattr(pyrovi, "a.b", None) is None  # not an identifier: no import attempted


def test_vq_metrics_lives_with_evaluation():
    from pyrovi import vq_evaluation

    assert pyrovi.vq_metrics is vq_evaluation.vq_metrics
    assert "vq_metrics" not in pyrovi.models.__all__ and not hasattr(pyrovi.models, "vq_metrics")


# --------------------------------------------------------------------------- reports from a run directory


def test_report_is_drawn_from_the_run_directory(tmp_path, digits, one_thread):
    """``pyrovi.report.write(dir)`` redraws figures and report from the files alone; fit's own
    report goes through the same function."""
    from pyrovi import report
    from pyrovi.checkpoint import read_json, write_json

    model = pyrovi.models.VAE(digits.shape, latent_dim=2, likelihood="bernoulli", hidden=[16])
    guide = pyrovi.guides.DiagNormal(model, hidden=[16])
    out = str(tmp_path / "run")
    run = pyrovi.fit(model, guide, digits, epochs=1, batch_size=256, out=out, progress=False, figures=False)
    assert not os.path.exists(os.path.join(out, "report.md"))
    metrics = read_json(os.path.join(out, "metrics.json"), "metrics")
    write_json(os.path.join(out, "metrics.json"), dict(metrics, written_elsewhere=12.5))  # not in run.metrics
    written = report.write(out)  # a directory: loaded with load_run, data reloaded from config.json
    assert written == ["training_curves.png", "reconstructions.png", "samples.png"]
    for f in written + ["report.md", "report.html"]:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    text = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "| written_elsewhere | 12.5000 |" in text and "![samples](samples.png)" in text
    assert report.write_training_report(run) == written  # the compatibility wrapper
    from pyrovi.cli import main

    os.remove(os.path.join(out, "report.html"))
    assert main(["report", out]) == 0 and os.path.isfile(os.path.join(out, "report.html"))  # pyrovi report RUN
    with pytest.raises(pyrovi.ConfigError, match="run.save"):
        report.write(pyrovi.Run(model, guide, run.objective, run.config))  # in memory: no directory
    with pytest.raises(pyrovi.ConfigError, match="load_run"):
        report.write(run, device="cpu")


# --------------------------------------------------------------------------- API reference


def _api_blocks() -> list:
    """``[(identifier, members)]`` of every ``::: identifier`` block of docs/api.md.

    ``members`` is None when the block renders the whole object, False when none of its
    members, else the list of members it renders.
    """
    import yaml

    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = re.match(r"^::: (\S+)\s*$", line)
        if not m:
            continue
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and not nxt.startswith("    "):
                break
            body.append(nxt[4:])
        opts = (yaml.safe_load("\n".join(body)) or {}).get("options", {}) if body else {}
        blocks.append((m.group(1), opts.get("members")))
    return blocks


def _resolve(ident: str):
    parts = ident.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for p in parts[cut:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(ident)


def test_api_reference_lists_everything_public():
    """Every name in ``pyrovi.__all__`` and in each public module's ``__all__`` is in docs/api.md:
    a block renders it (``::: pyrovi.models.VAE``, or a ``members:`` list), or renders its whole module."""
    blocks = _api_blocks()
    whole = {ident for ident, members in blocks if members is None}
    shown = {}  # identifier -> object, for every object a block renders by name
    for ident, members in blocks:
        shown[ident] = _resolve(ident)
        for m in members or []:
            shown[f"{ident}.{m}"] = _resolve(f"{ident}.{m}")
    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        text = f.read()

    def documented(module_name: str, name: str) -> bool:
        if module_name in whole or f"{module_name}.{name}" in shown:
            return True
        obj = getattr(importlib.import_module(module_name), name)
        if isinstance(obj, str):  # __version__: said in the text
            return f"{module_name}.{name}" in text
        if getattr(obj, "__module__", None) in whole and getattr(obj, "__name__", None) == name:
            return True  # a class or function of a module rendered whole (pyrovi.ConfigError: pyrovi.errors)
        return any(o is obj and ident.rpartition(".")[2] == name for ident, o in shown.items())

    missing = [f"pyrovi.{n}" for n in pyrovi.__all__ if not documented("pyrovi", n)]
    for mod in _public_modules():
        module = importlib.import_module(mod)
        missing += [f"{mod}.{n}" for n in getattr(module, "__all__", []) if not documented(mod, n)]
    assert not missing, f"not in docs/api.md: {missing}"


# --------------------------------------------------------------------------- import arrows

#: Layers, low to high: a module imports only from its own layer or below. Data flows
#: data -> model+guide -> objective -> fit -> run directory -> evaluate / diagnose / plots / CLI;
#: objectives know neither models nor guides, so their layer sits below both.
LAYERS = [
    ("pyrovi._version", "pyrovi.errors"),
    ("pyrovi.checkpoint", "pyrovi.readers", "pyrovi.distributions", "pyrovi.nets", "pyrovi.convnets",
     "pyrovi.callbacks", "pyrovi.loggers", "pyrovi.progress", "pyrovi.images", "pyrovi.precision"),
    ("pyrovi.data",),
    ("pyrovi.inputs", "pyrovi.traces", "pyrovi.stratify", "pyrovi.stop_gradient", "pyrovi.weights",
     "pyrovi.fastpath", "pyrovi.objectives", "pyrovi.enumeration", "pyrovi.vimco", "pyrovi.particles"),
    ("pyrovi.models", "pyrovi.guides"),
    ("pyrovi.run", "pyrovi.run_files", "pyrovi.budget", "pyrovi.generate"),
    ("pyrovi.train_state", "pyrovi.loop", "pyrovi.distributed"),
    ("pyrovi.evaluation", "pyrovi.diagnostics", "pyrovi.vq_evaluation", "pyrovi.uses",
     "pyrovi.sample_quality", "pyrovi.priors"),
    ("pyrovi.plots", "pyrovi.report"),
    ("pyrovi.train", "pyrovi.cli", "pyrovi.__main__", "pyrovi"),  # entry points: fit, like the CLI, ends by drawing the report
]
#: pairs of packages that never import each other: guides know a model only through its sites.
APART = [("pyrovi.models", "pyrovi.guides")]

#: Import arrows known to point the wrong way, all in files whose owners fix them at merge.
#: When one is fixed the test fails until its entry here is deleted.
KNOWN_UPWARD: dict = {}
KNOWN_CYCLES: dict = {}


def _module_files() -> dict:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


@functools.lru_cache(maxsize=None)
def import_graph() -> dict:
    """``{module: {imported module: deferred}}`` over pyrovi's own modules, read with ``ast``.

    ``from . import x`` points at the submodule x when there is one, else at the package
    (``from . import __version__`` is an import of the face). Importing ``a.b.c`` from outside
    package ``a.b`` also runs ``a/b/__init__.py``, so it points at ``a.b`` too (but never at the
    top package ``pyrovi``, which every import passes through). ``deferred``: only inside functions.
    """
    files = _module_files()
    graph: dict = {m: {} for m in files}

    def add(src, dst, deferred):
        targets = [dst]
        parent = dst.rpartition(".")[0]
        while parent.count(".") >= 1 and not src.startswith(parent + "."):
            targets.append(parent)
            parent = parent.rpartition(".")[0]
        for t in targets:
            if t != src and t in files:
                graph[src][t] = graph[src].get(t, True) and deferred

    for mod, path in files.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)

        def visit(node, deferred, mod=mod, is_pkg=is_pkg):
            for ch in ast.iter_child_nodes(node):
                d = deferred or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(ch, ast.ImportFrom):
                    if ch.level:
                        base = mod if is_pkg else mod.rpartition(".")[0]
                        for _ in range(ch.level - 1):
                            base = base.rpartition(".")[0]
                        base = f"{base}.{ch.module}" if ch.module else base
                    else:
                        base = ch.module or ""
                    if base == "pyrovi" or base.startswith("pyrovi."):
                        for a in ch.names:
                            add(mod, f"{base}.{a.name}" if f"{base}.{a.name}" in files else base, d)
                elif isinstance(ch, ast.Import):
                    for a in ch.names:
                        if a.name == "pyrovi" or a.name.startswith("pyrovi."):
                            add(mod, a.name, d)
                visit(ch, d)

        visit(tree, False)
    return graph


def _layer(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        for owner in layer:
            if mod == owner or (owner != "pyrovi" and mod.startswith(owner + ".")):
                return i
    raise AssertionError(f"{mod} has no layer in tests/test_public_face.py LAYERS; add it")


def _owner(mod: str) -> str:
    for layer in LAYERS:
        for owner in layer:
            if mod == owner or (owner != "pyrovi" and mod.startswith(owner + ".")):
                return owner
    return mod


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_every_module_has_a_layer():
    for mod in _module_files():
        _layer(mod)


def test_no_lower_layer_imports_a_higher_one():
    graph = import_graph()
    upward = {}
    for src, dsts in graph.items():
        for dst, deferred in dsts.items():
            if _layer(dst) > _layer(src) or any({_owner(src), _owner(dst)} == set(pair) for pair in APART):
                upward.setdefault((src, dst), deferred)
    new = {k: v for k, v in upward.items() if k not in KNOWN_UPWARD}
    fixed = sorted(k for k in KNOWN_UPWARD if k not in upward)
    assert not new, f"imports pointing up a layer (or across models/guides): {new}"
    assert not fixed, f"fixed, delete from KNOWN_UPWARD: {fixed}"


def test_no_import_cycles():
    cycles = set(_cycles({m: set(d) for m, d in import_graph().items()}))
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    fixed = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not new, f"import cycles (counting imports inside functions): {new}"
    assert not fixed, f"fixed or changed, update KNOWN_CYCLES: {fixed}"


#: modules that still import the package face; their owner switches them to ``._version`` at merge
IMPORTS_FACE: dict = {}


@pytest.mark.parametrize("mod", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=IMPORTS_FACE[m])) if m in IMPORTS_FACE else m
    for m in sorted(_module_files()) if m != "pyrovi"])
def test_no_module_imports_the_package_face(mod):
    """Nothing inside the package imports ``pyrovi/__init__.py`` (the version lives in ``_version``)."""
    assert "pyrovi" not in import_graph()[mod]


if __name__ == "__main__":  # print the graph's problems: python tests/test_public_face.py
    g = import_graph()
    for comp in _cycles({m: set(d) for m, d in g.items()}):
        print("cycle:", sorted(comp))
        for a in sorted(comp):
            for b, deferred in sorted(g[a].items()):
                if b in comp:
                    print(f"    {a} -> {b}{'  (inside a function)' if deferred else ''}")
    for src, dsts in sorted(g.items()):
        for dst, deferred in sorted(dsts.items()):
            if _layer(dst) > _layer(src):
                print(f"upward: {src} -> {dst}{'  (inside a function)' if deferred else ''}")
