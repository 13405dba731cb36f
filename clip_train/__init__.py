"""Chinese CLIP on open_clip: model configs (:mod:`clip_train.model`), training on the shared runtime
(:mod:`clip_train.train`, ``python -m clip_train``), retrieval metrics (:mod:`clip_train.eval`), checkpoint loading
(:mod:`clip_train.load`). Its reranking scorer is ``zh_t2i_rerank.clip``."""
