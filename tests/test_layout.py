"""The package's shape: no import cycles (lazy imports inside functions count too), and each stage a room with one
door: a module named as its stage, from which nothing else takes anything but `run`."""

import ast
import importlib
from pathlib import Path

import pytest

from newsclip.runtime.runner import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "newsclip"
CHECKED = ("newsclip", "tests", "benchmarks", "jobs", "cluster")  # every Python file of the project
STAGES = "newsclip.stages"
# the runner imports each stage's module by name (importlib) to call its `run`
DYNAMIC_IMPORTS = {"newsclip/runtime/runner.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the newsclip modules it imports anywhere in its source (a package import counts as its
    `__init__`; `from package import module` as the module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_each_stage_is_a_module_of_its_name_with_a_run(stage):
    assert callable(importlib.import_module(f"newsclip.stages.{stage}").run)


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _stage_of(module: str) -> str | None:
    """`newsclip.stages.x...` -> `newsclip.stages.x`; None for other modules (and the package itself)."""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[:2] == STAGES.split(".") and len(parts) > 2 else None


class _StageReach(ast.NodeVisitor):
    """Collects where a module takes something other than `run` from a stage module (`own`: the stage it is, if any).

    Names that imports bind to stage modules (or to `newsclip`/`newsclip.stages` on the way to one) are followed
    through their scope, nested functions included unless one rebinds the name as a parameter: each use must be an
    attribute chain that reaches a stage's `run`. Passing the module itself on (to `monkeypatch.setattr`, `getattr`,
    a dict) reaches into it too, so that is a violation as well."""

    def __init__(self, own: str | None):
        self.own = own
        self.found: list[tuple[int, str]] = []

    def visit_Module(self, node: ast.Module) -> None:
        self._scope(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._scope(node)

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def _scope(self, scope: ast.AST) -> None:
        bound: dict[str, str] = {}  # name -> the module it stands for: newsclip, newsclip.stages or a stage
        for node in _own_nodes(scope):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                self._import_from(node, bound)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == STAGES or _stage_of(alias.name):  # binds `newsclip`, or its `as` name
                        bound[alias.asname or "newsclip"] = alias.name if alias.asname else "newsclip"
        for name, module in bound.items():
            self._uses(scope, name, module)
        self.generic_visit(scope)

    def _import_from(self, node: ast.ImportFrom, bound: dict[str, str]) -> None:
        if _stage_of(node.module):
            if _stage_of(node.module) != self.own:
                self.found += [(node.lineno, f"from {node.module} import {alias.name}")
                               for alias in node.names if alias.name != "run"]
            return
        if node.module in (STAGES, "newsclip"):  # from newsclip.stages import x; from newsclip import stages
            for alias in node.names:
                module = f"{node.module}.{alias.name}"
                if module == STAGES or _stage_of(module):
                    bound[alias.asname or alias.name] = module

    def _uses(self, scope: ast.AST, name: str, module: str) -> None:
        """Each use of `name` (standing for `module`) must be a chain of attributes that ends at a stage's `run`."""
        for node in _reachable(scope, name):
            if not (isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)):
                continue
            top = node
            while isinstance(getattr(top, "parent", None), ast.Attribute):
                top = top.parent
            path = module + _dotted(top)[len(name):]
            if not (path == STAGES or path.startswith(f"{STAGES}.")):
                continue  # newsclip.config...: no stage
            parts = path.split(".")
            if _stage_of(path) == self.own and self.own:
                continue
            if len(parts) < 4 or parts[3] != "run":
                self.found.append((node.lineno, f"uses {path}" if len(parts) > 3 else f"passes {path} on"))


def _own_nodes(scope: ast.AST):
    """The nodes of `scope` that are not inside a function nested in it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))


def _reachable(scope: ast.AST, name: str):
    """The nodes under `scope` where `name` still means what the scope bound, skipping functions whose parameters
    rebind it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            arguments = node.args
            if name in {a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                        arguments.vararg, arguments.kwarg] if a}:
                continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _called(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _leading_text(node: ast.expr) -> str:
    """A string constant, or the constant start of an f-string; else ''."""
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""


def stage_reaches(source: str, path: str = "<snippet>") -> list[str]:
    """`path:line: what` for every place `source` takes from a stage module anything but `run`."""
    tree = ast.parse(source, path)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    parts = Path(path).with_suffix("").parts
    own = ".".join(parts) if len(parts) == 3 and ".".join(parts[:2]) == STAGES else None
    visitor = _StageReach(own)
    visitor.visit(tree)
    if path not in DYNAMIC_IMPORTS:  # importlib.import_module("newsclip.stages.x"): its `run` at once, else only
        for node in ast.walk(tree):  # the runner may
            if isinstance(node, ast.Call) and _called(node.func) in ("import_module", "__import__") and node.args \
                    and _leading_text(node.args[0]).startswith(STAGES) \
                    and not (isinstance(node.parent, ast.Attribute) and node.parent.attr == "run"):
                visitor.found.append((node.lineno, f"imports {_leading_text(node.args[0])}... by name"))
    return [f"{path}:{line}: {what}" for line, what in sorted(set(visitor.found))]


def test_nothing_takes_anything_but_run_from_a_stage():
    """Library code two places use lives outside the stages (DESIGN.md, convention 12): no module, test, benchmark
    or job takes from `newsclip/stages/<x>.py` anything but its `run`, eagerly or lazily."""
    files = sorted(p for folder in CHECKED for p in (ROOT / folder).rglob("*.py"))
    found = [line for p in files for line in stage_reaches(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not found, "taken from a stage, which exposes only run:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "from newsclip.stages.knn import _Keys",
    "from newsclip.stages.knn import run, _Keys",
    "def f():\n    from newsclip.stages import knn\n    return knn._Keys",
    "from newsclip.stages import knn as k\nk._Keys()",
    "from newsclip.stages import knn\ndef f(monkeypatch):\n    monkeypatch.setattr(knn, '_Keys', None)",
    "import newsclip.stages.knn\nnewsclip.stages.knn._Keys",
    "import newsclip.stages.knn as k\nk._Keys",
    "from newsclip import stages\nstages.knn._Keys",
    "import importlib\nimportlib.import_module('newsclip.stages.knn')._Keys",
])
def test_the_stage_checker_fails_on_taking_keys_from_a_stage(snippet):
    assert stage_reaches(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "from newsclip.stages.knn import run",
    "from newsclip.stages.knn import run as knn",
    "from newsclip.stages import knn\nknn.run(cfg)\nsteps = {'knn': knn.run}",
    "import newsclip.stages.knn\nnewsclip.stages.knn.run(cfg)\nnewsclip.config.load(None)",
    "from newsclip import stages\nstages.knn.run(cfg)",
    "from newsclip.stages import knn\ndef f(knn):\n    return knn._Keys",  # another knn: the parameter
    "from newsclip.retrieval import fusion\nfusion.rrf",
])
def test_the_stage_checker_passes_on_taking_only_run(snippet):
    assert stage_reaches(snippet) == [], snippet


