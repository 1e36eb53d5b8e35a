"""Training on chat data: ``train(model, tokenizer, data, TrainConfig(...), teacher=None)``."""

from ..data.chat import ChatCollator, DataStats, prepare_chat_dataset, tokenize_conversation
from .distill import DistillationTrainer
from .trainer import TrainConfig, TrainResult, check_packing_support, train
