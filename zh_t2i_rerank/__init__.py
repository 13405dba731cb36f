"""Reranking generated images by how well they match their text: the :class:`~.scorer.Scorer` protocol, the ONE
scorer registry (:mod:`.registry`: clip, cnclip, brivl), one module per scorer, and the ranking outputs
(:mod:`.outputs`). ``clip_sort.py`` is its command line."""
