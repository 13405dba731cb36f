"""The package layers: which package may import which (written once, here, as data; the README's Layout table shows
the same), model files free of our code, and inference free of training code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# package -> the packages it may import (each layer imports only down). A string "pkg.module:attr" and
# importlib.import_module("pkg...") count as imports.
ALLOWED: dict[str, set[str]] = {
    "zh_t2i_base": set(),
    "form_data": {"zh_t2i_base"},
    "train_runtime": {"zh_t2i_base"},
    "vae_train": {"zh_t2i_base", "form_data", "train_runtime"},
    "clip_train": {"zh_t2i_base", "form_data", "train_runtime"},
    "brivl_infer": {"zh_t2i_base", "form_data"},
    "styled_vq": {"zh_t2i_base", "form_data", "train_runtime", "vae_train"},
    "dalle_train": {"zh_t2i_base", "form_data", "train_runtime", "vae_train"},
    "zh_t2i_rerank": {"zh_t2i_base", "form_data", "clip_train", "brivl_infer"},
    "zh_t2i_demo": {"zh_t2i_base", "form_data"},
    "zh_t2i_eval": {"zh_t2i_base", "form_data", "zh_t2i_rerank", "zh_t2i_demo"},
    "dalle_gen": {"zh_t2i_base", "dalle_train"},
    "clip_sort": {"zh_t2i_base", "zh_t2i_rerank"},
}
# Model files: torch (and third-party model libraries), nothing of ours but the sibling component files listed.
MODEL_FILES = sorted({*REPO.glob("*/model.py")} - {REPO / "tests/model.py"}) + [
    REPO / "vae_train" / f"{name}.py" for name in
    ("protocol", "dvae", "vqgan", "quantizers", "styled", "lpips", "discriminator", "vqgan_loss")] + [
    REPO / "dalle_train" / "masked.py"]
MODEL_SIBLINGS = {"vae_train.protocol", "vae_train.quantizers", "vae_train.lpips", "vae_train.discriminator",
                  "dalle_train.model"}
# What loading a checkpoint for inference starts from, and what it must never reach.
INFERENCE = ["dalle_gen", "clip_sort", "dalle_train.generate", "vae_train.load", "clip_train.load", "brivl_infer.load",
             "zh_t2i_rerank.registry", "zh_t2i_rerank.clip", "zh_t2i_rerank.cnclip", "zh_t2i_rerank.brivl",
             "zh_t2i_eval.samples"]
TRAINING = re.compile(r"(^|\.)train$|^train_runtime\.trainer$")


def source_files(package: str) -> list[Path]:
    single = REPO / f"{package}.py"
    return [single] if single.is_file() else sorted((REPO / package).rglob("*.py"))


def imported_names(path: Path) -> list[str]:
    """Every module name ``path`` imports: import statements anywhere (lazy ones in functions too), string registries
    ``"pkg.module:attr"`` and ``importlib.import_module("...")``. ``from a import b`` gives ``a.b`` and ``a``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"([A-Za-z_][\w.]*):[A-Za-z_]\w*", node.value)
            names += [m.group(1)] if m else []
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.append(str(node.args[0].value))
    return names


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_import_follows_the_layers():
    bad = []
    for package, allowed in ALLOWED.items():
        for path in source_files(package):
            for name in imported_names(path):
                top = name.split(".")[0]
                if top in ALLOWED and top != package and top not in allowed:
                    bad.append(f"{path.relative_to(REPO)} imports {name} ({package} may import: "
                               f"{', '.join(sorted(allowed)) or 'nothing of ours'})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_every_package_is_in_the_table():
    """A new top-level package or module must get its row (and so its allowed imports)."""
    found = {p.parent.name for p in REPO.glob("*/__init__.py")} | {p.stem for p in REPO.glob("*.py")}
    assert found - {"tests", "bench", "scripts", "docs"} == set(ALLOWED)


def test_readme_layout_table_is_this_table():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout"):]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            name = cells[0].strip("`").removesuffix("/").removesuffix(".py")
            if name in ALLOWED:
                rows[name] = {c.strip("` ") for c in cells[3].split(",")} - {"—", "-", ""}
    assert rows == ALLOWED


def test_model_files_import_nothing_of_ours_and_raise_value_errors():
    assert len(MODEL_FILES) >= 11 and all(p.is_file() for p in MODEL_FILES)
    for path in MODEL_FILES:
        ours = {n for n in imported_names(path) if n.split(".")[0] in ALLOWED} - MODEL_SIBLINGS
        ours = {n for n in ours if not any(n.startswith(s + ".") for s in MODEL_SIBLINGS)}
        assert not ours, f"{path.relative_to(REPO)} imports {sorted(ours)}"
        assert "UserError" not in path.read_text(encoding="utf-8"), path


def test_inference_reaches_no_training_module_statically():
    """Every import reachable from the inference entry points (lazy imports in functions included) is followed:
    none is a ``*.train`` module or the training loop."""
    seen, todo, reached_from = set(), list(INFERENCE), {}
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        for child in parents + imported_names(path):
            if child.split(".")[0] in ALLOWED and child not in seen:
                reached_from.setdefault(child, name)
                todo.append(child)
    bad = sorted(n for n in seen if TRAINING.search(n))
    assert not bad, "; ".join(f"{n} (imported by {reached_from.get(n)})" for n in bad)
    assert {"vae_train.load", "clip_train.load", "brivl_infer.encoder", "dalle_train.model"} <= seen


def test_inference_imports_no_training_module_at_run_time():
    code = "\n".join([
        "import re, sys",
        *(f"import {m}" for m in INFERENCE),
        f"ours = {sorted(ALLOWED)!r}",
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in ours and re.search({TRAINING.pattern!r}, m)))",
    ])
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_no_module_import_cycles():
    """No two modules of ours import each other, directly or round a loop, lazily or not (a package's
    ``__init__`` aside: ``from pkg import module`` names it without depending on it)."""
    graph = {}
    for package in ALLOWED:
        for path in source_files(package):
            graph[module_name(path)] = {n for n in imported_names(path) if n.split(".")[0] in ALLOWED
                                        and (f := module_file(n)) is not None and f.name != "__init__.py"}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(" -> ".join(trail[trail.index(n):] + [m, n]) if n in trail else f"{m} -> {n}")
            elif n in graph and not state.get(n):
                visit(n, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    assert not cycles, "\n".join(cycles)
