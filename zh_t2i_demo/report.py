"""The demo's metrics (``RUN/metrics.json``) and report (``RUN/report.html``), from the files a demo run leaves.

Everything is read from files, nothing from the models under test, so this module imports no model package. The
layout it reads (what ``scripts/demo.sh`` writes)::

    RUN/vae/ (metrics.jsonl, recon_latest.png)   RUN/vae_eval.json (held-out PSNR, usage)
    RUN/judge/ (judge.pt, judge_report.json, calib_attributes.jsonl, recon/{i}.png)
    RUN/dalle/metrics.jsonl   RUN/clip/ (metrics.jsonl, result.json)   RUN/timings.tsv (step, seconds, kind)
    RUN/gen/<name>/ ({i}.png, meta.json, ranking.json) — one directory per prompt
    RUN/eval/<generator>.json — ``python -m zh_t2i_eval`` of each generator's images against the real val images

Metrics:
S1 tokenizer: held-out PSNR, codebook usage. S2 adherence of the generated images (judge: colour by pixel statistics,
shape by a colour-blind classifier), seen vs unseen combinations. S3 rerank gain: "both correct" among the top-k by
the reranker minus the expected "both correct" of a random k of the same samples (= the group's mean), per group of
``group_size`` samples (images with distinct seeds), averaged over groups and prompts, with the spread. S4 CLIP
retrieval on the val split at the attribute level (and strict 1:1 R@1 for reference). S5 sample quality, per
generator (one ``RUN/eval/<generator>.json`` each, whatever generators the run has: the demo's DALLE now, a masked
generator's folder later): the Fréchet distance between the judge's penultimate features of its images and of the
real val images, and whatever else that evaluation computed (FID/KID, a text-image score); no target.
"""

from __future__ import annotations

import html
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from form_data.synth import parse_caption, parse_holdout
from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import atomic_write, read_jsonl, read_structured, require_keys, write_json
from zh_t2i_demo.judge import Judge, accuracy, score_dir
from zh_t2i_demo.steps import step_table

TARGETS = {  # metric -> (target, higher is better)
    "S1/psnr": (28.5, True),
    "S2/seen/colour": (0.92, True), "S2/seen/shape": (0.72, True), "S2/seen/both": (0.70, True),
    "S2/unseen/colour": (0.92, True), "S2/unseen/shape": (0.72, True), "S2/unseen/both": (0.65, True),
    "S3/gain_points": (10.0, True),
    "S4/i2t_attr_R@1": (0.95, True), "S4/t2i_attr_R@1": (0.98, True),
}


def _json(path: Path, *keys: str) -> dict:
    """A demo step's JSON output, holding ``keys`` (one-line errors naming the file otherwise)."""
    if not path.is_file():
        raise UserError(f"{path} is missing: did every demo step finish? (run `make demo` again)")
    data = read_structured(path, "demo step output")
    require_keys(data, keys, path, "complete demo step output")
    return data


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _ranking(folder: Path) -> dict[str, float]:
    rows = _json(folder / "ranking.json", "ranking")["ranking"]
    return {r["file"]: float(r["score"]) for r in rows}


def rerank_gain(both: list[bool], scores: list[float], k: int, group_size: int) -> list[float]:
    """Per group of ``group_size`` consecutive samples: mean(both | top-k by score) - mean(both) (the expectation of
    a random k of the group), in points."""
    gains = []
    for lo in range(0, len(both) - group_size + 1, group_size):
        b = np.array(both[lo:lo + group_size], dtype=float)
        s = np.array(scores[lo:lo + group_size])
        top = np.argsort(-s, kind="stable")[:k]
        gains.append(100.0 * (b[top].mean() - b.mean()))
    return gains


def _clip_metrics(run: Path) -> dict[str, float]:
    """Retrieval figures of the CLIP run's final evaluation: recalls as fractions, median ranks as they are."""
    ev = _json(run / "clip" / "result.json").get("eval", {})
    out = {}
    for key, value in ev.items():
        name = key.split("/")[-1]
        if not isinstance(value, (int, float)):
            continue
        if "R@" in name or "mean_recall" in name:
            out[f"S4/{name}"] = float(value) / 100.0
        elif "median_rank" in name:
            out[f"S4/{name}"] = float(value)
    return out


def sample_quality(run: Path) -> dict[str, dict]:
    """``{generator: {"n_generated": .., "n_real": .., <metric>: ..}}`` from every ``RUN/eval/<generator>.json``
    (``python -m zh_t2i_eval``'s output), in name order; {} when the run has none."""
    out: dict[str, dict] = {}
    for path in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        data = _json(path, "metrics", "generated", "real")
        metrics, gen, real = data["metrics"], data["generated"], data["real"]
        if not (isinstance(metrics, dict) and isinstance(gen, dict) and isinstance(real, dict)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
                and isinstance(gen.get("n"), int) and isinstance(real.get("n"), int)):
            raise UserError(f"{path}: not an output of `python -m zh_t2i_eval` (numbers under \"metrics\", counts "
                            f"under \"generated\" and \"real\"); run it again")
        out[path.stem] = {"n_generated": gen["n"], "n_real": real["n"],
                          **{k: float(v) for k, v in metrics.items()}}
    return out


