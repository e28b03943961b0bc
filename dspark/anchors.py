"""Many draft blocks of one sequence in a single forward: anchors, the packed block mask, teacher-forced slots.

Training and offline evaluation both ask "what would the draft propose if a round started at position a?" for many
anchors a of a known sequence. Instead of one draft forward per anchor, the blocks `[x_a, MASK, ...]` of all anchors
are packed after the sequence's target features, and a mask gives each block exactly what it would see at inference:
the context strictly before its anchor (the anchor's own target features do not exist yet when it is drafted) and
its own block, bidirectionally, never another block.

Slot j of a block (j = 0 .. N-1, N = `config.num_draft_tokens`) predicts the token at position a + 1 + j whatever
the slot convention; its Markov "previous token" under teacher forcing is the token at a + j, and the target's
distribution for it is the target's next-token distribution at position a + j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modeling_dspark import DSparkDraftModel


@dataclass
class Anchors:
    """positions: [B, A] anchor positions (sorted per row; padded entries hold 0); valid: [B, A] real anchors."""

    positions: torch.Tensor
    valid: torch.Tensor

    @property
    def count(self) -> int:
        return self.positions.shape[1]


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: positions that can start a round: the anchor and the token after it are both response tokens."""
    candidates = torch.zeros_like(loss_mask, dtype=torch.bool)
    candidates[:, :-1] = loss_mask[:, :-1].bool() & loss_mask[:, 1:].bool()
    return candidates


def sample_anchors(loss_mask: torch.Tensor, count: int, generator: torch.Generator | None = None) -> Anchors:
    """Up to `count` distinct random anchors per row among `anchor_candidates`, sorted (rows with fewer get padding).

    loss_mask: [B, L] bool or 0/1, True on response tokens. The draw uses `generator` on the CPU so that a run is
    reproducible on any device.
    """
    candidates = anchor_candidates(loss_mask).cpu()
    scores = torch.rand(candidates.shape, generator=generator)
    scores = scores.masked_fill(~candidates, -1.0)
    take = min(count, candidates.shape[1])
    chosen_scores, chosen = scores.topk(take, dim=1)
    valid = chosen_scores >= 0
    positions = torch.where(valid, chosen, torch.full_like(chosen, candidates.shape[1]))
    positions, order = positions.sort(dim=1)
    valid = valid.gather(1, order)
    positions = positions.masked_fill(~valid, 0)
    return Anchors(positions.to(loss_mask.device), valid.to(loss_mask.device))


def every_anchor(loss_mask: torch.Tensor) -> Anchors:
    """All `anchor_candidates` of every row (for evaluation), left-aligned and padded to the longest row."""
    candidates = anchor_candidates(loss_mask)
    width = max(int(candidates.sum(1).max()), 1)
    positions = torch.zeros(candidates.shape[0], width, dtype=torch.long, device=loss_mask.device)
    valid = torch.zeros(candidates.shape[0], width, dtype=torch.bool, device=loss_mask.device)
    for row in range(candidates.shape[0]):
        found = candidates[row].nonzero().squeeze(1)
        positions[row, : found.numel()] = found
        valid[row, : found.numel()] = True
    return Anchors(positions, valid)


def packed_block_mask(anchors: Anchors, sequence_length: int, block_size: int) -> torch.Tensor:
    """Bool mask [B, 1, A * block_size, sequence_length + A * block_size], True = may attend.

    Keys are the sequence's context features then the packed blocks. A valid block sees context keys < its anchor
    and its own block; an invalid (padding) block sees only itself, which keeps its softmax finite.
    """
    batch, count = anchors.positions.shape
    device = anchors.positions.device
    context_index = torch.arange(sequence_length, device=device)
    sees_context = (context_index[None, None, :] < anchors.positions[:, :, None]) & anchors.valid[:, :, None]
    sees_context = sees_context[:, :, None, :].expand(batch, count, block_size, sequence_length)
    block_of_key = torch.arange(count, device=device).repeat_interleave(block_size)
    same_block = block_of_key[None, :] == torch.arange(count, device=device)[:, None]
    sees_blocks = same_block[None, :, None, :].expand(batch, count, block_size, count * block_size)
    mask = torch.cat([sees_context, sees_blocks], dim=-1)
    return mask.reshape(batch, 1, count * block_size, sequence_length + count * block_size)


