"""BriVL-1.0 inference (BAAI WuDao): the two towers (:mod:`.model`), the original preprocessing (:mod:`.preprocess`),
the batched encoder and scorer (:mod:`.encoder`), strict loading of the official checkpoint (:mod:`.load`), and the
feature-extraction and retrieval-evaluation CLIs (:mod:`.extract`, :mod:`.evaluate`). Its reranking scorer is
``zh_t2i_rerank.brivl``."""
