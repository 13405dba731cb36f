"""Evaluate a directory of generated images against real images: FID/KID, a text-image score, the judge-space
Fréchet distance. One JSON and a printed table.

Generated images are what ``dalle_gen.py`` writes: ``GEN/{i}.png|jpg`` with ``GEN/meta.json`` (its prompt), or, for
``dalle_gen.py @FILE N GEN``, one such folder per prompt, ``GEN/p{i}/``. Real images are any image listing or folder
the toolkit reads (``form_data.datasets.open_dataset``: a CSV/JSONL listing, an image folder, webdataset shards).
Every image is read once and goes through every extractor asked for, a chunk at a time; an unreadable one is skipped
and counted, never fatal and never in a metric.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from form_data.datasets import load_image
from zh_t2i_base.cli import UserError
from zh_t2i_base.images import numbered_images
from zh_t2i_eval.frechet import MIN_SAMPLES, frechet_distance

CHUNK = 256  # images read and pushed through the extractors at a time


@dataclass
class GeneratedSet:
    """One prompt's images: ``dir/{i}.png|jpg``."""

    dir: Path
    prompt: str | None
    paths: list[Path]


def generated_sets(gen: str | os.PathLike, prompt: str | None = None) -> list[GeneratedSet]:
    """The prompt folders of a ``dalle_gen.py`` output: ``GEN`` itself when it holds numbered images, else its
    ``p{i}/`` folders in index order. The prompt is ``prompt`` if given, else the folder's ``meta.json``'s, whose
    ``n`` (when there) limits the images to ``0..n-1``."""
    from zh_t2i_base.fileio import read_structured

    gen = Path(gen)
    if not gen.is_dir():
        raise UserError(f"generated-image directory not found: {gen}")
    if numbered_images(gen):
        folders = [gen]
    else:
        subs = [(int(p.name[1:]), p) for p in gen.iterdir()
                if p.is_dir() and p.name[:1] == "p" and p.name[1:].isdigit()]
        folders = [p for _, p in sorted(subs) if numbered_images(p)]
    if not folders:
        raise UserError(f"{gen}: no generated images: expected {gen}/{{i}}.png|jpg (dalle_gen.py TEXT N DIR) or "
                        f"{gen}/p{{i}}/{{i}}.png|jpg (dalle_gen.py @FILE N DIR)")
    sets = []
    for folder in folders:
        meta_path = folder / "meta.json"
        meta = read_structured(meta_path, "dalle_gen.py meta.json") if meta_path.is_file() else {}
        found = numbered_images(folder)
        n = meta.get("n")
        keep = sorted(i for i in found if not isinstance(n, int) or i < n)
        text = prompt or meta.get("prompt")
        sets.append(GeneratedSet(folder, text if isinstance(text, str) and text.strip() else None,
                                 [found[i] for i in keep]))
    return sets


def _identity(img: Image.Image) -> Image.Image:
    return img


def open_real(real: str | os.PathLike):
    """The real images as a dataset of PIL images (a one-line error for a listing with no readable image)."""
    from form_data.datasets import open_dataset

    return open_dataset(real, transform=_identity)


def _real_images(ds, limit: int | None) -> Iterator[Image.Image | None]:
    """Each real image (None for an unreadable one), at most ``limit``."""
    if hasattr(ds, "row"):  # a listing or folder: row i itself, no fall-through to a neighbour
        for i in range(len(ds) if limit is None else min(len(ds), limit)):
            item = ds.row(i)
            yield None if item is None else item["image"]
    else:  # webdataset shards: broken samples are passed over (counted in "skipped")
        for item in itertools.islice(iter(ds), limit):
            yield from itertools.repeat(None, int(item.get("skipped", 0)))
            yield item["image"]


def _chunks(items: Iterator[Image.Image | None]) -> Iterator[tuple[list[Image.Image], int]]:
    """(readable images, unreadable count) ``CHUNK`` at a time."""
    while True:
        block = list(itertools.islice(items, CHUNK))
        if not block:
            return
        images = [im for im in block if im is not None]
        yield images, len(block) - len(images)


