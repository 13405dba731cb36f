"""The DALLE transformer over image tokens: model, training on the shared runtime, cached sampling, generation.

Two generators over the same tokens: the autoregressive :class:`DALLE` (``sample_tokens``) and the MaskGIT-style
:class:`MaskedDALLE` (``sample_tokens_masked``; ``python -m dalle_train --kind masked``).

``python -m dalle_train`` trains (``--help``); ``python dalle_gen.py TEXT N DIR`` generates with a checkpoint.
"""

from dalle_train.masked import MaskedDALLE
from dalle_train.masked_sample import sample_tokens_masked
from dalle_train.model import DALLE, DALLEConfig, KVCache
from dalle_train.sample import sample_tokens, top_k_count

__all__ = ["DALLE", "DALLEConfig", "KVCache", "MaskedDALLE", "sample_tokens", "sample_tokens_masked", "top_k_count"]
