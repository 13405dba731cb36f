"""THE list of reranking scorers: ``--scorer PREFIX:ARG[:ARG...]`` picks the module registered under PREFIX.

A scorer module has ``USAGE`` (its ``--scorer`` form), ``HELP`` (one line) and ``make_scorer(args, device=...,
batch_size=..., trust_checkpoint=..., precision=...)`` returning a :class:`~zh_t2i_rerank.scorer.Scorer`; it imports
its model code inside ``make_scorer``, so listing the scorers stays cheap. Adding a scorer is one module and one line
here: ``clip_sort.py``'s usage, ``--help`` and docstring are generated from this table."""

from __future__ import annotations

from types import ModuleType

from zh_t2i_base.cli import UserError
from zh_t2i_base.device import resolve_device
from zh_t2i_base.precision import check_precision
from zh_t2i_rerank import brivl, clip, cnclip
from zh_t2i_rerank.scorer import Scorer

SCORERS: dict[str, ModuleType] = {
    "clip": clip,
    "cnclip": cnclip,
    "brivl": brivl,
}

USAGE = " | ".join(m.USAGE for m in SCORERS.values())


def describe(indent: str = "  ") -> str:
    """One line per scorer: its ``--scorer`` form and what it is."""
    width = max(len(m.USAGE) for m in SCORERS.values())
    return "\n".join(f"{indent}{m.USAGE:<{width}}  {m.HELP}" for m in SCORERS.values())


def split_spec(spec: str) -> tuple[str, list[str]]:
    """``"cnclip:ViT-B-16:w.pt"`` -> ``("cnclip", ["ViT-B-16", "w.pt"])``; UserError for an unknown prefix."""
    prefix, _, rest = spec.partition(":")
    if prefix not in SCORERS:
        raise UserError(f"unknown scorer {prefix!r} in --scorer {spec!r}; use {USAGE}")
    return prefix, rest.split(":") if rest else []


def make_scorer(spec: str, device: str = "auto", batch_size: int = 32, trust_checkpoint: bool = False,
                precision: str = "fp32") -> Scorer:
    """The scorer for ``--scorer`` ``spec``."""
    prefix, args = split_spec(spec)
    check_precision(precision, resolve_device(device))  # before any weights are read
    return SCORERS[prefix].make_scorer(args, device=device, batch_size=batch_size, trust_checkpoint=trust_checkpoint,
                                       precision=precision)
