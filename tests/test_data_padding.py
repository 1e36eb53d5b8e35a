"""One padding helper for every batch of token sequences kallm builds (healing, classification, BBH scoring)."""

import pytest
import torch

from kallm.data.classification import batch
from kallm.data.padding import pad_sequences


def test_right_padding_keeps_each_sequence_at_the_start_and_masks_the_rest():
    ids, mask = pad_sequences([[5, 6, 7], torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_padding_ends_every_sequence_at_the_last_column():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_an_unknown_side_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="side must be one of right, left, got 'middle'"):
        pad_sequences([[1]], 0, side="middle")


def test_a_classification_batch_is_right_padded_with_its_labels():
    input_ids, attention, labels = batch([([1, 2], 3), ([4], 0)], pad_id=0)
    assert input_ids.tolist() == [[1, 2], [4, 0]] and attention.tolist() == [[1, 1], [1, 0]]
    assert labels.tolist() == [3, 0]
