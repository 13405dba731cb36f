"""``python clip_sort.py TEXT N DIR``: rerank the images ``dalle_gen.py`` wrote (``DIR/{i}.png|jpg``, i < N) by how
well they match TEXT.

Prints a ranking table and writes ``DIR/ranking.json`` (file, score, rank for every image; the unreadable ones, skipped,
under "skipped"), ``DIR/top/`` (the top-k copied in rank order as ``{rank}_{file}``) and ``DIR/ranked_grid.png`` (the
best 64 in rank order, score under each). Images are read and scored a chunk at a time, in memory that does not grow
with N.
``TEXT`` may be ``@FILE`` (one prompt per line): prompt i ranks ``DIR/p{i}/``, as ``dalle_gen.py @FILE N DIR`` wrote
them, with one scorer load for all.

Scorers (``--scorer``):
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from zh_t2i_base.cli import IN_DIR, ArgumentParser, expand_prompts, positive_int, prompt_text, run
from zh_t2i_base.precision import PRECISIONS
from zh_t2i_rerank.registry import USAGE, describe

__doc__ += describe() + "\n"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the scorer table kept as laid out."""


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="clip_sort.py", description=__doc__.split("\n\n")[0], epilog="scorers:\n" + describe(),
                       formatter_class=_HelpFormatter)
    p.add_argument("text", type=prompt_text,
                   help="the caption the images were generated for, or @FILE: one a line, ranking DIR/p{i}")
    p.add_argument("n", type=positive_int, help="number of images: DIR/0.png ... DIR/{N-1}.png (or .jpg)")
    p.add_argument("dir", type=IN_DIR, help="directory of the generated images")
    p.add_argument("--scorer", default="clip:runs/clip", help=USAGE)
    p.add_argument("--top-k", type=positive_int, default=4, help="images copied to DIR/top/")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images encoded together")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="bf16/fp16: autocast (CUDA, or bf16 on a CPU with AVX512-BF16/AMX); scores move by ~1e-3")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickle when loading the scorer's weights")
    return p


def parsers() -> dict[str, ArgumentParser]:
    return {"": parser()}


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from zh_t2i_base.fileio import ensure_writable_dir
    from zh_t2i_rerank.outputs import find_images, score_images, write_outputs
    from zh_t2i_rerank.registry import make_scorer, split_spec

    split_spec(a.scorer)  # an unknown scorer fails before any image is read
    jobs = [(text, Path(d), find_images(Path(d), a.n)) for text, d in expand_prompts(a.text, a.dir)]
    for _, directory, _ in jobs:
        ensure_writable_dir(directory)
    scorer = make_scorer(a.scorer, device=a.device, batch_size=a.batch_size, trust_checkpoint=a.trust_checkpoint,
                         precision=a.precision)
    for text, directory, paths in jobs:
        scored, scores, skipped = score_images(scorer, text, paths, chunk=max(256, a.batch_size))
        ranking = write_outputs(directory, text, a.scorer, scored, scores, a.top_k, skipped)
        if len(jobs) > 1:
            print(f"{directory}: {text}")
        print(f"{'rank':>4}  {'score':>9}  file")
        for row in ranking:
            print(f"{row['rank']:>4}  {row['score']:>9.4f}  {row['file']}")
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s): {', '.join(p.name for p in skipped[:5])}"
                  f"{', ...' if len(skipped) > 5 else ''}")
        print(f"wrote {directory}/ranking.json, {directory}/top/ (top {min(a.top_k, len(ranking))}), "
              f"{directory}/ranked_grid.png", flush=True)
    return 0


if __name__ == "__main__":
    run(main, prog="clip_sort.py")
