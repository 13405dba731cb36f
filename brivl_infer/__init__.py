"""BriVL-1.0 inference (BAAI WuDao): the two towers, the original preprocessing, strict loading of the official
checkpoint, feature extraction + retrieval evaluation CLIs and a reranking scorer.

``BriVL`` and ``BriVLConfig`` are imported on first use, so ``python -m brivl_infer.evaluate`` needs numpy only.
"""

__all__ = ["BriVL", "BriVLConfig"]


def __getattr__(name: str):
    if name in __all__:
        from brivl_infer import model

        return getattr(model, name)
    raise AttributeError(f"module 'brivl_infer' has no attribute {name!r}")
