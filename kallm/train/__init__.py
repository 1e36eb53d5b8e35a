"""Training on chat data: ``train(model, tokenizer, data, TrainConfig(...), teacher=None)``."""

from ..data.chat import ChatCollator, DataStats, prepare_chat_dataset, tokenize_conversation
from .config import TrainConfig, TrainResult
from .distill import DistillationTrainer
from .trainer import check_packing_support, train
