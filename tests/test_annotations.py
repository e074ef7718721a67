"""Issue #18: the public API carries full type annotations.

Public means: a module-level function whose name has no leading underscore, and every method of a public class whose
name has no leading underscore, plus `__init__` and `__call__`. Fully annotated means: every parameter (except the
receiver `self`/`cls` of a method that is not a staticmethod, and including `*args` / `**kwargs`) has an annotation,
and so does the return value (except for `__init__`). Found with `ast`, so nothing is imported.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "patient"
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
PUBLIC_DUNDERS = ("__init__", "__call__")


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name in PUBLIC_DUNDERS


def _is_staticmethod(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)


def public_functions(tree: ast.Module):
    """`(qualified name, function node, is a method)` for every public function and method at module level."""
    for node in tree.body:
        if isinstance(node, FUNCTIONS) and not node.name.startswith("_"):
            yield node.name, node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, FUNCTIONS) and _is_public(item.name):
                    yield f"{node.name}.{item.name}", item, True


def missing_annotations(source: str, filename: str = "<string>") -> list[str]:
    """`"<line> <name>: <what lacks an annotation>"` for every public function of `source` not fully annotated."""
    out = []
    for name, fn, is_method in public_functions(ast.parse(source, filename)):
        a = fn.args
        params = [*a.posonlyargs, *a.args]
        if is_method and not _is_staticmethod(fn) and params:
            params = params[1:]  # the receiver (self / cls)
        params += a.kwonlyargs
        stars = [f"*{a.vararg.arg}"] if a.vararg is not None and a.vararg.annotation is None else []
        stars += [f"**{a.kwarg.arg}"] if a.kwarg is not None and a.kwarg.annotation is None else []
        missing = [p.arg for p in params if p.annotation is None] + stars
        if fn.returns is None and fn.name != "__init__":
            missing.append("return")
        if missing:
            out.append(f"{fn.lineno} {name}: {', '.join(missing)}")
    return out


def test_the_check_finds_every_kind_of_missing_annotation():
    source = '''
def ok(a: int, *args: int, b: str = "", **kw: float) -> None: ...
def no_return(a: int): ...
def bare(a, b: int, *args, c, **kwargs) -> int: ...
def _private(a): ...
class Public:
    def __init__(self, x): ...
    def __call__(self, x: int): ...
    def method(self, y: int) -> int: ...
    @classmethod
    def make(cls, z) -> "Public": ...
    @staticmethod
    def helper(w) -> int: ...
    def _hidden(self, v): ...
    def __repr__(self): ...
class _Private:
    def method(self, y): ...
'''
    assert missing_annotations(source) == [
        "3 no_return: return",
        "4 bare: a, c, *args, **kwargs",
        "7 Public.__init__: x",
        "8 Public.__call__: return",
        "11 Public.make: z",
        "13 Public.helper: w",
    ]


def test_public_api_is_fully_annotated():
    files = sorted(ROOT.rglob("*.py"))
    assert files, f"no modules under {ROOT}"
    missing = [f"{path.relative_to(ROOT.parent)}:{line}"
               for path in files for line in missing_annotations(path.read_text(), str(path))]
    assert not missing, (f"{len(missing)} public functions/methods lack annotations (line, name: missing):\n"
                         + "\n".join(missing))
