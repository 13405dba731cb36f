"""Everything about data: Wukong-style cleaning, download, exports, datasets, the Chinese text tokenizer and the
embedded synthetic data set. Imports nothing else of this project; every other package may import it."""

__all__ = ["UserError"]

from form_data.cli import UserError