def test_a_stage_may_use_its_own_names_and_only_the_runner_imports_stages_by_name():
    assert stage_reaches("from newsclip.stages import knn\nknn._Keys", "newsclip/stages/knn.py") == []
    assert stage_reaches("from newsclip.stages import knn\nknn._Keys", "newsclip/stages/evaluate.py")
    dynamic = "import importlib\nmodule = importlib.import_module(f'newsclip.stages.{name}')"
    assert stage_reaches(dynamic, "newsclip/runtime/runner.py") == []
    assert stage_reaches(dynamic, "newsclip/cli.py")
    at_once = "import importlib\nimportlib.import_module(f'newsclip.stages.{name}').run(cfg)"
    assert stage_reaches(at_once, "newsclip/cli.py") == []


# The output layout (DESIGN.md, convention 13): every path under output_dir is named in newsclip/runtime/layout.py.
LAYOUT_MODULE = "newsclip/runtime/layout.py"
# names that mean a path under output_dir wherever they stand as a whole string
LAYOUT_NAMES = {"prepared", "articles.parquet", "candidates.parquet", "articles_all.parquet", "image_hashes.parquet",
                "translated", "rankings", "metrics.json", "metrics.csv", "report.md", "report.html",
                "config.resolved.yaml", "manifest.json", "newsclip.log", ".lock", ".staging", "store-refs"}
# names that are also ordinary words (manifest keys, counts, commands, config sections): a path only where one is
# built: as a `/` operand, an argument of Path(...) or staged_dir(...), or a part of a `/`-separated string (one
# without spaces: a help text that shows users OUTPUT_DIR/logs/ is prose)
PATH_WORDS = {"queries", "rejects", "results", "runs", "logs", "store", "finetune", "embeddings"}
# (file, name) where the name is also a word, not a path: only its uses as a path count there
WORDS = {("newsclip/stages/translate.py", "translated"),  # a column of translate's rows: was the text translated
         ("newsclip/translate/translator.py", "translated"),
         ("benchmarks/nightly.py", "translated"),  # a count in the benchmark's result
         ("newsclip/retrieval/backbone_values.py", "translated")}  # a backbone's texts: original or translated
