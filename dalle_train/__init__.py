"""The DALLE transformer over image tokens: model, training on the shared runtime, cached sampling, generation.

``python -m dalle_train`` trains (``--help``); ``python dalle_gen.py TEXT N DIR`` generates with a checkpoint.
"""

from dalle_train.model import DALLE, DALLEConfig, KVCache
from dalle_train.sample import sample_tokens, top_k_count

__all__ = ["DALLE", "DALLEConfig", "KVCache", "sample_tokens", "top_k_count"]
