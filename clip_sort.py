"""``python clip_sort.py TEXT N DIR``: rerank the images ``dalle_gen.py`` wrote (``DIR/{i}.png|jpg``, i < N) by how
well they match TEXT.

Prints a ranking table and writes ``DIR/ranking.json`` (file, score, rank for every image), ``DIR/top/`` (the top-k
copied in rank order as ``{rank}_{file}``) and ``DIR/ranked_grid.png`` (all images in rank order, score under each).
The scorer is ``--scorer clip:CKPT`` (our CLIP), ``cnclip:ARCH:WEIGHTS`` (Chinese-CLIP) or ``brivl:CFG:CKPT``.
``TEXT`` may be ``@FILE`` (one prompt per line): prompt i ranks ``DIR/p{i}/``, as ``dalle_gen.py @FILE N DIR`` wrote
them, with one scorer load for all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from form_data.cli import ArgumentParser, UserError, expand_prompts, positive_int, run

EXTENSIONS = (".png", ".jpg", ".jpeg")
CELL = 160  # grid cell: the image fits in CELL x CELL, the score line goes under it


def parser() -> ArgumentParser:
    from clip_train.scorers import USAGE
    from form_data.inference import PRECISIONS

    p = ArgumentParser(prog="clip_sort.py", description=__doc__.split("\n\n")[0])
    p.add_argument("text", help="the caption the images were generated for, or @FILE: one a line, ranking DIR/p{i}")
    p.add_argument("n", type=positive_int, help="number of images: DIR/0.png ... DIR/{N-1}.png (or .jpg)")
    p.add_argument("dir", help="directory of the generated images")
    p.add_argument("--scorer", default="clip:runs/clip", help=USAGE)
    p.add_argument("--top-k", type=positive_int, default=4, help="images copied to DIR/top/")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images encoded together")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="bf16/fp16: autocast (CUDA, or bf16 on a CPU with AVX512-BF16/AMX); scores move by ~1e-3")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickle when loading the scorer's weights")
    return p


def find_images(directory: Path, n: int) -> list[Path]:
    """``DIR/{i}.png`` (else .jpg / .jpeg) for i < n; UserError naming what is missing."""
    if not directory.is_dir():
        raise UserError(f"image directory not found: {directory}")
    found, missing = [], []
    for i in range(n):
        path = next((directory / f"{i}{ext}" for ext in EXTENSIONS if (directory / f"{i}{ext}").is_file()), None)
        (found if path is not None else missing).append(path or f"{i}.png")
    if missing:
        shown = ", ".join(str(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(f"{directory}: {len(missing)} of the {n} images are missing ({shown}); "
                        f"only {len(found)} of DIR/0..{n - 1}.png|jpg exist - is N larger than the images generated?")
    return found


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    from form_data.datasets import load_image

    images = []
    for p in paths:
        img = load_image(p)
        if img is None:
            raise UserError(f"{p}: not a readable image")
        images.append(img)
    return images


def ranked_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int = 8) -> Image.Image:
    """Images in the given order, each fitted into a CELL x CELL box with its label underneath."""
    font = ImageFont.load_default()
    line = 20
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + line)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, label) in enumerate(zip(images, labels)):
        x, y = (k % columns) * CELL, (k // columns) * (CELL + line)
        thumb = img.copy()
        thumb.thumbnail((CELL - 4, CELL - 4), Image.BICUBIC)  # shrinks only; small images are enlarged below
        scale = (CELL - 4) // max(thumb.size)
        if scale > 1:
            thumb = thumb.resize((thumb.width * scale, thumb.height * scale), Image.NEAREST)
        grid.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        draw.text((x + 4, y + CELL + 3), label, fill="black", font=font)
    return grid


def write_outputs(directory: Path, text: str, scorer: str, paths: Sequence[Path], images: Sequence[Image.Image],
                  scores: np.ndarray, top_k: int) -> list[dict]:
    """ranking.json, top/ and ranked_grid.png, all or none (staged, then moved into place)."""
    from form_data.fileio import StagedFiles, write_json

    order = sorted(range(len(paths)), key=lambda i: (-scores[i], i))
    ranking = [{"file": paths[i].name, "score": float(scores[i]), "rank": r} for r, i in enumerate(order, 1)]
    width = len(str(min(top_k, len(order))))
    staging = Path(tempfile.mkdtemp(prefix=".top.", dir=directory))
    try:
        for row in ranking[:top_k]:
            shutil.copy2(directory / row["file"], staging / f"{row['rank']:0{width}d}_{row['file']}")
        with StagedFiles() as staged:
            write_json(staged.path(directory / "ranking.json"), {"text": text, "scorer": scorer, "ranking": ranking})
            grid = ranked_grid([images[i] for i in order], [f"#{r['rank']} {r['file']} {r['score']:.4f}"
                                                             for r in ranking])
            grid.save(staged.path(directory / "ranked_grid.png"), format="PNG")
            old = directory / "top"
            if old.exists():
                trash = Path(tempfile.mkdtemp(prefix=".old-top.", dir=directory))
                os.replace(old, trash / "top")
                shutil.rmtree(trash)
            os.replace(staging, old)
            staged.commit()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ranking


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from clip_train.scorers import make_scorer, split_spec
    from form_data.fileio import ensure_writable_dir

    split_spec(a.scorer)  # an unknown scorer fails before any image is read
    jobs = [(text, Path(d), find_images(Path(d), a.n)) for text, d in expand_prompts(a.text, a.dir)]
    for _, directory, _ in jobs:
        ensure_writable_dir(directory)
    scorer = make_scorer(a.scorer, device=a.device, batch_size=a.batch_size, trust_checkpoint=a.trust_checkpoint,
                         precision=a.precision)
    for text, directory, paths in jobs:
        images = load_images(paths)
        scores = np.asarray(scorer.score(text, images), dtype=np.float64)
        if scores.shape != (len(images),) or not np.isfinite(scores).all():
            raise RuntimeError(f"scorer {a.scorer} returned {scores.shape} scores for {len(images)} images: {scores}")
        ranking = write_outputs(directory, text, a.scorer, paths, images, scores, a.top_k)
        if len(jobs) > 1:
            print(f"{directory}: {text}")
        print(f"{'rank':>4}  {'score':>9}  file")
        for row in ranking:
            print(f"{row['rank']:>4}  {row['score']:>9.4f}  {row['file']}")
        print(f"wrote {directory}/ranking.json, {directory}/top/ (top {min(a.top_k, len(ranking))}), "
              f"{directory}/ranked_grid.png", flush=True)
    return 0


if __name__ == "__main__":
    run(main, prog="clip_sort.py")
