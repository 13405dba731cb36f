"""Styled-VQ: the image tokenizer of T ordered attribute tokens, its two-stage training and analysis."""