def packed_block_flex_mask(anchors: Anchors, sequence_length: int, block_size: int):
    """The same visibility as `packed_block_mask`, as a FlexAttention BlockMask (no dense [Q, KV] tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    positions, valid = anchors.positions, anchors.valid

    def visible(batch, head, query, key):
        block = query // block_size
        in_context = key < sequence_length
        sees_context = in_context & (key < positions[batch, block]) & valid[batch, block]
        sees_own_block = ~in_context & ((key - sequence_length) // block_size == block)
        return sees_context | sees_own_block

    batch, count = positions.shape
    queries = count * block_size
    return create_block_mask(visible, batch, None, queries, sequence_length + queries, device=positions.device)


def resolve_attention(attention: str, device: torch.device) -> str:
    """`auto` is FlexAttention on CUDA (when torch has it) and the dense mask elsewhere."""
    if attention not in ("auto", "dense", "flex"):
        raise ValueError(f"dspark: attention must be auto, dense or flex, got {attention!r}")
    if attention != "auto":
        return attention
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return "dense"
    return "flex" if device.type == "cuda" else "dense"


def slot_positions(anchors: Anchors, num_slots: int) -> torch.Tensor:
    """[B, A, num_slots] positions a + j, clamped to 0 for padding anchors."""
    offsets = torch.arange(num_slots, device=anchors.positions.device)
    return (anchors.positions[:, :, None] + offsets) * anchors.valid[:, :, None]


def draft_hidden_at_anchors(
    draft: DSparkDraftModel, features: torch.Tensor, input_ids: torch.Tensor, anchors: Anchors, attention: str = "auto"
) -> torch.Tensor:
    """Drafting-slot hidden states [B, A, N, H] of every anchor's block, in one draft forward.

    features: [B, L, K * H_t] target features of the whole sequence; input_ids: [B, L]. attention: `dense` (a bool
    mask through SDPA), `flex` (a FlexAttention BlockMask) or `auto` (flex on CUDA, dense elsewhere).
    """
    if any(kind == "sliding_attention" for kind in draft.config.layer_types):
        raise ValueError(
            "dspark: packed blocks (training, offline evaluation) do not support sliding-window draft layers yet; "
            "use full attention layers (the default) for a draft you train with dspark."
        )
    block_size = draft.config.block_size
    batch, length = input_ids.shape
    block_positions = slot_positions(anchors, block_size)  # [B, A, bs]
    block_ids = torch.full_like(block_positions, draft.config.mask_token_id)
    block_ids[:, :, 0] = input_ids.gather(1, anchors.positions)
    noise_embeds = draft.input_embeddings()(block_ids.flatten(1))
    context_positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
    position_ids = torch.cat([context_positions, block_positions.flatten(1)], dim=1)
    if resolve_attention(attention, input_ids.device) == "flex":
        mask = packed_block_flex_mask(anchors, length, block_size)
    else:
        mask = packed_block_mask(anchors, length, block_size)
    hidden = draft.backbone(noise_embeds, features, position_ids=position_ids, attention_mask=mask)
    hidden = hidden.view(batch, anchors.count, block_size, -1)
    return hidden[:, :, draft.first_drafting_slot :]


@dataclass
class SlotTargets:
    """Teacher-forced view of the slots of every block, each [B, A, N].

    labels: the sequence's token at a + 1 + j; previous: the token at a + j (the Markov head's x_{j-1});
    target_positions: a + j, where the target's next-token distribution for the slot is read;
    valid: the slot's label is a response token inside the sequence and so are all earlier slots' labels
    (acceptance is a prefix property, so a slot after a gap says nothing).
    """

    labels: torch.Tensor
    previous: torch.Tensor
    target_positions: torch.Tensor
    valid: torch.Tensor


def slot_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: Anchors, num_slots: int) -> SlotTargets:
    """Labels, Markov inputs and target positions of every slot (shapes [B, A, num_slots])."""
    length = input_ids.shape[1]
    positions = anchors.positions[:, :, None] + torch.arange(num_slots, device=input_ids.device)  # a + j
    label_positions = positions + 1
    inside = label_positions < length
    clamped = label_positions.clamp(max=length - 1)
    flat = clamped.flatten(1)
    labels = input_ids.gather(1, flat).view_as(clamped)
    labelled = loss_mask.bool().gather(1, flat).view_as(clamped) & inside & anchors.valid[:, :, None]
    valid = labelled.long().cumprod(dim=-1).bool()
    previous = input_ids.gather(1, positions.clamp(max=length - 1).flatten(1)).view_as(positions)
    return SlotTargets(labels=labels, previous=previous, target_positions=positions.clamp(max=length - 1), valid=valid)
