"""Every CLI x every class of bad input: one line on stderr, exit code 2, no traceback, nothing left behind.

Nothing here lists the CLIs by hand. They are discovered: every module whose ``if __name__ == "__main__"`` block calls
``zh_t2i_base.cli.run``. Each module's ``parsers()`` gives its commands. The cases come from the flags themselves:
- a typed number gets out-of-range, non-finite and non-numeric values;
- an output path (``PathArg("out")``) gets three places it cannot write to;
- an input path gets a missing file and the wrong kind (a directory for a file, a file for a directory);
- a prompt gets an empty one;
- every command gets an unknown flag.
On top of that, a command's BASE invocation (a valid command line over tiny real models and data) has its input slots
swapped one at a time for broken versions of what they hold: empty, header-only, wrong columns, non-UTF-8, corrupt
gz/parquet, garbage, truncated or wrong-kind checkpoints, non-object JSON... (``BAD``). A new CLI, command, flag or
content kind is therefore swept without anyone editing this file. A new command without a BASE entry fails
:func:`test_every_command_has_a_base_invocation`.

The cases run in-process (the command's ``main`` under the same ``run`` wrapper, from a scratch working directory);
:func:`test_entry_points_run_as_processes` runs one case per CLI as a real process."""

from __future__ import annotations

import argparse
import ast
import gzip
import importlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, run_cli, run_in_process
from zh_t2i_base.cli import PathArg, prompt_text

SKIP_DIRS = {"tests", "bench", "scripts", "docs", ".venv", ".git", "build"}


