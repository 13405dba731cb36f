"""Peak memory of ``dalle_gen.py`` against N: generation streams to disk, so the peak RSS must not grow with N.

Baseline (same run): the same command at the small N (default 64); each N runs in its own process, which reports its
own peak RSS (``ru_maxrss``). Prints the peak at each N and the ratio to the small N's (target: within 10%).

    python bench/bench_gen_memory.py --checkpoint runs/demo/dalle --ns 64 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(argv: list[str]) -> None:
    """Run dalle_gen.py's main in this process, then print this process's peak RSS in MiB as one JSON line."""
    sys.path.insert(0, str(REPO))
    import dalle_gen

    t0 = time.perf_counter()
    code = dalle_gen.main(argv)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rc": code, "peak_rss_mib": round(peak_mib, 1), "seconds": round(seconds, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="runs/demo/dalle", help="DALLE checkpoint (the demo's by default)")
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 4096], help="image counts; the first is the baseline")
    ap.add_argument("--prompt", default="一个大的红色圆形")
    ap.add_argument("--cond-scale", default="3")
    ap.add_argument("--batch-size", default="32")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="gen-mem-") as tmp:
        for n in a.ns:
            argv = [a.prompt, str(n), str(Path(tmp) / f"n{n}"), "--checkpoint", a.checkpoint, "--cond-scale",
                    a.cond_scale, "--batch-size", a.batch_size, "--device", "cpu", "--quiet"]
            r = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                               check=False)
            if r.returncode != 0:
                sys.exit(f"dalle_gen.py failed at N={n}: {r.stderr.strip().splitlines()[-1:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"n": n, **row})
            print(f"N={n:>6}: peak RSS {row['peak_rss_mib']:8.1f} MiB in {row['seconds']:.0f} s "
                  f"(x{row['peak_rss_mib'] / rows[0]['peak_rss_mib']:.3f} of N={a.ns[0]})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
