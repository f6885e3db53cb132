"""Pieces of examples/train_lm.py: the corpus (data), the FFN choices at matched activated
parameters (ffns), the decoder-only transformer (model) and the routing metrics (metrics)."""
