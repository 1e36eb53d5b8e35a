"""Evaluation: BIG-Bench Hard, perplexity, held-out chat loss."""