# (file, name) where the name is a path outside output_dir
ELSEWHERE = {("newsclip/runtime/ray_setup.py", "logs"),  # Ray's session folder
             ("benchmarks/gpu_check.py", "results"),  # benchmarks/results/
             ("benchmarks/encode_throughput.py", "store"),  # a store_dir of the benchmark's own
             ("benchmarks/preprocess_fidelity.py", "store")}
PATH_CALLS = {"Path", "PurePath", "joinpath", "staged_dir"}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that stand alone as statements (docstrings): prose, not paths."""
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def layout_literals(source: str, path: str = "<snippet>") -> list[str]:
    """`path:line: 'name'` for every place `source` spells a name of the output layout as a string."""
    tree = ast.parse(source, path)
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node
    prose, found = _docstrings(tree), []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in prose:
            continue
        parent = getattr(node, "parent", None)
        piece = isinstance(parent, ast.JoinedStr)  # the constant part of an f-string
        holder = parent.parent if piece else parent
        joined = "/" in node.value and not any(c.isspace() for c in node.value)
        as_path = joined or (isinstance(holder, ast.BinOp) and isinstance(holder.op, ast.Div)) \
            or (isinstance(holder, ast.Call) and _called(holder.func) in PATH_CALLS)
        for name in set(node.value.split("/")) if joined else {node.value}:
            if (path, name) in ELSEWHERE or (path, name) in WORDS and not as_path:
                continue
            if name in LAYOUT_NAMES or (name in PATH_WORDS and as_path):
                found.append(f"{path}:{node.lineno}: {name!r}")
    return sorted(set(found))


def test_every_path_under_output_dir_is_named_by_the_layout():
    """Stages, runtime, report, finetune, the CLI, jobs and benchmarks take their paths under output_dir from
    `newsclip.runtime.layout` (tests may spell them: they check the contract from outside)."""
    files = sorted(p for folder in ("newsclip", "jobs", "benchmarks") for p in (ROOT / folder).rglob("*.py")
                   if p.relative_to(ROOT).as_posix() != LAYOUT_MODULE)
    found = [line for p in files for line in layout_literals(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not found, "a path under output_dir spelled out; name it with newsclip.runtime.layout:\n" + "\n".join(found)


def test_the_checked_names_are_the_layouts():
    """Each name the check looks for is one the layout module spells (so the two lists move together)."""
    tree = ast.parse((ROOT / LAYOUT_MODULE).read_text())
    spelled = {part for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
               for part in node.value.split("/")}
    missing = (LAYOUT_NAMES | PATH_WORDS) - spelled
    assert not missing, sorted(missing)


@pytest.mark.parametrize("snippet", [
    "out / 'prepared' / 'candidates.parquet'",
    "json.loads((out / 'manifest.json').read_text())",
    "f'embeddings/{name}/{side}'",
    "f'{out}/metrics.json'",
    "staged_dir(out, 'translated')",
    "out / 'runs' / f'{run_id}.json'",
    "Path(out, 'rejects')",
    "PREPARED = ('prepared/articles.parquet',)",
    "for folder in ('translated', 'prepared/queries'): pass",
])
def test_the_layout_check_finds_a_spelled_path(snippet):
    assert layout_literals(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "counts = {'queries': 0, 'runs': []}",  # dict keys: words, not paths
    "record['runs'][-1]",
    "sub.add_parser('rejects', help='summarise the rejected rows')",
    "raise ValueError(f'no rankings under {folder}: run knn first')",
    "p.add_argument('-v', help='besides OUTPUT_DIR/logs/ where they always go')",
    "def f():\n    '''Reads prepared/queries and writes rankings/<stem>.tsv.'''",
    "out = layout.prepared.candidates",
])
def test_the_layout_check_passes_words_that_are_no_paths(snippet):
    assert layout_literals(snippet) == [], snippet


def test_a_column_named_as_a_folder_is_a_path_only_where_one_is_built():
    assert layout_literals("kept.filter('translated')", "newsclip/stages/translate.py") == []
    assert layout_literals("staged_dir(out, 'translated')", "newsclip/stages/translate.py")
    assert layout_literals("kept.filter('translated')", "newsclip/stages/knn.py")
