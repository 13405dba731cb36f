"""1:1 image<->text retrieval recall of extracted features (row i of np_img.npy pairs with row i of np_text.npy).

scores[i, j] = image_i . text_j; ranks and ties as :mod:`zh_t2i_base.retrieval` defines them (a stable sort, lower
index first). Prints image->text and text->image R@1/5/10 and their mean (as percentages).

    python -m brivl_infer.evaluate --features out/xyb [--json out/xyb/recall.json]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zh_t2i_base.cli import OUT_FILE, ArgumentParser, PathArg, UserError, positive_int, run
from zh_t2i_base.fileio import write_json
from zh_t2i_base.retrieval import KS, ranks, recall_metrics

IMG_FILE, TEXT_FILE = "np_img.npy", "np_text.npy"  # the original's file names
def recalls(img: np.ndarray, text: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """{"i2t": {"R@k": %}, "t2i": {...}, "mean_recall": %, "n": N} of paired float64 features."""
    out: dict = {"n": len(img)}
    for name, (q, c) in {"i2t": (img, text), "t2i": (text, img)}.items():
        m = recall_metrics(ranks(q, c), ks)
        out[name] = {f"R@{k}": m[f"R@{k}"] for k in ks}
    out["mean_recall"] = float(np.mean([v for d in ("i2t", "t2i") for v in out[d].values()]))
    return out


def load_features(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """np_img.npy and np_text.npy of ``directory`` as float64, checked to be finite, paired and 2-d."""
    arrays = []
    for name in (IMG_FILE, TEXT_FILE):
        path = directory / name
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"{path} not found (write it with python -m brivl_infer.extract)") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable .npy array ({' '.join(str(e).split())})") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or not len(arr):
            raise UserError(f"{path}: expected a non-empty float [N, D] array, got {arr.dtype} {arr.shape}")
        if not np.isfinite(arr).all():
            raise UserError(f"{path}: holds non-finite values")
        arrays.append(arr.astype(np.float64))
    img, text = arrays
    if img.shape != text.shape:
        raise UserError(f"{directory}: {IMG_FILE} {img.shape} and {TEXT_FILE} {text.shape} do not pair up")
    return img, text


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m brivl_infer.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=PathArg("in", "dir", "npy"), required=True,
                    help="directory with np_img.npy and np_text.npy")
    ap.add_argument("--ks", type=positive_int, nargs="+", default=list(KS), help="recall cut-offs")
    ap.add_argument("--json", type=OUT_FILE, help="also write the figures to this file")
    return ap


def parsers() -> dict[str, ArgumentParser]:
    return {"": parser()}


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    img, text = load_features(Path(a.features))
    res = recalls(img, text, a.ks)
    print(f"{res['n']} image-text pairs")
    for name, label in (("i2t", "image->text"), ("t2i", "text->image")):
        print(f"{label:<12}" + "  ".join(f"{k} {v:6.2f}%" for k, v in res[name].items()))
    print(f"{'mean recall':<12}{res['mean_recall']:.2f}%")
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    run(main, prog="python -m brivl_infer.evaluate")
