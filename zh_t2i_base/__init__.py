"""The toolkit's plumbing, under every other package and importing none of them: the CLI error convention
(:mod:`.cli`), atomic files and safe weight loading (:mod:`.fileio`), reading our checkpoint files (:mod:`.checkpoint`),
devices (:mod:`.device`), inference precisions and BatchNorm folding (:mod:`.precision`), image grids (:mod:`.images`)
and retrieval metrics (:mod:`.retrieval`)."""
