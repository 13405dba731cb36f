"""Evaluation of generated images (``python -m zh_t2i_eval``): FID/KID from local Inception weights, a reranking
scorer's text-image score, and the Fréchet distance in the demo judge's feature space."""