def collect(run: str | os.PathLike, top_k: int = 4, holdout: str = "default", group_size: int = 32) -> dict:
    run = Path(run)
    held = set(parse_holdout(holdout))
    m: dict = {"machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if (run / "calibration.json").is_file():  # where it ran (zh_t2i_demo calibrate): not a result, like the date
        m["calibration"] = _json(run / "calibration.json")
    vae = _json(run / "vae_eval.json", "psnr", "used_fraction")
    m["S1/psnr"], m["S1/codebook_usage"] = float(vae["psnr"]), float(vae["used_fraction"])
    judge = Judge.load(run / "judge")
    jr = _json(run / "judge" / "judge_report.json", "heldout_accuracy")
    for key, value in jr["heldout_accuracy"].items():
        m[f"judge/rendered/{key}"] = value
    recon_dir = run / "judge" / "recon"
    if recon_dir.is_dir():
        attrs = read_jsonl(run / "judge" / "calib_attributes.jsonl")
        recon = [Image.open(recon_dir / f"{i}.png").convert("RGB") for i in range(len(attrs))
                 if (recon_dir / f"{i}.png").is_file()]
        for key, value in accuracy(judge, recon, attrs[:len(recon)]).items():
            m[f"judge/reconstructed/{key}"] = value
    prompts = []
    for folder in sorted((run / "gen").iterdir()) if (run / "gen").is_dir() else []:
        if not (folder / "meta.json").is_file():
            continue
        verdicts = score_dir(judge, folder)
        scores = _ranking(folder)
        files = [r["file"] for r in verdicts["images"]]
        both = [r["both"] for r in verdicts["images"]]
        want = parse_caption(verdicts["prompt"])
        gains = rerank_gain(both, [scores.get(f, float("-inf")) for f in files], top_k, group_size)
        prompts.append({"name": folder.name, "prompt": verdicts["prompt"],
                        "seen": (want["colour"], want["shape"]) not in held,
                        "n": len(files), "colour": verdicts["colour"], "shape": verdicts["shape"],
                        "both": verdicts["both"], "gains": gains, "images": verdicts["images"], "scores": scores})
    if not prompts:
        raise UserError(f"{run}/gen holds no generated prompt directory")
    for group in ("seen", "unseen"):
        rows = [p for p in prompts if p["seen"] == (group == "seen")]
        for what in ("colour", "shape", "both"):
            m[f"S2/{group}/{what}"] = float(np.mean([p[what] for p in rows])) if rows else float("nan")
    gains = [g for p in prompts for g in p["gains"]]
    per_prompt = [float(np.mean(p["gains"])) for p in prompts if p["gains"]]
    m["S3/gain_points"] = float(np.mean(gains)) if gains else float("nan")
    m["S3/gain_std_over_prompts"] = float(np.std(per_prompt)) if per_prompt else float("nan")
    m["S3/groups"] = len(gains)
    m["S3/top_k"], m["S3/group_size"] = top_k, group_size
    m.update(_clip_metrics(run))
    for generator, figures in sample_quality(run).items():
        m.update({f"S5/{generator}/{k}": v for k, v in figures.items()})
    m["prompts"] = [{k: v for k, v in p.items() if k not in ("images", "scores")} for p in prompts]
    return {"metrics": m, "prompts": prompts}


def table(m: dict) -> str:
    lines = [f"{'metric':28s}{'value':>10s}{'target':>10s}  ok"]
    for key, (target, _) in TARGETS.items():
        v = m.get(key)
        if v is None:
            lines.append(f"{key:28s}{'-':>10s}{target:>10g}  -")
            continue
        lines.append(f"{key:28s}{v:10.3f}{target:>10g}  {'yes' if v >= target else 'NO'}")
    for key, v in m.items():  # sample quality (S5): reported, no target
        if key.startswith("S5/") and not key.endswith(("/n_generated", "/n_real")):
            lines.append(f"{key:28s}{v:10.4g}{'-':>10s}  -")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# report.html


def _curves(run: Path, assets: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for name in ("vae", "dalle", "clip"):
        rows = _rows(run / name / "metrics.jsonl")
        keys = sorted({k for r in rows for k in r if k.startswith(("loss", "eval/loss", "eval/psnr")) and
                       isinstance(r[k], (int, float))})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot(*zip(*pts, strict=True), label=k, marker="o" if len(pts) < 10 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = assets / f"curve_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        out.append((name, path.relative_to(run).as_posix()))
    return out


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def write_html(run: Path, data: dict) -> Path:
    m, prompts = data["metrics"], data["prompts"]
    assets = run / "report_assets"
    assets.mkdir(exist_ok=True)
    curves = _curves(run, assets)
    rows = []
    for key, (target, _) in TARGETS.items():
        v = m.get(key)
        ok = "" if v is None or math.isnan(v) else ("pass" if v >= target else "miss")
        rows.append(f"<tr class='{ok}'><td>{key}</td><td>{_fmt(v) if v is not None else '-'}</td>"
                    f"<td>{target:g}</td><td>{ok or '-'}</td></tr>")
    others = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in m.items()
                     if k not in TARGETS and k not in ("prompts", "calibration"))
    quality = ""
    generators = sorted({k.split("/")[1] for k in m if k.startswith("S5/")})
    if generators:
        names = sorted({k.split("/", 2)[2] for k in m if k.startswith("S5/")} - {"n_generated", "n_real"})
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        body = "".join(
            f"<tr><td>{html.escape(g)}</td><td>{m.get(f'S5/{g}/n_generated', '-')}</td>"
            f"<td>{m.get(f'S5/{g}/n_real', '-')}</td>"
            + "".join(f"<td>{m[f'S5/{g}/{n}']:.4g}</td>" if f"S5/{g}/{n}" in m else "<td>-</td>" for n in names)
            + "</tr>"
            for g in generators)
        quality = ("<h2>Sample quality against the real val images (S5, lower is closer)</h2><p>judge_fd: the "
                   "Fréchet distance between the judge's penultimate features (colour-blind shape features) of the "
                   "generated images and of the real val images (<code>python -m zh_t2i_eval</code>).</p><table>"
                   f"<tr><th>generator</th><th>generated</th><th>real</th>{head}</tr>{body}</table>")
    timings = ""
    if (run / "timings.tsv").is_file():
        timings = f"<h2>Steps</h2><pre>{html.escape(step_table(run))}</pre>"
    parts = [f"""<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>make demo report</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} tr.pass td{{background:#e6f6e6}}
tr.miss td{{background:#fbe3e3}} .grid{{display:flex;flex-wrap:wrap;gap:4px}}
figure{{margin:0;padding:2px;border:3px solid transparent;text-align:center;font-size:10px;width:76px}}
figure.top{{border-color:#e0a000}} figure img{{width:64px;height:64px;image-rendering:pixelated}}
.ok{{color:#080}} .bad{{color:#b00}}</style></head><body>
<h1>make demo: Chinese text → image → rerank, on the synthetic set</h1>
<p>{html.escape(m.get('date', ''))} · {html.escape(m.get('machine', ''))}. Adherence is judged without the models
under test: colour from pixel statistics, shape by a colour-blind classifier trained on the training images.</p>
<h2>Metrics and targets</h2><table><tr><th>metric</th><th>value</th><th>target</th><th></th></tr>{''.join(rows)}
</table>{quality}{timings}<h2>Training curves</h2>"""]
    parts += [f"<img alt='{n} curves' src='{src}'>" for n, src in curves]
    if (run / "vae" / "recon_latest.png").is_file():
        parts.append("<h2>Image tokenizer: originals (top) and reconstructions</h2>"
                     "<img alt='reconstructions' src='vae/recon_latest.png' style='image-rendering:pixelated;"
                     "width:100%;max-width:1100px'>")
    parts.append(f"<h2>Generations (top {m['S3/top_k']} of each group of {m['S3/group_size']} by the reranker "
                 "framed)</h2>")
    for p in prompts:
        files = [r["file"] for r in p["images"]]
        scores = [p["scores"].get(f, float("-inf")) for f in files]
        top = set()
        for lo in range(0, len(files), m["S3/group_size"]):
            group = list(range(lo, min(len(files), lo + m["S3/group_size"])))
            top.update(sorted(group, key=lambda i: -scores[i])[: m["S3/top_k"]])
        gain = f"{np.mean(p['gains']):+.1f}" if p["gains"] else "n/a"
        parts.append(f"<h3>{html.escape(p['prompt'])} ({'seen' if p['seen'] else 'UNSEEN'} combination) — colour "
                     f"{p['colour']:.0%}, shape {p['shape']:.0%}, both {p['both']:.0%}, rerank gain {gain} points"
                     "</h3><div class='grid'>")
        for i, r in enumerate(p["images"]):
            mark = "".join(f"<span class='{'ok' if r[k] else 'bad'}'>{k[0]}</span>" for k in ("colour", "shape"))
            parts.append(f"<figure class='{'top' if i in top else ''}'><img alt='{r['file']}' "
                         f"src='gen/{p['name']}/{r['file']}'><figcaption>{scores[i]:.3f} {mark}</figcaption></figure>")
        parts.append("</div>")
    parts.append(f"<h2>All figures</h2><table>{others}</table>")
    parts.append("""<script>window.addEventListener('load', () => {const imgs = Array.from(document.images);
document.body.dataset.imagesTotal = imgs.length;
document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;});</script>
</body></html>""")
    path = run / "report.html"
    with atomic_write(path) as f:
        f.write("\n".join(parts))
    return path


def build_report(run: str | os.PathLike, top_k: int = 4, holdout: str = "default", group_size: int = 32) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"no such run directory: {run}")
    data = collect(run, top_k, holdout, group_size)
    m = data["metrics"]
    write_json(run / "metrics.json", m)
    write_html(run, data)
    m["table"] = table(m)
    return m
