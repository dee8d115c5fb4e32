"""The code's shape: a docstring atop every module, the README's layout = the tree, no import cycle, and the
shared library (trainer/clip) imports neither deepspeed, ray nor any stage; stages import only its public modules."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "trainer", "indexing", "raykit")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path) -> set[str]:
    """Every module name an import statement names, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _internal_edges() -> dict[str, set[str]]:
    mods = _modules()
    edges = {}
    for m, p in mods.items():
        targets = set()
        for name in _imports(p):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m and not m.startswith(name + "."):
                targets.add(name)
        edges[m] = targets
    return edges


def test_every_module_starts_with_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in _modules().values()
               if not (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, missing


def test_no_import_cycle():
    edges, state, path = _internal_edges(), {}, []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(edges[u]):
            assert state.get(v) != 1, " -> ".join(path[path.index(v):] + [v])
            if v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_shared_library_stands_alone_and_stages_use_only_it():
    for m, p in _modules().items():
        names = _imports(p)
        if m.startswith("trainer.clip"):
            bad = {n for n in names if n.split(".")[0] in ("deepspeed", "ray", "pipeline", "indexing")
                   or (n.startswith("trainer.") and not n.startswith("trainer.clip"))}
            assert not bad, (m, bad)
        elif m.startswith("raykit"):  # the Ray runtime the stages share: no stage, no trainer, no deepspeed
            bad = {n for n in names if n.split(".")[0] in ("deepspeed", "pipeline", "indexing")
                   or (n.startswith("trainer.") and not n.startswith("trainer.clip"))}
            assert not bad, (m, bad)
        elif m.startswith(("pipeline", "indexing")):
            other = {n for n in names if n.startswith("trainer.") and not n.startswith("trainer.clip")
                     and n != "trainer.train"}  # the demo runs the train stage through its CLI's main()
            assert not other, (m, other)
            foreign = "indexing" if m.startswith("pipeline") else "pipeline"
            if m != "pipeline.demo":  # the demo drives every stage through its public main(argv)
                assert not {n for n in names if n.split(".")[0] == foreign}, m


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Layout\n+```\n(.*?)```", readme, re.S).group(1)
    listed = {}
    for line in block.splitlines():
        head, _, rest = line.partition(" ")
        if head.endswith("/"):
            current = head
        listed.setdefault(current, set()).update(re.findall(r"[\w]+\.py|[\w]+/", rest))
    formats = {p.name for p in (ROOT / "trainer/clip/formats").glob("*.py") if p.name != "__init__.py"}
    for pkg in ("pipeline/", "trainer/", "indexing/", "raykit/", "trainer/clip/"):
        files = {p.name for p in (ROOT / pkg).iterdir() if p.suffix == ".py" and p.name != "__init__.py"}
        files |= formats if pkg == "trainer/clip/" else set()
        names = {n for n in listed.get(pkg, set()) if n.endswith(".py")}
        assert files == names, (pkg, "not in the README:", sorted(files - names), "not in the tree:",
                                sorted(names - files))
    for d in ("infra/", "bench/", "tests/", "docs/"):
        assert d in listed and (ROOT / d).is_dir(), d


def test_importing_the_shared_library_loads_no_deepspeed_or_ray():
    import subprocess
    import sys

    mods = sorted(m for m in _modules() if m.startswith("trainer.clip"))
    code = (f"import sys; import {', '.join(mods)}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'ray'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
