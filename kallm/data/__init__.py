"""Training and evaluation data: chat conversations read, cleaned, rendered with a chat template and tokenized with
their assistant turns marked (``chat``); labelled rows of a classification task (``classification``); token
sequences padded into batches (``padding``); the data folder ``$KALLM_DATA_DIR`` names (``folder``)."""

from .chat import (
    IGNORE_INDEX,
    ChatCollator,
    DataStats,
    TemplateMismatch,
    load_conversations,
    prepare_chat_dataset,
    tokenize_conversation,
    tokenize_conversations,
)
from .folder import DATA_FOLDER_VARIABLE, data_folder, require_data_folder
