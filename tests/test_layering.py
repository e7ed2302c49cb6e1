"""The package's layers and the one direction of imports, read statically (every import of the package's own
modules, those inside functions included), as docs/ARCHITECTURE.md states them:

    cli -> peft_compat -> modules -> ops -> dispatch -> {torch_row, kernels} -> core

A module may import its own layer and any layer below; torch_row and kernels never import each other; the
package face (fused_lora/__init__.py, __main__.py, backends.py) sits above everything. No import cycle of
any length, no private name (`_x`) imported from another module, and imports of the package's own modules
inside functions only where a face loads an optional part lazily (LoraTrainer needs transformers).
The checker itself is tested on a planted package: an upward import, a cycle, a private name and an inner
import each make it fail (issue 19 item 5)."""
import ast
import os
import textwrap

import pytest

import fused_lora

LAYERS = ["core", ("torch_row", "kernels"), "dispatch", "ops", "modules", "peft_compat", "cli"]
FACES = {"__init__", "__main__", "backends"}  # top-level modules: the package's public faces
ALLOWED_INNER = {("fused_lora", "fused_lora.peft_compat.trainer")}  # LoraTrainer imports transformers


def _rank(layers) -> dict:
    out = {}
    for i, layer in enumerate(layers):
        for name in (layer if isinstance(layer, tuple) else (layer,)):
            out[name] = i
    return out


def _modules(root: str, package: str) -> dict:
    out = {}
    for d, _, files in os.walk(os.path.join(root, package)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: str, module: str, package: str, modules: dict):
    """(imported module, name or None, line, inside a function) for each import of the package's own modules."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(c) for f in funcs for c in ast.walk(f) if isinstance(c, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == package:
                source = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield (sub, None) if sub in modules else (source, alias.name), node.lineno, id(node) in inner
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    yield (alias.name, None), node.lineno, id(node) in inner


def layering_problems(root: str, package: str = "fused_lora", layers=LAYERS, faces=FACES,
                      allowed_inner=ALLOWED_INNER) -> list[str]:
    """Every violation of the rules above in the package at root/package, as readable lines."""
    modules = _modules(root, package)
    rank = _rank(layers)
    problems, edges = [], {m: set() for m in modules}

    def layer_of(name: str):
        parts = name.split(".")
        return parts[1] if len(parts) > 1 and parts[1] not in faces else None  # None: a face

    for module, path in modules.items():
        where = os.path.relpath(path, root)
        for (target, name), line, inside in _imports(path, module, package, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in modules or target == module:
                continue
            edges[module].add(target)
            if name and name.startswith("_") and not name.startswith("__"):
                problems.append(f"{where}:{line}: private name {target}.{name} imported across modules")
            if inside and (module, target) not in allowed_inner:
                problems.append(f"{where}:{line}: {target} imported inside a function")
            src, dst = layer_of(module), layer_of(target)
            if src is None:  # a face may import anything below it
                continue
            if dst is None:
                problems.append(f"{where}:{line}: {module} imports the package face {target}")
            elif src not in rank or dst not in rank:
                problems.append(f"{where}:{line}: {module} -> {target}: a layer outside {list(rank)}")
            elif rank[dst] > rank[src]:
                problems.append(f"{where}:{line}: upward import {src} -> {dst} ({module} imports {target})")
            elif rank[dst] == rank[src] and src != dst:
                problems.append(f"{where}:{line}: {src} and {dst} never import each other ({module} -> {target})")
    # cycles (strongly connected components of more than one module)
    index, low, stack, on, counter = {}, {}, [], set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                problems.append(f"import cycle: {' -> '.join(sorted(component))}")

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return problems


def test_the_package_keeps_its_layers():
    root = os.path.dirname(os.path.dirname(os.path.abspath(fused_lora.__file__)))
    problems = layering_problems(root)
    assert not problems, "\n".join(problems)


def test_every_folder_is_a_layer():
    root = os.path.dirname(os.path.abspath(fused_lora.__file__))
    folders = {d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("__")}
    assert folders == set(_rank(LAYERS)), folders ^ set(_rank(LAYERS))
    tops = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    assert tops == FACES, tops ^ FACES


def _planted(tmp_path, files: dict) -> str:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path)


CLEAN = {"__init__.py": "from .ops.op import run\n", "core/__init__.py": "", "core/math.py": "def f(): pass\n",
         "ops/__init__.py": "", "ops/op.py": "from ..core.math import f\n\ndef run():\n    return f()\n"}


@pytest.mark.parametrize("plant,expect", [
    ({"core/math.py": "from ..ops import op\n"}, "upward import core -> ops"),
    ({"core/math.py": "def g():\n    from ..ops import op\n"}, "imported inside a function"),
    ({"ops/op.py": "from ..core.math import _hidden\n"}, "private name pkg.core.math._hidden"),
    ({"core/math.py": "from .other import g\n", "core/other.py": "from .math import f\n"}, "import cycle"),
    ({"ops/op.py": "from .. import run\n"}, "imports the package face"),
    ({"torch_row/__init__.py": "", "torch_row/a.py": "from ..kernels import b\n", "kernels/__init__.py": "",
      "kernels/b.py": ""}, "never import each other"),
])
def test_the_check_fails_on_a_planted_violation(tmp_path, plant, expect):
    """The checker sees what it is meant to: a clean planted package passes, and each planted violation (an
    upward import, an import inside a function, a private name, a cycle, an import of the face, torch_row
    importing kernels) is reported."""
    assert layering_problems(_planted(tmp_path / "clean", CLEAN), "pkg") == []
    problems = layering_problems(_planted(tmp_path / "bad", {**CLEAN, **plant}), "pkg")
    assert any(expect in p for p in problems), problems
