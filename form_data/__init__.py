"""Data only: Wukong-style cleaning, download, exports, datasets (and their decoded-image cache), the Chinese text
tokenizer and its vocab digest, and the embedded synthetic set. Imports only :mod:`zh_t2i_base`."""
