"""``python dalle_gen.py TEXT N DIR``: N images for a Chinese caption with a trained DALLE checkpoint.

``TEXT`` may be ``@FILE``: one prompt per line, prompt i written to ``DIR/p{i}/`` with seeds ``--seed + 1000 i + j``,
all in one process (one start-up and one model load for every prompt).

Writes ``DIR/{i}.png`` (``--format jpg`` for the seed's ``{i}.jpg``) batch by batch as they are made, in memory that
does not grow with N; at the end ``DIR/grid.png`` (the first 64) and ``DIR/meta.json`` (prompt, settings, every
image's seed, checkpoint). Rerunning the same command resumes: images already there are kept. A DIR holding another
run's images is refused unless ``--overwrite``. Sampling is batched and KV-cached; ``--cond-scale`` > 1 uses
classifier-free guidance (the model must have been trained with ``--null-cond-prob`` > 0); ``--top-k`` /
``--filter-thres`` act on the image vocabulary only. Then rerank with ``python clip_sort.py TEXT N DIR``.

The sampler follows the checkpoint's kind: autoregressive (``python -m dalle_train``, token by token) or masked
(``--kind masked``: MaskGIT-style parallel decoding in ``--steps`` steps, default 12, most confident tokens first or
``--unmask-order sequential``). ``--steps`` and ``--unmask-order`` are refused for an autoregressive checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence

from zh_t2i_base.cli import (
    OUT_DIR,
    PROMPT_SEED_STRIDE,
    ArgumentParser,
    PathArg,
    UserError,
    expand_prompts,
    finite_float,
    int_at_least,
    positive_int,
    prompt_text,
    run,
)

DEFAULT_CHECKPOINT = "runs/dalle"


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="dalle_gen.py", description=__doc__.split("\n\n")[0])
    p.add_argument("text", type=prompt_text,
                   help="the caption (Chinese; longer than the model's text length -> truncated, with a "
                        "warning), or @FILE: one caption a line, caption i written to DIR/p{i}")
    p.add_argument("n", type=positive_int, help="number of images (any number: written batch by batch)")
    p.add_argument("dir", type=OUT_DIR, help="output directory (created if missing)")
    p.add_argument("--checkpoint", type=PathArg("in", content="checkpoint"), default=argparse.SUPPRESS,
                   help=f"DALLE run directory, ckpt-*.pt or dalle.safetensors (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images sampled together")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--top-k", type=positive_int, help="sample among the k most likely image tokens")
    k.add_argument("--filter-thres", type=finite_float(0.0),
                   help="keep the top (1 - thres) fraction of the image vocabulary (default 0.9 when --top-k is not "
                        "given)")
    p.add_argument("--temperature", type=finite_float(0.0), default=1.0)
    p.add_argument("--cond-scale", type=finite_float(), default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--steps", type=positive_int,
                   help="masked checkpoints only: parallel decoding steps (12 when not given)")
    p.add_argument("--unmask-order", choices=("confidence", "sequential"),
                   help="masked checkpoints only: fix the most confident tokens first (confidence, used when not "
                        "given), or the first ones in token order (sequential: coarse -> fine for Styled-VQ)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="image i uses seed + i")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    p.add_argument("--vocab", type=PathArg("in", content="text"),
                   help="text vocab to check against the one stored in the checkpoint")
    p.add_argument("--image-tokenizer", type=PathArg("in", content="checkpoint"),
                   help="the image tokenizer, if it moved since training")
    p.add_argument("--image-tokenizer-yaml", type=PathArg("in", "file", "yaml"),
                   help="taming model.yaml (with a taming .ckpt)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickle for a taming .ckpt")
    p.add_argument("--overwrite", action="store_true", help="replace the images of another run in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parsers() -> dict[str, ArgumentParser]:
    return {"": parser()}


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    filter_thres = a.filter_thres if a.filter_thres is not None or a.top_k is not None else 0.9
    if filter_thres is not None and not 0.0 <= filter_thres < 1.0:
        raise UserError(f"--filter-thres must be in [0, 1), got {filter_thres}")
    from dalle_train.generate import check_output_dir, load_dalle, sampler_options, settings_dict, write_images
    from zh_t2i_base.fileio import ensure_writable_dir

    jobs = expand_prompts(a.text, a.dir)
    bundle = load_dalle(getattr(a, "checkpoint", DEFAULT_CHECKPOINT), a.device, a.vocab, a.image_tokenizer,
                        a.image_tokenizer_yaml, a.trust_checkpoint)
    sampler_options(bundle, a.steps, a.unmask_order)  # --steps / --unmask-order: masked checkpoints only
    runs = []
    for i, (text, out) in enumerate(jobs):  # every DIR checked before any image is made
        ensure_writable_dir(out)
        settings = settings_dict(bundle, batch_size=a.batch_size, top_k=a.top_k, filter_thres=filter_thres,
                                 temperature=a.temperature, cond_scale=a.cond_scale,
                                 seed=a.seed + PROMPT_SEED_STRIDE * i, steps=a.steps, unmask_order=a.unmask_order)
        runs.append((text, check_output_dir(out, text, bundle.checkpoint, settings, a.format, a.overwrite), settings))
    for text, out, settings in runs:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.formatwarning = lambda msg, *args, **kw: f"dalle_gen.py: warning: {msg}\n"
            meta = write_images(bundle, text, a.n, out, settings, image_format=a.format, overwrite=a.overwrite,
                                progress=not a.quiet)
        seconds = time.perf_counter() - t0
        made = meta["n"] - meta["reused"]
        print(json.dumps({"dir": str(out), "images": meta["n"], "made": made, "reused": meta["reused"],
                          "seconds": round(seconds, 3), "images_per_s": round(made / max(seconds, 1e-9), 2)},
                         ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    run(main, prog="dalle_gen.py")
