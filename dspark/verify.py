"""Verification of drafted tokens against the target: greedy prefix matching and lossless rejection sampling.

The single implementation used by the package's own loop and by offline evaluation. (Inside
`target.generate(assistant_model=...)` transformers verifies with its own `_speculative_sampling`, fed with the exact
q the draft reports.)

Shapes: B rows, N drafted slots, V vocabulary. `target_logits[:, k]` is the target's (processed) distribution of the
token that follows the anchor and the first k drafted tokens, so it has N + 1 positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modeling_dspark import accept_prefix  # one definition, shared with the draft's confidence stop


@dataclass
class Verdict:
    """accepted: [B] drafted tokens kept per row; next_tokens: [B] the target's token after them (bonus/correction)."""

    accepted: torch.Tensor
    next_tokens: torch.Tensor


def _slots(lengths: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] True where the slot was actually proposed (slot < row length)."""
    return torch.arange(count, device=lengths.device)[None] < lengths[:, None]


def verify_greedy(draft_tokens: torch.Tensor, draft_lengths: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Keep drafted tokens while they equal the target's argmax; the next token is the target's argmax after them."""
    target_choice = target_logits.argmax(dim=-1)
    count = draft_tokens.shape[1]
    matches = (draft_tokens == target_choice[:, :count]) & _slots(draft_lengths, count)
    accepted = accept_prefix(matches)
    return Verdict(accepted, target_choice.gather(1, accepted[:, None]).squeeze(1))


def verify_sampling(
    draft_tokens: torch.Tensor,
    draft_lengths: torch.Tensor,
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Speculative sampling (Leviathan et al., Chen et al.): every emitted token is an exact draw from the target.

    Slot k is kept with probability min(1, p_k(x_k) / q_k(x_k)); at the first rejection the next token is drawn from
    the residual norm(max(p_k - q_k, 0)); if every proposed slot is kept, from p at the next position (bonus).
    `draft_logits` [B, N, V] must be the logits the draft actually sampled from.
    """
    count = draft_tokens.shape[1]
    p = torch.softmax(target_logits.float(), dim=-1)
    q = torch.softmax(draft_logits.float(), dim=-1)
    p_token = p[:, :count].gather(-1, draft_tokens[..., None]).squeeze(-1)
    q_token = q.gather(-1, draft_tokens[..., None]).squeeze(-1)
    uniform = torch.rand(p_token.shape, device=p_token.device, generator=generator)
    matches = (uniform * q_token < p_token) & _slots(draft_lengths, count)
    accepted = accept_prefix(matches)

    rows = torch.arange(draft_tokens.shape[0], device=draft_tokens.device)
    p_next = p[rows, accepted]
    rejected = accepted < draft_lengths
    q_next = torch.where(rejected[:, None], q[rows, accepted.clamp(max=count - 1)], torch.zeros_like(p_next))
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q up to rounding leaves no residual mass; then rejection had probability ~0 and p itself is exact.
    residual = torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), p_next)
    next_tokens = torch.multinomial(residual, num_samples=1, generator=generator).squeeze(1)
    return Verdict(accepted, next_tokens)


def verify(
    draft_tokens: torch.Tensor,
    draft_lengths: torch.Tensor,
    draft_logits: torch.Tensor | None,
    target_logits: torch.Tensor,
    do_sample: bool,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Greedy matching or rejection sampling, as the decoding mode asks."""
    if do_sample:
        if draft_logits is None:
            raise ValueError("dspark: sampling verification needs the draft's logits (q)")
        return verify_sampling(draft_tokens, draft_lengths, draft_logits, target_logits, generator)
    return verify_greedy(draft_tokens, draft_lengths, target_logits)


def acceptance_probability(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """[..., V] x [..., V] -> [...]: probability that rejection sampling keeps a token drawn from q, sum_x min(p, q).

    Equals 1 - TV(p, q); the expected acceptance of one slot given its prefix was kept.
    """
    p = torch.softmax(target_logits.float(), dim=-1)
    q = torch.softmax(draft_logits.float(), dim=-1)
    return torch.minimum(p, q).sum(dim=-1)
