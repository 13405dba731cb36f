"""Image and text features of a BriVL jsonl, as the original ``XYB_box_extract.py`` writes them.

Input lines: ``{"image_id": path, "sentences": [["sur_text", text], ...], "bbox": [[x1, y1, x2, y2], ...]}``;
relative image paths are taken from ``--image-root`` (default: the current directory, as the original). Output:
``FEATURES/np_img.npy`` and ``FEATURES/np_text.npy`` (float32 [N, D], unit rows, jsonl order), written together
with ``FEATURES/skipped.json``: the samples left out because their image cannot be read (their text too, so the rows
of the two files stay paired), each as its jsonl line number and image path.

    python -m brivl_infer.extract --cfg cfg/test_xyb.yml --checkpoint BriVL-1.0-5500w.pth \\
        --jsonl data/example.jsonl --features out/xyb
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from brivl_infer.evaluate import IMG_FILE, TEXT_FILE
from brivl_infer.load import load_brivl, read_config
from brivl_infer.model import BriVLConfig
from brivl_infer.preprocess import open_image, prepare_image
from zh_t2i_base.cli import IN_DIR, OUT_DIR, ArgumentParser, PathArg, UserError, non_negative_int, positive_int, run
from zh_t2i_base.device import resolve_device
from zh_t2i_base.fileio import StagedFiles, ensure_writable_dir, read_jsonl, write_json
from zh_t2i_base.precision import PRECISIONS, check_precision


def read_samples(path: Path, text_key: str = "sur_text", image_root: Path | None = None
               ) -> tuple[list[Path], list[str], list[list]]:
    """(image paths, texts, boxes) of a BriVL jsonl; every line and every image path is checked first."""
    root = Path.cwd() if image_root is None else image_root
    images, texts, boxes = [], [], []
    for lineno, item in enumerate(read_jsonl(path), 1):
        where = f"{path}: sample {lineno}"
        if not isinstance(item, dict) or not isinstance(item.get("image_id"), str):
            raise UserError(f"{where}: expected an object with a string 'image_id'")
        sentences = item.get("sentences")
        pairs = {s[0]: s[1] for s in (sentences if isinstance(sentences, list) else [])
                 if isinstance(s, list) and len(s) == 2 and isinstance(s[0], str)}
        if not isinstance(pairs.get(text_key), str):
            raise UserError(f"{where}: no [\"{text_key}\", text] pair in 'sentences' (found "
                            f"{', '.join(map(str, pairs)) or 'none'}; see --text-key)")
        bbox = item.get("bbox", [])
        if not isinstance(bbox, list) or not all(
                isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) for b in bbox):
            raise UserError(f"{where}: 'bbox' must be a list of [x1, y1, x2, y2] numbers")
        image = Path(item["image_id"]).expanduser()
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise UserError(f"{where}: image not found: {image}")
        images.append(image)
        texts.append(pairs[text_key])
        boxes.append(bbox)
    if not images:
        raise UserError(f"{path}: no samples")
    return images, texts, boxes


SKIPPED_FILE = "skipped.json"


def jsonl_line_numbers(path: Path) -> list[int]:
    """The file line number of each sample of a jsonl (``read_jsonl`` passes over blank lines)."""
    with open(path, encoding="utf-8-sig") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


class _Images(Dataset):
    """Preprocessed samples ``(image, boxes, mask, unreadable, error)``: an image that cannot be read comes back as
    its message in ``unreadable`` (skipped), any other bad input as ``error`` (fatal); a worker must not raise."""

    def __init__(self, images: list[Path], boxes: list[list], cfg: BriVLConfig):
        self.images, self.boxes, self.cfg = images, boxes, cfg

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        size, slots = self.cfg.img_size, self.cfg.max_img_len
        blank = torch.zeros(3, size, size), torch.zeros(slots, 4), torch.zeros(slots)
        try:
            img = open_image(self.images[i])
        except UserError as e:
            return (*blank, str(e), "")
        try:
            return (*prepare_image(img, self.boxes[i], self.cfg), "", "")
        except UserError as e:
            return (*blank, "", str(e))


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m brivl_infer.extract", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cfg", type=PathArg("in", "file", "yaml"), required=True,
                    help="original-format BriVL yml (e.g. cfg/test_xyb.yml)")
    ap.add_argument("--checkpoint", type=PathArg("in", "file", "checkpoint"), required=True,
                    help="BriVL checkpoint (e.g. BriVL-1.0-5500w.pth)")
    ap.add_argument("--jsonl", type=PathArg("in", "file", "jsonl"),
                    help="samples to encode (default: the cfg's DATASET.JSONPATH)")
    ap.add_argument("--features", type=OUT_DIR, required=True, help="output directory for np_img.npy and np_text.npy")
    ap.add_argument("--image-root", type=IN_DIR,
                    help="directory that relative image_id paths start from (default: cwd)")
    ap.add_argument("--text-key", default="sur_text", help="which 'sentences' entry is the text")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--workers", type=non_negative_int, help="image loading processes (default: DATASET.WORKERS)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="fp16/bf16: autocast (CUDA)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow a checkpoint that needs pickle (only for files from a source you trust)")
    return ap


def parsers() -> dict[str, ArgumentParser]:
    return {"": parser()}


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    check_precision(a.precision, resolve_device(a.device))  # before the features directory is made

    _, data = read_config(a.cfg)
    jsonl = a.jsonl or data.jsonpath
    if not jsonl:
        raise UserError("no --jsonl given and the cfg has no DATASET.JSONPATH")
    images, texts, boxes = read_samples(Path(jsonl), a.text_key, Path(a.image_root) if a.image_root else None)
    out = ensure_writable_dir(a.features)
    model = load_brivl(a.cfg, a.checkpoint, device=a.device, trust_checkpoint=a.trust_checkpoint,
                       precision=a.precision)
    workers = data.workers if a.workers is None else a.workers
    loader = DataLoader(_Images(images, boxes, model.config), batch_size=a.batch_size, num_workers=workers)
    dev = model.device
    img_feats, kept, skipped = [], [], []
    lines = jsonl_line_numbers(Path(jsonl))
    with torch.inference_mode():
        for start, (x, b, m, unreadable, errors) in zip(range(0, len(images), a.batch_size),
                                                        tqdm(loader, desc="images", unit="batch", leave=False),
                                                        strict=True):
            if any(errors):
                raise UserError(next(e for e in errors if e))
            good = [k for k, why in enumerate(unreadable) if not why]
            skipped.extend({"line": lines[start + k], "image": str(images[start + k]), "error": why}
                           for k, why in enumerate(unreadable) if why)
            kept.extend(start + k for k in good)
            if good:
                keep = torch.tensor(good)
                img_feats.append(model.image_features(x[keep].to(dev), b[keep].to(dev), m[keep].to(dev)).cpu())
    if not kept:
        raise UserError(f"{jsonl}: no readable image among its {len(images)} samples "
                        f"(e.g. line {skipped[0]['line']}: {skipped[0]['error']})")
    text_feats = model.encode_texts([texts[i] for i in kept], batch_size=a.batch_size).cpu()
    with StagedFiles() as staged:
        for name, feats in ((IMG_FILE, torch.cat(img_feats)), (TEXT_FILE, text_feats)):
            with open(staged.path(out / name), "wb") as f:
                np.save(f, feats.numpy(), allow_pickle=False)
        write_json(staged.path(out / SKIPPED_FILE), {"skipped": len(skipped), "samples": skipped})
        staged.commit()
    if skipped:
        print(f"skipped {len(skipped)} sample(s) whose image cannot be read (listed in {out / SKIPPED_FILE}), "
              f"first: line {skipped[0]['line']}: {skipped[0]['image']}")
    print(f"wrote {len(kept)} image and text features ({model.config.img_feature_dim}-d) to {out}")
    return 0


if __name__ == "__main__":
    run(main, prog="python -m brivl_infer.extract")
