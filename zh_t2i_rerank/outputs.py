"""The outputs of a reranking: the images ``dalle_gen.py`` wrote (``DIR/{i}.png|jpg``) in, ``DIR/ranking.json``,
``DIR/top/`` (the top-k copied in rank order as ``{rank}_{file}``) and ``DIR/ranked_grid.png`` (every image in rank
order, its score under it) out."""

from __future__ import annotations

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

EXTENSIONS = (".png", ".jpg", ".jpeg")
CELL = 160  # grid cell: the image fits in CELL x CELL, the score line goes under it


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


def write_outputs(directory: Path, text: str, scorer: str, paths: Sequence[Path], images: Sequence[Image.Image],
                  scores: np.ndarray, top_k: int) -> list[dict]:
    """ranking.json, top/ and ranked_grid.png, all or none (staged, then moved into place)."""
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
