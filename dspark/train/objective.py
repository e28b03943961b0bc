"""The DSpark training objective on packed anchor blocks, with online target features.

For every sampled anchor a and drafting slot j (predicting position a + 1 + j), with the Markov head teacher-forced
on the data token at a + j:
    CE   = cross-entropy of the corrected draft logits against the data token (the target's own sampled text)
    TV   = sum_x |q(x) - p(x)|, p = the target's next-token distribution at a + j (an L1 / total-variation distance)
    conf = BCE(confidence logit, c*) with c* = clamp(1 - TV / 2, 0, 1) = the slot's true acceptance probability
Each term is averaged over valid slots with position weights w_j = exp(-j / gamma), and
    loss = w_ce * CE + w_tv * TV + w_conf * conf.
The target's embedding and lm_head stay frozen (the draft borrows them); the target runs under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..acceptance import expected_acceptance_length
from ..anchors import Anchors, draft_hidden_at_anchors, slot_targets
from ..modeling_dspark import DSparkDraftModel, extract_target_features


@dataclass
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    confidence: float = 1.0
    decay_gamma: float = 4.0


@dataclass
class TargetView:
    """What the frozen target gives a batch: features [B, L, K * H_t] and final (post-norm) hidden [B, L, H_t]."""

    features: torch.Tensor
    last_hidden: torch.Tensor


@torch.no_grad()
def observe_target(target: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer_ids: list[int]):
    """One no-grad target forward: the draft's context features and the states its next-token distributions come from.

    input_ids, attention_mask: [B, L] right-padded.
    """
    outputs = target.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return TargetView(
        features=extract_target_features(outputs.hidden_states, layer_ids), last_hidden=outputs.last_hidden_state
    )


@dataclass
class BlockLoss:
    """Loss terms (scalars; `total` carries the gradient) and detached per-slot statistics [N].

    slot_acceptance: mean teacher-forced acceptance probability sum_x min(p, q) per slot;
    slot_greedy_match: fraction of slots whose draft argmax equals the target's argmax; slot_count: valid slots.
    expected_length: mean over anchors of the expected tokens per round (bonus included) under teacher forcing.
    """

    total: torch.Tensor
    ce: torch.Tensor
    tv: torch.Tensor
    confidence: torch.Tensor
    slot_acceptance: torch.Tensor
    slot_greedy_match: torch.Tensor
    slot_count: torch.Tensor
    expected_length: torch.Tensor


def position_weights(num_slots: int, gamma: float, device: torch.device) -> torch.Tensor:
    """[N] w_j = exp(-j / gamma): early slots matter most, since a late slot only counts if all before it are kept."""
    return torch.exp(-torch.arange(num_slots, device=device, dtype=torch.float32) / gamma)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1e-12)


class DraftObjective(nn.Module):
    """Wraps the draft so that one `forward` computes the loss (what DDP/FSDP wrap and call).

    The target is held outside the module graph (through the draft's binding), so data-parallel wrappers see only
    the draft's trainable parameters.
    """

    def __init__(self, draft: DSparkDraftModel, weights: LossWeights, attention: str = "auto"):
        super().__init__()
        self.draft = draft
        self.weights = weights
        self.attention = attention

    def forward(
        self,
        view_features: torch.Tensor,
        view_last_hidden: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        anchor_positions: torch.Tensor,
        anchor_valid: torch.Tensor,
    ) -> BlockLoss:
        """view_*: the `TargetView` tensors; input_ids, loss_mask: [B, L]; anchor_*: [B, A] (see `Anchors`)."""
        draft = self.draft
        anchors = Anchors(anchor_positions, anchor_valid)
        num_slots = draft.config.num_draft_tokens
        draft_hidden = draft_hidden_at_anchors(draft, view_features, input_ids, anchors, self.attention)  # [B,A,N,H]
        slots = slot_targets(input_ids, loss_mask, anchors, num_slots)
        rows, anchor_index, slot_index = slots.valid.nonzero(as_tuple=True)
        hidden = draft_hidden[rows, anchor_index, slot_index]  # [M, H]
        previous = slots.previous[rows, anchor_index, slot_index]
        labels = slots.labels[rows, anchor_index, slot_index]
        target_states = view_last_hidden[rows, slots.target_positions[rows, anchor_index, slot_index]]

        draft_logits = draft.slot_logits(draft.block_logits(hidden), previous, hidden)  # [M, V] float32
        head = draft.output_head()
        with torch.no_grad():
            target_probs = torch.softmax(head(target_states.to(head.weight.dtype)).float(), dim=-1)
        draft_probs = torch.softmax(draft_logits, dim=-1)
        ce = F.cross_entropy(draft_logits, labels, reduction="none")
        tv = (draft_probs - target_probs).abs().sum(dim=-1)
        weights = position_weights(num_slots, self.weights.decay_gamma, hidden.device)[slot_index]
        ce_loss, tv_loss = weighted_mean(ce, weights), weighted_mean(tv, weights)
        total = self.weights.ce * ce_loss + self.weights.tv * tv_loss
        confidence_loss = torch.zeros((), device=hidden.device)
        if draft.confidence_head is not None:
            acceptance_target = (1.0 - tv.detach() / 2).clamp(0.0, 1.0)
            logit = draft.slot_confidence_logit(previous, hidden)
            confidence = F.binary_cross_entropy_with_logits(logit, acceptance_target, reduction="none")
            confidence_loss = weighted_mean(confidence, weights)
            total = total + self.weights.confidence * confidence_loss

        with torch.no_grad():
            acceptance = (1.0 - tv / 2).clamp(0.0, 1.0)
            greedy_match = (draft_logits.argmax(-1) == target_probs.argmax(-1)).float()
            slot_count = torch.zeros(num_slots, device=hidden.device).index_add_(0, slot_index, torch.ones_like(tv))
            slot_acceptance = torch.zeros(num_slots, device=hidden.device).index_add_(0, slot_index, acceptance)
            slot_match = torch.zeros(num_slots, device=hidden.device).index_add_(0, slot_index, greedy_match)
            per_anchor = torch.zeros(slots.valid.shape, device=hidden.device)
            per_anchor[rows, anchor_index, slot_index] = acceptance
            lengths = expected_acceptance_length(per_anchor, slots.valid.float())
            expected_length = lengths[anchors.valid].mean() if bool(anchors.valid.any()) else lengths.new_zeros(())
        return BlockLoss(
            total=total,
            ce=ce_loss.detach(),
            tv=tv_loss.detach(),
            confidence=confidence_loss.detach(),
            slot_acceptance=slot_acceptance / slot_count.clamp(min=1),
            slot_greedy_match=slot_match / slot_count.clamp(min=1),
            slot_count=slot_count,
            expected_length=expected_length,
        )