def _is_cli(path: Path) -> bool:
    """Whether the file ends in ``if __name__ == "__main__": run(main, ...)``."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run" for n in ast.walk(node))
    return False


def discover() -> dict[tuple[str, ...], str]:
    """``{invocation prefix: module name}``, e.g. ``("-m", "vae_train"): "vae_train.__main__"``."""
    found = {}
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in SKIP_DIRS or rel.parts[0].startswith(".") or not _is_cli(path):
            continue
        if len(rel.parts) == 1:
            found[(rel.name,)] = rel.stem
        elif rel.name == "__main__.py":
            found[("-m", ".".join(rel.parts[:-1]))] = ".".join(rel.with_suffix("").parts)
        else:
            found[("-m", ".".join(rel.with_suffix("").parts))] = ".".join(rel.with_suffix("").parts)
    return found


CLIS = discover()
COMMANDS = {(prefix, sub): parser for prefix, module in CLIS.items()
            for sub, parser in importlib.import_module(module).parsers().items()}


def name(prefix: tuple[str, ...], sub: str) -> str:
    return " ".join((prefix[-1], sub)).strip()


# ---------------------------------------------------------------------------------------------------------------------
# cases from the flags (all fail while the command line is parsed: nothing else needs to be valid)


@dataclass
class Case:
    prefix: tuple[str, ...]
    id: str
    argv: list[str]  # after the invocation prefix; {DIR} {FILE} {MISSING} {NEW} {W:key} {BAD:kind:variant} filled in
    needle: str = ""  # expected in the error line


def _filler(action: argparse.Action) -> str:
    t = action.type
    if isinstance(t, PathArg):
        return "{NEW}" if t.role == "out" else ("{DIR}" if t.kind == "dir" else "{FILE}")
    if t is prompt_text:
        return "红色的圆形"
    if action.choices:
        return str(next(iter(action.choices)))
    return "2" if t is not None and t not in (str,) else "x"


def _bad_values(action: argparse.Action) -> list[tuple[str, str, str]]:
    """(case name, value, expected text) for one flag, from its type."""
    t, out = action.type, []
    if isinstance(t, PathArg):
        if t.role == "out":
            out.append(("under-a-file", "{FILE}/sub/x", "not a directory"))
            if t.kind == "file":
                out.append(("a-directory", "{DIR}", "is a directory"))
            if t.kind == "dir":
                out.append(("a-file", "{FILE}", "not a directory"))
            out.append(("unwritable", "/sys/zh_t2i_sweep/x", "cannot write"))
        else:
            out.append(("missing", "{MISSING}", "not found"))
            if t.kind == "file":
                out.append(("a-directory", "{DIR}", "is a directory"))
            if t.kind == "dir":
                out.append(("a-file", "{FILE}", "not a directory"))
    elif t is prompt_text:
        out += [("empty", "", "empty"), ("blank", "  ", "empty")]
    elif t is not None and t is not str:
        out.append(("not-a-number", "abc", "invalid"))
        low, high = getattr(t, "minimum", None), getattr(t, "maximum", None)
        if low is not None:
            out.append(("below-range", f"{low - 1:g}", f"{low:g}"))
        if high is not None:
            out.append(("above-range", f"{high + 1:g}", f"{high:g}"))
        if getattr(t, "__name__", "") == "float" or t is float:
            out += [("nan", "nan", "finite"), ("inf", "inf", "finite")]
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        out.append(("bad-choice", "no-such-choice", "invalid choice"))
    return out


def parse_cases() -> list[Case]:
    cases = []
    for (prefix, sub), parser in COMMANDS.items():
        head = sub.split() if sub else []
        positionals = [a for a in parser._actions if not a.option_strings
                       and not isinstance(a, argparse._SubParsersAction)]
        fill = [_filler(a) for a in positionals]
        fill += [x for a in parser._actions if a.option_strings and a.required
                 for x in (a.option_strings[0], _filler(a))]
        cases.append(Case(prefix, f"{name(prefix, sub)}: unknown flag", [*head, *fill, "--no-such-flag"],
                          "unrecognized"))
        for i, action in enumerate(positionals):
            for what, value, needle in _bad_values(action):
                argv = [*head, *fill[:i], value, *fill[i + 1:]]
                cases.append(Case(prefix, f"{name(prefix, sub)} {action.dest}: {what}", argv, needle))
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:
                continue
            flag = action.option_strings[0]
            for what, value, needle in _bad_values(action):
                cases.append(Case(prefix, f"{name(prefix, sub)} {flag}: {what}", [*head, *fill, flag, value], needle))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# cases from the inputs of a valid command line (fail when the input is read: the rest must be valid)


@dataclass
class Slot:
    """An input in a BASE command line: what it holds (``PathArg.content``) and its valid value ({W:key})."""

    content: str
    value: str
    fmt: str = "{}"  # how the path sits in its argument, e.g. "clip:{}" for clip_sort's --scorer


TINY_DVAE = ["--model", "dvae", "--image-size", "16", "--num-layers", "2", "--hidden-dim", "8", "--num-resnet-blocks",
             "0", "--num-tokens", "16", "--emb-dim", "8"]
TINY_SVQ = ["--image-size", "16", "--patch-size", "4", "--width", "32", "--heads", "2", "--dense-blocks", "1",
            "--expert-blocks", "1", "--cond-blocks", "4", "--emb-dim", "8", "--decoder-width", "32", "--final-blocks",
            "1", "--refiner-channels", "8", "--refiner-groups", "2", "--refiner-kernel", "5", "--codebook-size", "16"]
RUN = ["--max-steps", "1", "--workers", "0", "--batch-size", "8", "--device", "cpu", "--out-dir", "{NEW}"]
PROMPT = "红色的圆形"

BASE: dict[str, list] = {
    "dalle_gen.py": [PROMPT, "2", "{NEW}", "--checkpoint", Slot("checkpoint", "{W:dalle}"), "--vocab",
                     Slot("text", "{W:vocab}"), "--device", "cpu", "--quiet"],
    "clip_sort.py": [PROMPT, Slot("count", "2"), Slot("images-dir", "{W:gen}"),
                     "--scorer", Slot("checkpoint", "{W:clip}", "clip:{}"), "--device", "cpu"],
    "dalle_train": ["--train-data", Slot("tokens", "{W:tokens}"), "--vocab", Slot("text", "{W:vocab}"), "--dim", "32",
                    "--depth", "1", "--heads", "1", "--dim-head", "16", "--text-seq-len", "16",
                    "--config", Slot("yaml", "{W:config}"), *RUN],
    "vae_train": [*TINY_DVAE, "--train-data", Slot("images", "{W:train}"), "--config", Slot("yaml", "{W:config}"),
                  *RUN],
    "vae_train tokenize": ["--tokenizer", Slot("checkpoint", "{W:vae}"), "--data", Slot("images", "{W:train}"),
                           "--out", "{NEW}.pt", "--workers", "0", "--device", "cpu"],
    "vae_train eval": ["--tokenizer", Slot("checkpoint", "{W:vae}"), "--data", Slot("images", "{W:val}"),
                       "--device", "cpu"],
    "clip_train": ["--model", "zh-tiny", "--image-size", "32", "--vocab", Slot("text", "{W:vocab}"),
                   "--train-data", Slot("images", "{W:train}"), "--config", Slot("yaml", "{W:config}"), *RUN],
    "clip_train eval": ["--checkpoint", Slot("checkpoint", "{W:clip}"), "--data", Slot("images", "{W:val}"),
                        "--attributes", Slot("jsonl", "{W:attributes}"), "--workers", "0", "--device", "cpu"],
    "styled_vq": ["--stage", "1", *TINY_SVQ, "--train-data", Slot("images", "{W:train}"),
                  "--config", Slot("yaml", "{W:config}"), *RUN],
    "styled_vq dump": ["--model", Slot("checkpoint", "{W:svq}"), "--data", Slot("images", "{W:train}"),
                       "--out", "{NEW}", "--workers", "0", "--device", "cpu"],
    "styled_vq kmeans": ["--features", Slot("features", "{W:feats}"), "--k", "4", "--out", "{NEW}.pt",
                         "--device", "cpu"],
    "styled_vq attach": ["--model", Slot("checkpoint", "{W:svq}"), "--codebook", Slot("codebook", "{W:codebook}"),
                         "--out", "{NEW}"],
    "styled_vq analyze": ["--model", Slot("checkpoint", "{W:svq}"), "--data", Slot("images", "{W:val}"),
                          "--out", "{NEW}", "--images", "4", "--device", "cpu"],
    "styled_vq convert": ["--checkpoint", Slot("checkpoint", "{W:svq_orig}"), "--version", "v1", "--codebook",
                          "embedded", "--heads", "4", "--refiner-groups", "2", "--out", "{NEW}"],
    "brivl_infer.extract": ["--cfg", Slot("yaml", "{W:brivl_cfg}"), "--checkpoint", Slot("checkpoint", "{W:brivl}"),
                            "--jsonl", Slot("jsonl", "{W:brivl_jsonl}"), "--image-root", "{W:brivl_root}",
                            "--features", "{NEW}", "--device", "cpu", "--workers", "0"],
    "brivl_infer.evaluate": ["--features", Slot("npy", "{W:brivl_feats}")],
    "form_data synth": None,  # writes a synthetic set: no input to break
    "form_data clean": [Slot("table", "{W:raw}"), "--out", "{NEW}", "--keywords", Slot("text", "{W:keywords}"),
                        "--quiet"],
    "form_data download": [Slot("splits", "{W:splits}"), "--out", "{NEW}", "--quiet"],
    "form_data export": [Slot("downloads", "{W:downloads}"), "--out", "{NEW}", "--quiet"],
    "form_data vocab": [Slot("table", "{W:train}"), "--out", "{NEW}.txt"],
    "form_data serve": None,  # serves until interrupted: its flags are swept above
    "zh_t2i_demo judge train": ["--data", Slot("images", "{W:train}"), "--out", "{NEW}", "--steps", "1", "--calib",
                                "8", "--max-images", "64", "--image-size", "16", "--quiet"],
    "zh_t2i_demo judge score": [Slot("images-dir", "{W:gen}"), "--judge", Slot("checkpoint", "{W:judge}"),
                                "--prompt", PROMPT],
    "zh_t2i_demo report": [Slot("demo-run", "{W:empty_run}")],
    "zh_t2i_demo calibrate": None,  # reads nothing
    "zh_t2i_demo steps": [Slot("demo-run", "{W:empty_run}")],
    "zh_t2i_eval": [Slot("images-dir", "{W:gen}"), "--real", Slot("images", "{W:val}"), "--judge",
                    Slot("checkpoint", "{W:judge}"), "--scorer", Slot("checkpoint", "{W:clip}", "clip:{}"),
                    "--prompt", PROMPT, "--no-fid", "--device", "cpu", "--out", "{NEW}.json"],
}

# The broken versions of each kind of input, as (variant, bytes or a builder). Written into the case's scratch dir.
NON_UTF8 = b"url,caption\nhttp://x/1.jpg,\xff\xfe\xc3\x28\n"
HUGE = "1000000000"  # dalle_gen.py streams any N in constant memory (tests/test_dalle.py, bench/bench_gen_memory.py)
BAD: dict[str, list[str]] = {
    "count": ["huge"],  # answered at once from one listing of the directory
    "images": ["csv-empty", "csv-header-only", "csv-wrong-columns", "csv-non-utf8", "csv-gz-corrupt",
               "csv-gz-truncated", "jsonl-garbage", "dir-empty", "dir-broken-images", "csv-all-broken"],
    "images-dir": ["dir-empty", "dir-broken-images"],
    "table": ["csv-empty", "csv-header-only", "csv-wrong-columns", "csv-non-utf8", "csv-gz-corrupt",
              "csv-gz-truncated", "parquet-corrupt"],
    "splits": ["dir-empty", "splits-non-utf8", "splits-wrong-columns"],
    "downloads": ["dir-empty", "downloads-bad-json", "downloads-non-utf8-caption"],
    "jsonl": ["file-empty", "file-garbage", "file-non-utf8", "jsonl-non-object", "jsonl-truncated"],
    "yaml": ["file-non-utf8", "yaml-garbage", "yaml-list", "yaml-wrong-types"],
    "text": ["file-empty", "file-non-utf8"],
    "checkpoint": ["file-garbage", "ckpt-truncated", "ckpt-wrong-kind", "dir-empty"],
    "codebook": ["file-garbage", "ckpt-truncated", "ckpt-wrong-kind"],
    "tokens": ["file-garbage", "ckpt-truncated", "ckpt-wrong-kind"],
    "npy": ["dir-empty", "npy-garbage"],
    "features": ["dir-empty", "meta-garbage", "meta-non-object", "meta-missing-keys", "meta-wrong-types"],
    "demo-run": ["dir-empty", "report-garbage", "report-non-utf8", "report-incomplete"],
}


def make_bad(variant: str, where: Path, world: dict[str, Path], good: Path) -> Path:
    """The broken input ``variant`` in ``where`` (``good`` is the valid input it replaces)."""
    where.mkdir(parents=True, exist_ok=True)
    kind, _, what = variant.partition("-")
    if variant == "csv-empty":
        (p := where / "bad.csv").write_bytes(b"")
    elif variant == "csv-header-only":
        (p := where / "bad.csv").write_text("filepath\ttitle\n", encoding="utf-8")
    elif variant == "csv-wrong-columns":
        (p := where / "bad.csv").write_text("a,b,c\n1,2,3\n", encoding="utf-8")
    elif variant == "csv-non-utf8":
        (p := where / "bad.csv").write_bytes(NON_UTF8)
    elif variant in ("csv-gz-corrupt", "csv-gz-truncated"):
        body = gzip.compress(b"url,caption\n" + b"http://x/1.jpg,\xe7\xb1\xb3\xe9\xa5\xad\n" * 2000)
        body = body[:30] + b"\x00garbage\xff" * 20 if variant == "csv-gz-corrupt" else body[: len(body) // 2]
        (p := where / "bad.csv.gz").write_bytes(body)
    elif variant == "parquet-corrupt":
        (p := where / "bad.parquet").write_bytes(b"PAR1" + os.urandom(64))
    elif variant == "jsonl-garbage":
        (p := where / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    elif variant == "csv-all-broken":
        for i in range(3):
            (where / f"{i}.png").write_bytes(b"" if i == 0 else b"not an image" * i)
        (p := where / "bad.csv").write_text("filepath\ttitle\n" + "".join(f"{i}.png\t红色的圆形\n" for i in range(3)),
                                            encoding="utf-8")
    elif variant == "dir-empty":
        (p := where / "empty").mkdir()
    elif variant == "dir-broken-images":
        (p := where / "broken").mkdir()
        (p / "0.png").write_bytes(b"")
        (p / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        (p / "2.jpg").write_text("not an image")
    elif variant in ("splits-non-utf8", "splits-wrong-columns"):
        (p := where / "splits").mkdir()
        for split in ("train", "val"):
            (p / f"{split}.csv").write_bytes(NON_UTF8 if variant == "splits-non-utf8" else b"a,b\n1,2\n")
    elif variant in ("downloads-bad-json", "downloads-non-utf8-caption"):
        (p := where / "dl").mkdir()
        for split in ("train", "val"):
            d = p / split / "00000"
            d.mkdir(parents=True)
            shutil.copy(next(world["gen"].glob("0.png")), d / "000000000.jpg")
            bad_json = variant == "downloads-bad-json"
            (d / "000000000.txt").write_bytes("红色的圆形".encode() if bad_json else b"\xff\xfe")
            meta = '{"url": "http://x/0.jpg", "status": "success"}'
            (d / "000000000.json").write_text("[1, 2]" if bad_json else meta)
    elif variant == "file-empty":
        (p := where / f"bad{good.suffix}").write_bytes(b"")
    elif variant == "file-garbage":
        (p := where / f"bad{good.suffix}").write_bytes(b"\x00garbage\x01" * 10)
    elif variant == "file-non-utf8":
        (p := where / f"bad{good.suffix}").write_bytes(b"\xff\xfe\xc3\x28 a: 1\n")
    elif variant == "jsonl-non-object":
        (p := where / "bad.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    elif variant == "jsonl-truncated":
        (p := where / "bad.jsonl").write_text(good.read_text(encoding="utf-8")[:30], encoding="utf-8")
    elif variant == "yaml-garbage":
        (p := where / "bad.yaml").write_text("a: [1, 2\nb: : :\n", encoding="utf-8")
    elif variant == "yaml-list":
        (p := where / "bad.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    elif variant == "yaml-wrong-types":
        (p := where / "bad.yaml").write_text("seed: abc\nMODEL: 3\n", encoding="utf-8")
    elif variant == "ckpt-truncated":
        src = good if good.is_file() else max(good.glob("*.safetensors"), default=None) or max(good.glob("*.pt"))
        data = src.read_bytes()
        (p := where / f"bad{src.suffix}").write_bytes(data[: len(data) // 2])
    elif variant == "ckpt-wrong-kind":
        other = world["clip"] if world["clip"] not in (good, good.parent) else world["dalle"]
        p = other if good.is_dir() else max(other.glob("ckpt-*.pt"))
    elif variant == "npy-garbage":
        (p := where / "feats").mkdir()
        for f in ("np_img.npy", "np_text.npy"):
            (p / f).write_bytes(b"\x93NUMPY garbage")
    elif kind in ("meta", "report"):
        shutil.copytree(good, p := where / "d")
        content = {"garbage": b"{nope", "non-object": b"[1, 2]", "missing-keys": b"{}",
                   "wrong-types": b'{"shards": 3, "dim": "x", "count": []}', "non-utf8": b"\xff\xfe{}",
                   "incomplete": b'{"accuracy": 0.5}'}[what]
        if kind == "meta":
            (p / "meta.json").write_bytes(content)
        else:  # a demo run whose step outputs are broken (the report and the step table read these)
            (p / "timings.tsv").write_text("vae\t1.0\tcompute\n", encoding="utf-8")
            for f in ("vae_eval.json", "calibration.json"):
                (p / f).write_bytes(content)
    else:
        raise AssertionError(f"no builder for {variant}")
    return p


def content_cases() -> list[Case]:
    cases = []
    for (prefix, sub), _ in COMMANDS.items():
        base = BASE.get(name(prefix, sub))
        for i, item in enumerate(base or []):
            if not isinstance(item, Slot):
                continue
            for variant in BAD[item.content]:
                bad = HUGE if item.content == "count" else f"{{BAD:{variant}:{item.value}}}"
                argv = [*(sub.split() if sub else []),
                        *[x.fmt.format(x.value) if isinstance(x, Slot) else x for x in base[:i]],
                        item.fmt.format(bad),
                        *[x.fmt.format(x.value) if isinstance(x, Slot) else x for x in base[i + 1:]]]
                flag = base[i - 1] if i and isinstance(base[i - 1], str) and base[i - 1].startswith("--") else "arg"
                cases.append(Case(prefix, f"{name(prefix, sub)} {flag}: {variant}", argv))
    return cases


PARSE_CASES, CONTENT_CASES = parse_cases(), content_cases()


def test_every_command_has_a_base_invocation():
    """A new command must say how it is called validly (or why it has no input to break), so its inputs are swept."""
    missing = sorted(name(p, s) for p, s in COMMANDS if name(p, s) not in BASE)
    assert not missing, f"add these commands to BASE in {Path(__file__).name}: {missing}"
    assert len(CLIS) >= 10 and len(COMMANDS) >= 25, (CLIS, list(COMMANDS))


# ---------------------------------------------------------------------------------------------------------------------
# running a case


def _tree(*roots: Path) -> set[str]:
    """Every file and directory under the roots (image caches excluded: they are not outputs)."""
    out = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in (".cache", "__pycache__")]
            out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


def materialize(argv: list[str], scratch: Path, world: dict[str, Path]) -> list[str]:
    (scratch / "dir").mkdir(exist_ok=True)
    (scratch / "file.txt").write_text("x\n")
    fixed = {"DIR": scratch / "dir", "FILE": scratch / "file.txt", "MISSING": scratch / "missing.csv",
             "NEW": scratch / "out"}

    def fill(m: re.Match) -> str:
        key = m.group(1)
        if key.startswith("BAD:"):
            _, variant, good = key.split(":", 2)
            return str(make_bad(variant, scratch / "bad", world, world[good[3:-1]]))
        return str(world[key[2:]] if key.startswith("W:") else fixed[key])

    return [re.sub(r"\{(BAD:[\w-]+:\{W:\w+\}|DIR|FILE|MISSING|NEW|W:\w+)\}", fill, a) for a in argv]


def check(case: Case, world: dict[str, Path], scratch: Path, monkeypatch) -> None:
    argv = materialize(case.argv, scratch, world)
    monkeypatch.chdir(scratch)
    roots = [scratch, *([world["root"]] if world else [])]
    before = _tree(*roots)
    r = run_in_process(*case.prefix, *argv)
    line = one_line_error(r)
    assert case.needle.lower() in line.lower(), (case.id, line)
    assert _tree(*roots) == before, f"{case.id}: left behind {_tree(*roots) - before}"


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c.id for c in PARSE_CASES])
def test_bad_flag_values(case, tmp_path, monkeypatch):
    check(case, {}, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", CONTENT_CASES, ids=[c.id for c in CONTENT_CASES])
def test_bad_input_contents(case, tmp_path, monkeypatch, world):
    check(case, world, tmp_path, monkeypatch)


def test_entry_points_run_as_processes(tmp_path):
    """The real process path (imports, ``if __name__ == "__main__"``, argv) once per CLI."""
    for prefix in CLIS:
        r = run_cli(*prefix, "--no-such-flag", cwd=tmp_path)
        one_line_error(r)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# the tiny world the BASE command lines run over (made once, through the CLIs themselves)


def _ok(*args: str) -> None:
    r = run_in_process(*args)
    assert r.returncode == 0, (args, r.stderr[-2000:])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    import numpy as np
    import torch
    from PIL import Image
    from test_brivl import TINY, TINY_CFG, tiny_checkpoint_state

    root = tmp_path_factory.mktemp("world")
    w: dict[str, Path] = {"root": root}
    data = root / "data"
    _ok("-m", "form_data", "synth", "--out", str(data), "--train", "64", "--val", "8", "--image-size", "32", "--quiet")
    w.update(train=data / "train_clip.csv", val=data / "val_clip.csv", attributes=data / "attributes.jsonl")
    _ok("-m", "form_data", "vocab", str(w["train"]), "--out", str(root / "vocab.txt"))
    w["vocab"] = root / "vocab.txt"
    w["config"] = root / "config.yaml"
    w["config"].write_text("seed: 0\n", encoding="utf-8")
    run = ["--max-steps", "1", "--workers", "0", "--batch-size", "8", "--device", "cpu", "--save-every", "1"]
    _ok("-m", "vae_train", *TINY_DVAE, "--train-data", str(w["train"]), *run, "--out-dir", str(w.setdefault(
        "vae", root / "vae")))
    _ok("-m", "vae_train", "tokenize", "--tokenizer", str(w["vae"]), "--data", str(w["train"]), "--out",
        str(w.setdefault("tokens", root / "tokens.pt")), "--workers", "0", "--device", "cpu")
    _ok("-m", "dalle_train", "--train-data", str(w["tokens"]), "--vocab", str(w["vocab"]), "--dim", "32", "--depth",
        "1", "--heads", "1", "--dim-head", "16", "--text-seq-len", "16", *run, "--out-dir",
        str(w.setdefault("dalle", root / "dalle")))
    _ok("-m", "clip_train", "--model", "zh-tiny", "--image-size", "32", "--vocab", str(w["vocab"]), "--train-data",
        str(w["train"]), *run, "--out-dir", str(w.setdefault("clip", root / "clip")))
    _ok("-m", "styled_vq", "--stage", "1", *TINY_SVQ, "--train-data", str(w["train"]), *run, "--out-dir",
        str(w.setdefault("svq", root / "svq")))
    _ok("-m", "styled_vq", "dump", "--model", str(w["svq"]), "--data", str(w["train"]), "--out",
        str(w.setdefault("feats", root / "feats")), "--workers", "0", "--device", "cpu")
    _ok("-m", "styled_vq", "kmeans", "--features", str(w["feats"]), "--k", "4", "--out",
        str(w.setdefault("codebook", root / "codebook.pt")), "--device", "cpu")
    w["svq_orig"] = REPO / "tests/fixtures/styled_vq_orig/original_v1.pt"
    gen = root / "gen"
    gen.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(gen / f"{i}.png")
    w["gen"] = gen
    _ok("-m", "zh_t2i_demo", "judge", "train", "--data", str(w["train"]), "--out", str(root / "judge"), "--steps",
        "1", "--calib", "8", "--max-images", "64", "--image-size", "16", "--quiet")
    w["judge"] = root / "judge"
    from brivl_infer.load import build_model, read_config, resolve_encoder  # the tiny BriVL of the parity fixture

    cfg, _ = read_config(TINY_CFG)
    cfg.bert, _ = resolve_encoder(cfg.encoder, TINY)
    torch.save({"learnable": tiny_checkpoint_state(build_model(cfg))}, w.setdefault("brivl", root / "brivl.pth"))
    w.update(brivl_cfg=TINY_CFG, brivl_jsonl=TINY / "samples.jsonl", brivl_root=TINY)
    (feats := root / "brivl_feats").mkdir()
    for f in ("np_img.npy", "np_text.npy"):
        np.save(feats / f, np.eye(4, dtype=np.float32))
    w["brivl_feats"] = feats
    w["raw"] = root / "raw.csv"
    w["raw"].write_text("url,caption\nhttp://127.0.0.1:9/0.jpg,一碗热腾腾的米饭\n", encoding="utf-8")
    w["keywords"] = root / "keywords.txt"
    w["keywords"].write_text("米饭\n", encoding="utf-8")
    for key, folder in (("splits", "splits"), ("downloads", "downloads"), ("empty_run", "demo_run")):
        w[key] = root / folder
        w[key].mkdir()
    return w
