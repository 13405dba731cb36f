"""FID and KID through torch-fidelity's InceptionV3, from a LOCAL weights file only: nothing is ever downloaded.

torch-fidelity downloads its weights when ``feature_extractor_weights_path`` is None; here the path is always given
(``--inception-weights``), after the file was read with ``torch.load(weights_only=True)``. torch-fidelity is imported
only when FID/KID are asked for (its import pulls in torchvision: about 2 s; it opens no connection).

Features: the 2048-d pool features of ``inception-v3-compat`` (torch-fidelity's TF-compatible resize to 299 px),
as FID and KID are usually reported. FID is the Fréchet distance of :mod:`zh_t2i_eval.frechet` over them (torch-
fidelity's formula, computed faster); KID is torch-fidelity's ``kid_features_to_metric`` (cubic polynomial kernel,
unbiased MMD², mean and std over random subsets).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zh_t2i_base.cli import UserError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
WHERE = (f"torch-fidelity's Inception weights {INCEPTION_FILE} (never downloaded here: fetch it once from "
         f"{INCEPTION_URL})")
MISSING = f"FID/KID need --inception-weights PATH: {WHERE}; or pass --no-fid to skip FID/KID"
FEATURE = "2048"


def load_inception(path: str | os.PathLike | None, device: torch.device):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with the weights in ``path``; a UserError naming the expected
    file when the path is not given, missing, not a state dict, or not of InceptionV3."""
    if not path:
        raise UserError(MISSING)
    try:
        data = Path(path).read_bytes()  # read once, parsed twice below
    except FileNotFoundError:
        raise UserError(f"Inception weights not found: {path}; expected {WHERE}") from None
    except OSError as e:
        raise UserError(f"cannot read the Inception weights {path}: {e.strerror or e}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a loadable weights file ({msg}); expected {WHERE}") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors; expected {WHERE}")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:  # the bytes already loaded with weights_only=True: torch-fidelity's own (pickle-enabled) load is safe now
        model = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE],
                                            feature_extractor_weights_path=io.BytesIO(data))
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: its tensors do not fit torch-fidelity's InceptionV3 ({detail}); expected "
                        f"{WHERE}") from None
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model, images: Sequence[Image.Image], device: torch.device, batch_size: int = 32
                       ) -> np.ndarray:
    """[N, 2048] float32 pool features. Images go in as uint8 at their own size (torch-fidelity resizes them to
    299 px); consecutive images of one size share a batch."""
    out = [np.zeros((0, int(FEATURE)), dtype=np.float32)]
    lo = 0
    while lo < len(images):
        hi = lo + 1
        while hi < len(images) and hi - lo < batch_size and images[hi].size == images[lo].size:
            hi += 1
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images[lo:hi]]))
        (feats,) = model(x.permute(0, 3, 1, 2).contiguous().to(device))
        out.append(feats.float().cpu().numpy())
        lo = hi
    return np.concatenate(out)


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
        ) -> tuple[float, float]:
    """(mean, std) of torch-fidelity's KID over ``subsets`` random subsets of ``min(subset_size, n_x, n_y)``."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(x), len(y))
    r = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=subsets, kid_subset_size=size,
                               verbose=False, rng_seed=seed)
    return float(r[KEY_METRIC_KID_MEAN]), float(r[KEY_METRIC_KID_STD])
