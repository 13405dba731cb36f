"""A reranking's inputs and outputs: the images ``dalle_gen.py`` wrote (``DIR/{i}.png|jpg``), read and scored a chunk
at a time with unreadable ones skipped and counted; ``DIR/ranking.json``, ``DIR/top/`` (the top-k copied in rank
order as ``{rank}_{file}``) and ``DIR/ranked_grid.png`` (the best images in rank order, the score under each)."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from form_data.datasets import load_image
from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import StagedFiles, write_json
from zh_t2i_base.images import numbered_images

EXTENSIONS = (".png", ".jpg", ".jpeg")
CELL = 160  # grid cell: the image fits in CELL x CELL, the score line goes under it


def find_images(directory: Path, n: int) -> list[Path]:
    """``DIR/{i}.png`` (else .jpg / .jpeg) for i < n, from one listing of the directory (whatever n is); a
    UserError saying how many of the n exist when any is missing."""
    if not directory.is_dir():
        raise UserError(f"image directory not found: {directory}")
    by_index = {i: p for i, p in numbered_images(directory, EXTENSIONS).items() if i < n}
    if len(by_index) < n:
        missing = n - len(by_index)
        first = list(itertools.islice((f"{i}.png" for i in range(n) if i not in by_index), 5))
        shown = ", ".join(first) + (", ..." if missing > 5 else "")
        raise UserError(f"{directory}: {missing} of the {n} images are missing ({shown}); only "
                        f"{len(by_index)} of DIR/0..{n - 1}.png|jpg exist - is N larger than the images generated?")
    return [by_index[i] for i in range(n)]


def score_images(scorer, text: str, paths: Sequence[Path], chunk: int = 256,
                 progress: bool = False) -> tuple[list[Path], np.ndarray, list[Path]]:
    """``(scored paths, their scores, skipped paths)``: the images are read and scored ``chunk`` at a time (memory
    does not grow with their number); an unreadable image is skipped and counted, not fatal."""
    from tqdm import tqdm

    kept, scores, skipped = [], [], []
    bar = tqdm(total=len(paths), desc="scoring", unit="img", disable=not progress, leave=False)
    for lo in range(0, len(paths), chunk):
        images, ok = [], []
        for p in paths[lo:lo + chunk]:
            img = load_image(p)
            (ok if img is not None else skipped).append(p)
            if img is not None:
                images.append(img)
        if images:
            s = np.asarray(scorer.score(text, images), dtype=np.float64)
            if s.shape != (len(images),) or not np.isfinite(s).all():
                raise RuntimeError(f"the scorer returned {s.shape} scores for {len(images)} images: {s}")
            kept += ok
            scores.append(s)
        bar.update(len(paths[lo:lo + chunk]))
    bar.close()
    if not kept:
        raise UserError(f"no readable image among the {len(paths)} in {paths[0].parent if paths else '?'}")
    return kept, np.concatenate(scores), skipped


def ranked_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int = 8) -> Image.Image:
    """Images in the given order, each fitted into a CELL x CELL box with its label underneath."""
    font = ImageFont.load_default()
    line = 20
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + line)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (k % columns) * CELL, (k // columns) * (CELL + line)
        thumb = img.copy()
        thumb.thumbnail((CELL - 4, CELL - 4), Image.BICUBIC)  # shrinks only; small images are enlarged below
        scale = (CELL - 4) // max(thumb.size)
        if scale > 1:
            thumb = thumb.resize((thumb.width * scale, thumb.height * scale), Image.NEAREST)
        grid.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        draw.text((x + 4, y + CELL + 3), label, fill="black", font=font)
    return grid


GRID_MAX = 64  # images shown in ranked_grid.png: the best ones, whatever N is


def write_outputs(directory: Path, text: str, scorer: str, paths: Sequence[Path], scores: np.ndarray, top_k: int,
                  skipped: Sequence[Path] = ()) -> list[dict]:
    """ranking.json (every scored image, and the skipped ones), top/ and ranked_grid.png (the best
    :data:`GRID_MAX`), all or none (staged, then moved into place)."""
    order = sorted(range(len(paths)), key=lambda i: (-scores[i], i))
    ranking = [{"file": paths[i].name, "score": float(scores[i]), "rank": r} for r, i in enumerate(order, 1)]
    width = len(str(min(top_k, len(order))))
    staging = Path(tempfile.mkdtemp(prefix=".top.", dir=directory))
    try:
        for row in ranking[:top_k]:
            shutil.copy2(directory / row["file"], staging / f"{row['rank']:0{width}d}_{row['file']}")
        with StagedFiles() as staged:
            write_json(staged.path(directory / "ranking.json"), {"text": text, "scorer": scorer, "ranking": ranking,
                                                                 "skipped": [p.name for p in skipped]})
            shown = ranking[:GRID_MAX]
            grid = ranked_grid([load_image(directory / r["file"]) for r in shown],
                               [f"#{r['rank']} {r['file']} {r['score']:.4f}" for r in shown])
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
