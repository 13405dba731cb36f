"""``make bench``: run every benchmark script under bench/ (each measures its own baseline in the same run), collect
their figures into ``bench/results.json`` and a Markdown table ``bench/results.md`` (what the README shows).

    python bench/run_all.py                    # everything (about 40 minutes on 2 CPU cores)
    python bench/run_all.py --only clean dalle --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, extra args, quick extra args). Scripts that are not there yet are skipped with a note.
BENCHMARKS = {
    "clean": ("bench_clean.py", [], ["--rows", "200000"]),
    "vae": ("bench_vae.py", [], ["--seconds", "30"]),
    "dalle_gen": ("bench_dalle_gen.py", [], ["--n", "4"]),
    "rerank": ("bench_rerank.py", [], []),
    "brivl": ("bench_brivl.py", [], []),
    "kmeans": ("bench_kmeans.py", [], []),
    "styled_vq_dalle": ("bench_styled_vq_dalle.py", [], []),  # needs a finished `make demo` (runs/demo)
}


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj


def headline(result: dict) -> dict[str, float]:
    """The figures worth a table row: ratios, throughputs, quality and memory numbers."""
    flat: dict[str, float] = {}
    _flatten("", result, flat)
    words = ("ratio", "per_s", "psnr", "usage", "rss", "memory", "speedup", "r@1", "recall", "seconds")
    return {k: v for k, v in flat.items() if any(w in k.lower() for w in words)}


def markdown(results: dict, meta: dict) -> str:
    title = (f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs, Python {meta['python']}), "
             f"by `make bench` (`python bench/run_all.py`).")
    lines = [title, "", "| benchmark | figure | value |", "|---|---|---|"]
    for name, res in results.items():
        if "error" in res:
            lines.append(f"| {name} | not run | {res['error']} |")
            continue
        for key, value in headline(res).items():
            lines.append(f"| {name} | {key} | {value:,.4g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="benchmark names to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run; not for the README)")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    a = ap.parse_args()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "quick": a.quick}
    out = Path(a.out)
    results = json.loads(out.read_text())["results"] if a.only and out.is_file() else {}
    for name, (script, args, quick) in BENCHMARKS.items():
        if a.only and name not in a.only:
            continue
        if not (HERE / script).is_file():
            results[name] = {"error": f"{script} not present"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            js = Path(tmp) / "r.json"
            cmd = [sys.executable, str(HERE / script), *args, *(quick if a.quick else []), "--json", str(js)]
            print("+", " ".join(cmd[1:]), flush=True)
            t0 = time.perf_counter()
            r = subprocess.run(cmd, check=False)
            if r.returncode != 0 or not js.is_file():
                results[name] = {"error": f"exit code {r.returncode}"}
                continue
            results[name] = {**json.loads(js.read_text()), "wall_s": round(time.perf_counter() - t0, 1)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, ensure_ascii=False) + "\n")
    md = markdown(results, meta)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
