"""The demo's per-step table: wall seconds of each step (``RUN/timings.tsv``), how much of it was process start-up
(``RUN/startup/<step>.tsv``, written by every CLI process when ``$ZH_T2I_STARTUP_LOG`` is set: interpreter start and
imports), and what the step would take on the slow CPU kind the demo is sized for (``RUN/calibration.json`` from
``zh_t2i_demo calibrate``).

Only the compute of compute-bound steps (training, tokenizing, generating, scoring) scales with the fp32 matmul rate:
on a machine ``f = GFLOP/s / 35`` times faster than the slow kind it is multiplied by ``f``. Start-up and the data / I/O
steps (rendering, HTTP download, exports) are shown as measured. Standard library only: printing it costs no imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zh_t2i_base.fileio import read_structured, require_keys


@dataclass
class Step:
    name: str
    seconds: float  # wall clock
    kind: str  # compute | io
    startup: float  # seconds of process start-up (its processes run one after another)
    processes: int

    def scaled(self, factor: float) -> float:
        if self.kind != "compute":
            return self.seconds
        return self.startup + max(0.0, self.seconds - self.startup) * factor


def read_steps(run: str | Path) -> list[Step]:
    """The steps in the order they ran; the last line of a repeated step wins."""
    run = Path(run)
    rows: dict[str, Step] = {}
    path = run / "timings.tsv"
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        try:
            name, seconds = parts[0], float(parts[1])
            kind = parts[2] if len(parts) > 2 else "compute"
        except (IndexError, ValueError):
            continue
        starts = []
        log = run / "startup" / f"{name}.tsv"
        if log.is_file():
            for row in log.read_text(encoding="utf-8").splitlines():
                try:
                    starts.append(float(row.split("\t")[0]))
                except ValueError:
                    continue
        rows[name] = Step(name, seconds, kind, min(seconds, sum(starts)), len(starts))
    return list(rows.values())


def step_table(run: str | Path) -> str:
    run = Path(run)
    cal_path = run / "calibration.json"
    cal = read_structured(cal_path, "calibration file") if cal_path.is_file() else {}
    if cal:
        require_keys(cal, ("matmul_gflops", "cpu_capability", "threads"), cal_path, "calibration file")
    on_cpu = cal.get("device", "cpu") == "cpu"
    factor = float(cal.get("slow_kind_factor", 1.0)) if on_cpu else 1.0
    steps = read_steps(run)
    head = f"{'step':<10} {'seconds':>8} {'start-up':>9} {'compute':>8}  {'kind':<8} {'at 35 GFLOP/s':>14}"
    lines = [head, "-" * len(head)]
    for s in steps:
        compute = s.seconds - s.startup if s.kind == "compute" else 0.0
        lines.append(f"{s.name:<10} {s.seconds:>8.1f} {s.startup:>9.1f} {compute:>8.1f}  {s.kind:<8} "
                     f"{s.scaled(factor) if on_cpu else float('nan'):>14.1f}")
    total = sum(s.seconds for s in steps)
    scaled = sum(s.scaled(factor) for s in steps)
    startup = sum(s.startup for s in steps)
    compute = sum(s.seconds - s.startup for s in steps if s.kind == "compute")
    lines.append("-" * len(head))
    lines.append(f"{'total':<10} {total:>8.1f} {startup:>9.1f} {compute:>8.1f}  {'':<8} "
                 f"{scaled if on_cpu else float('nan'):>14.1f}")
    if cal and on_cpu:
        lines.append(f"measured at {cal['matmul_gflops']:.1f} GFLOP/s ({cal['cpu_capability']}, {cal['threads']} "
                     f"threads): {total / 60:.1f} min here; compute-bound steps x{factor:.2f} less their start-up "
                     f"-> {scaled / 60:.1f} min on the slow kind (35 GFLOP/s)")
    elif cal:
        lines.append(f"measured on {cal.get('cuda_name') or 'a GPU'}: {total / 60:.1f} min (no CPU scaling)")
    return "\n".join(lines)
