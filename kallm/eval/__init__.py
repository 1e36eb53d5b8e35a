"""Evaluation: BIG-Bench Hard, perplexity, held-out chat loss."""

from .bbh import evaluate_bbh, is_correct, load_bbh
from .chat_loss import chat_loss
from .evaluate import evaluate, to_markdown, write_results
from .perplexity import load_text, perplexity
