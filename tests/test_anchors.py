"""Packed anchor blocks: each block sees exactly what one inference round at its anchor would see."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_draft, tiny_llama

from dspark.anchors import (
    Anchors,
    draft_hidden_at_anchors,
    every_anchor,
    packed_block_mask,
    sample_anchors,
    slot_targets,
)
from dspark.modeling_dspark import extract_target_features


def brute_force_mask(anchors: Anchors, length: int, block_size: int) -> torch.Tensor:
    batch, count = anchors.positions.shape
    mask = torch.zeros(batch, 1, count * block_size, length + count * block_size, dtype=torch.bool)
    for row in range(batch):
        for block in range(count):
            for slot in range(block_size):
                query = block * block_size + slot
                for key in range(length + count * block_size):
                    if key < length:
                        allowed = bool(anchors.valid[row, block]) and key < int(anchors.positions[row, block])
                    else:
                        allowed = (key - length) // block_size == block
                    mask[row, 0, query, key] = allowed
    return mask


def test_a_block_never_sees_tokens_at_or_after_its_anchor_nor_other_blocks():
    loss_mask = torch.zeros(3, 23, dtype=torch.bool)
    loss_mask[0, 5:] = True
    loss_mask[1, 19:] = True
    loss_mask[2, 9:20] = True
    anchors = sample_anchors(loss_mask, count=6, generator=torch.Generator().manual_seed(0))
    assert not anchors.valid[1].all()  # row 1 has fewer candidates than anchors: padding is exercised
    assert torch.equal(packed_block_mask(anchors, 23, 4), brute_force_mask(anchors, 23, 4))


def test_sampled_anchors_are_distinct_sorted_response_positions_followed_by_a_response_token():
    loss_mask = torch.zeros(2, 40, dtype=torch.bool)
    loss_mask[0, 10:] = True
    loss_mask[1, 30:38] = True
    anchors = sample_anchors(loss_mask, count=8, generator=torch.Generator().manual_seed(3))
    for row in range(2):
        chosen = anchors.positions[row][anchors.valid[row]].tolist()
        assert chosen == sorted(set(chosen))
        assert all(loss_mask[row, a] and loss_mask[row, a + 1] for a in chosen)
    assert int(anchors.valid[1].sum()) == 7  # positions 30..36 are the only candidates


@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_packed_blocks_equal_one_draft_forward_per_anchor(sample_from_anchor):
    target = tiny_llama()
    draft = tiny_draft(target, block_size=4, sample_from_anchor=sample_from_anchor, markov_rank=4)
    input_ids = torch.randint(0, 127, (2, 18), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.zeros(2, 18, dtype=torch.bool)
    loss_mask[:, 6:] = True
    with torch.no_grad():
        hidden_states = target(input_ids, output_hidden_states=True).hidden_states
        features = extract_target_features(hidden_states, draft.config.target_layer_ids)
        anchors = every_anchor(loss_mask)
        packed = draft_hidden_at_anchors(draft, features, input_ids, anchors)
        for row in range(2):
            for index in range(anchors.count):
                anchor = int(anchors.positions[row, index])
                block = draft.embed_block(input_ids[row : row + 1, anchor])
                alone = draft(block, features[row : row + 1, :anchor]).draft_hidden_states
                torch.testing.assert_close(packed[row, index], alone[0], atol=1e-5, rtol=1e-4)


def test_slot_targets_are_the_next_tokens_and_stop_at_the_first_unlabelled_slot():
    input_ids = torch.arange(100, 112)[None]
    loss_mask = torch.ones(1, 12, dtype=torch.bool)
    loss_mask[0, :3] = False
    anchors = Anchors(positions=torch.tensor([[3, 9]]), valid=torch.tensor([[True, True]]))
    slots = slot_targets(input_ids, loss_mask, anchors, num_slots=4)
    assert slots.labels[0, 0].tolist() == [104, 105, 106, 107]
    assert slots.previous[0, 0].tolist() == [103, 104, 105, 106]
    assert slots.target_positions[0, 0].tolist() == [3, 4, 5, 6]
    assert slots.valid[0, 0].tolist() == [True, True, True, True]
    assert slots.valid[0, 1].tolist() == [True, True, False, False]  # labels 10, 11 exist; 12, 13 run off the end


def test_flex_attention_blocks_equal_the_dense_mask_path():
    pytest.importorskip("torch.nn.attention.flex_attention")
    target = tiny_llama()
    draft = tiny_draft(target, block_size=4, markov_rank=4)
    input_ids = torch.randint(0, 127, (2, 14), generator=torch.Generator().manual_seed(4))
    loss_mask = torch.zeros(2, 14, dtype=torch.bool)
    loss_mask[0, 4:] = True
    loss_mask[1, 9:] = True  # fewer anchors: padding blocks are exercised
    anchors = sample_anchors(loss_mask, 6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = extract_target_features(
            target(input_ids, output_hidden_states=True).hidden_states, draft.config.target_layer_ids
        )
        dense = draft_hidden_at_anchors(draft, features, input_ids, anchors, attention="dense")
        flex = draft_hidden_at_anchors(draft, features, input_ids, anchors, attention="flex")
    valid = anchors.valid
    torch.testing.assert_close(flex[valid], dense[valid], atol=1e-5, rtol=1e-4)