class Extractors:
    """What every image goes through: the judge's features, Inception's features (each only when loaded)."""

    def __init__(self, judge=None, inception=None, device=None, batch_size: int = 32):
        self.judge, self.inception, self.device, self.batch_size = judge, inception, device, batch_size
        self.judge_feats: list[np.ndarray] = []
        self.inception_feats: list[np.ndarray] = []

    def add(self, images: Sequence[Image.Image]) -> None:
        if self.judge is not None:
            self.judge_feats.append(self.judge.features(images))
        if self.inception is not None:
            from zh_t2i_eval.inception import inception_features

            self.inception_feats.append(inception_features(self.inception, images, self.device, self.batch_size))

    @staticmethod
    def stack(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def _need(n: int, what: str, where: str, metric: str) -> None:
    if n < MIN_SAMPLES:
        raise UserError(f"{where}: {n} readable {what} image(s); {metric} needs at least {MIN_SAMPLES} per set to "
                        f"estimate a covariance")


def evaluate(gen: str | os.PathLike, real: str | os.PathLike | None = None, *, judge: str | None = None,
             scorer: str | None = None, inception_weights: str | None = None, fid: bool = True,
             prompt: str | None = None, max_real: int | None = None, batch_size: int = 32, device: str = "auto",
             precision: str = "fp32", trust_checkpoint: bool = False, kid_subsets: int = 100,
             kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """Every metric asked for, as the JSON ``python -m zh_t2i_eval`` writes. All inputs are checked (folders,
    prompts, real images, judge, scorer, Inception weights) before any image is pushed through a model."""
    from zh_t2i_base.device import resolve_device

    sets = generated_sets(gen, prompt)
    if not (fid or judge or scorer):
        raise UserError("nothing to compute: --no-fid without --judge or --scorer")
    if fid and not inception_weights:
        from zh_t2i_eval.inception import MISSING

        raise UserError(MISSING)
    if (fid or judge) and not real:
        raise UserError("FID/KID and --judge compare with real images: pass --real DIR|LISTING")
    if scorer:
        from zh_t2i_rerank.registry import split_spec

        split_spec(scorer)
        no_prompt = [s.dir for s in sets if s.prompt is None]
        if no_prompt:
            raise UserError(f"{no_prompt[0]}: no meta.json with the prompt for --scorer; pass --prompt")
    real_ds = open_real(real) if (fid or judge) else None
    dev = resolve_device(device)
    the_judge = None
    if judge:
        from zh_t2i_demo.judge import Judge

        the_judge = Judge.load(judge)
    the_scorer = None
    if scorer:
        from zh_t2i_rerank.registry import make_scorer

        the_scorer = make_scorer(scorer, device=device, batch_size=batch_size, trust_checkpoint=trust_checkpoint,
                                 precision=precision)
    inception = None
    if fid:
        from zh_t2i_eval.inception import load_inception

        inception = load_inception(inception_weights, dev)

    # generated images: every extractor and the scorer, per prompt
    fake = Extractors(the_judge, inception, dev, batch_size)
    set_rows, all_scores, skipped = [], [], []
    for s in sets:
        scores, n = [], 0
        for lo in range(0, len(s.paths), CHUNK):
            images = []
            for p in s.paths[lo:lo + CHUNK]:
                img = load_image(p)
                if img is None:
                    skipped.append(str(p))
                else:
                    images.append(img)
            if not images:
                continue
            n += len(images)
            fake.add(images)
            if the_scorer is not None:
                sc = np.asarray(the_scorer.score(s.prompt, images), dtype=np.float64)
                if sc.shape != (len(images),) or not np.isfinite(sc).all():
                    raise RuntimeError(f"the scorer returned {sc.shape} scores for {len(images)} images")
                scores.extend(sc.tolist())
        row = {"dir": "." if s.dir == Path(gen) else s.dir.name, "prompt": s.prompt, "n": n}
        if the_scorer is not None and scores:
            row["score"] = float(np.mean(scores))
            all_scores.extend(scores)
        set_rows.append(row)
    n_fake = sum(r["n"] for r in set_rows)
    if n_fake == 0:
        raise UserError(f"{gen}: none of the {len(skipped)} generated images is readable")

    # real images: the extractors only
    real_n, real_skipped = 0, 0
    truth = Extractors(the_judge, inception, dev, batch_size)
    if real_ds is not None:
        for images, bad in _chunks(_real_images(real_ds, max_real)):
            real_skipped += bad
            if images:
                real_n += len(images)
                truth.add(images)

    metrics: dict[str, float] = {}
    if inception is not None:
        from zh_t2i_eval.inception import kid

        _need(n_fake, "generated", str(gen), "FID")
        _need(real_n, "real", str(real), "FID")
        x, y = Extractors.stack(fake.inception_feats), Extractors.stack(truth.inception_feats)
        metrics["fid"] = frechet_distance(x, y)
        metrics["kid"], metrics["kid_std"] = kid(x, y, kid_subsets, kid_subset_size, seed)
    if the_scorer is not None:
        metrics["text_image_score"] = float(np.mean(all_scores))
    if the_judge is not None:
        _need(n_fake, "generated", str(gen), "the judge-space Fréchet distance")
        _need(real_n, "real", str(real), "the judge-space Fréchet distance")
        metrics["judge_fd"] = frechet_distance(Extractors.stack(fake.judge_feats), Extractors.stack(truth.judge_feats))
    return {
        "generated": {"path": str(gen), "n": n_fake, "skipped": skipped, "sets": set_rows},
        "real": {"path": str(real) if real else None, "n": real_n, "skipped": real_skipped},
        "metrics": metrics,
        "settings": {"inception_weights": str(inception_weights) if fid else None,
                     "inception_feature": "inception-v3-compat pool 2048" if fid else None,
                     "kid_subsets": kid_subsets if fid else None,
                     "kid_subset_size": min(kid_subset_size, n_fake, real_n) if fid else None,
                     "scorer": scorer, "judge": str(judge) if judge else None,
                     "judge_feature_dim": the_judge.net.head.in_features if the_judge is not None else None,
                     "max_real": max_real, "seed": seed},
    }


def table(result: dict) -> str:
    """The metrics (with the image counts they come from) and the per-prompt scores, as printed."""
    m, n_fake, n_real = result["metrics"], result["generated"]["n"], result["real"]["n"]
    lines = [f"{'metric':<18}{'value':>12}  {'generated':>9}  {'real':>6}"]
    for key, value in m.items():
        if key == "kid_std":
            continue
        shown = f"{value:.6g}" + (f" ± {m['kid_std']:.2g}" if key == "kid" else "")
        real = "-" if key == "text_image_score" else str(n_real)
        lines.append(f"{key:<18}{shown:>12}  {n_fake:>9}  {real:>6}")
    rows = [r for r in result["generated"]["sets"] if "score" in r]
    if rows:
        lines.append(f"text-image score per prompt ({result['settings']['scorer']}):")
        lines += [f"  {r['dir']:<6}{r['score']:>10.4f}  {r['n']:>5}  {r['prompt']}" for r in rows]
    skipped = result["generated"]["skipped"]
    if skipped or result["real"]["skipped"]:
        lines.append(f"skipped unreadable images: {len(skipped)} generated, {result['real']['skipped']} real")
    return "\n".join(lines)
