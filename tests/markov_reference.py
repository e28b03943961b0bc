"""The DSpark Markov sampling step written out as a test oracle: base logits in, drafted tokens and their exact q out.

The package runs one implementation, `DSparkDraftModel.draft_block`; the patched vLLM files carry their own copy
(they cannot import `dspark`) with options HF has no use for (top-N, per-request temperatures). This plain statement
of the math lets tests/test_vllm_patches.py hold both to the same definition.

One block, left to right (k = 0 .. K-1, x_{-1} = the anchor, i.e. the bonus token the target just emitted):

    e_k      = W1[x_{k-1}]                                     (vanilla)
             = sigmoid(gate([h_k ; W1[x_{k-1}]])) * W1[x_{k-1}]  (gated)
    bias_k   = W2 e_k                                           [V]
    z_k      = U_k + bias_k        (top-N: only on the N largest U_k; truncate: every other token at -inf)
    q_k      = softmax(z_k / T)    (T per request; rows with T <= 1e-5 are greedy and use T = 1)
    x_k      = argmax(q_k / E_k), E_k ~ Exp(1)   (the exponential race: an exact draw from q_k)
             = argmax(z_k)                        (greedy rows)

The confidence head, when present, scores slot k from [h_k ; W1[x_{k-1}]] (the raw table row, or h_k alone) before
x_k is drawn; with a threshold > 0 a row stops at the first slot k >= 1 whose score (c_k, or the survival product
c_0...c_k) is below it.

Shapes: B rows (requests), K slots, V vocabulary, r Markov rank, H draft hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GREEDY_TEMPERATURE = 1e-5  # a row whose temperature is at or below this is decoded greedily (vLLM's _SAMPLING_EPS)
CONFIDENCE_STOP_RULES = ("position", "survival")


@dataclass
class MarkovWeights:
    """The Markov head's tensors, named as in DeepSpec checkpoints (`markov_head.*`).

    w1: [V, r] `markov_w1.weight` (an embedding table); w2: [V, r] `markov_w2.weight` (Linear r -> V);
    gate_weight: [r, H + r] and gate_bias: [r] `gate_proj.*`, only for the gated head.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    gate_weight: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.gate_weight is not None


@dataclass
class ConfidenceWeights:
    """The confidence head `confidence_head.proj`: weight [1, H (+ r)], bias [1]; `with_markov` adds W1[x_{k-1}]."""

    weight: torch.Tensor
    bias: torch.Tensor
    with_markov: bool


@dataclass
class MarkovBlock:
    """One drafted block.

    tokens: [B, K] int64. logits: [B, K, V] float32, the processed logits each token was drawn from (corrected,
    truncated, divided by the row's temperature). probs: [B, K, V] float32 = softmax(logits), the exact q that
    rejection sampling must use. confidence: [B, K] float32 or None. lengths: [B] tokens each row proposes (K unless
    the confidence stop cut the row; always >= 1).
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    confidence: torch.Tensor | None
    lengths: torch.Tensor


def markov_embedding(weights: MarkovWeights, previous: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """e = W1[previous] (gated: times sigmoid(gate([hidden ; W1[previous]]))). previous [B], hidden [B, H] -> [B, r]."""
    embedded = F.embedding(previous, weights.w1)
    if not weights.gated:
        return embedded
    if hidden is None:
        raise ValueError("dspark: the gated Markov head needs the slot's hidden state.")
    gate_input = torch.cat([hidden, embedded.to(hidden.dtype)], dim=-1)
    return torch.sigmoid(F.linear(gate_input, weights.gate_weight, weights.gate_bias)) * embedded


def markov_bias(weights: MarkovWeights, previous: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """The full bias W2 e over the vocabulary: [B, V] float32 (computed in W2's dtype, as the HF model does)."""
    embedded = markov_embedding(weights, previous, hidden)
    return F.linear(embedded.to(weights.w2.dtype), weights.w2).float()


def corrected_logits(
    base_logits: torch.Tensor,
    bias: torch.Tensor,
    top_n: int = 0,
    truncate: bool = False,
) -> torch.Tensor:
    """z = U + bias: [B, V] float32.

    top_n > 0 (and < V): only the N tokens with the largest *base* logits get the bias; the others keep U, or, with
    `truncate`, are excluded (-inf) so the row samples among the N candidates only.
    """
    base_logits = base_logits.float()
    vocab = base_logits.shape[-1]
    if top_n <= 0 or top_n >= vocab:
        return base_logits + bias
    candidates = base_logits.topk(top_n, dim=-1).indices
    corrected = torch.full_like(base_logits, float("-inf")) if truncate else base_logits.clone()
    return corrected.scatter(-1, candidates, base_logits.gather(-1, candidates) + bias.gather(-1, candidates))


def confidence_probability(
    weights: ConfidenceWeights, hidden: torch.Tensor, markov_embedding_of_previous: torch.Tensor | None
) -> torch.Tensor:
    """c = sigmoid(proj([hidden ; W1[previous]])) in float32: hidden [B, H], W1[previous] [B, r] -> [B]."""
    features = hidden
    if weights.with_markov:
        if markov_embedding_of_previous is None:
            raise ValueError("dspark: this confidence head reads the Markov embedding; pass Markov weights.")
        features = torch.cat([hidden, markov_embedding_of_previous], dim=-1)
    logit = F.linear(features.float(), weights.weight.float(), weights.bias.float()).squeeze(-1)
    return torch.sigmoid(logit)


def row_temperatures(temperature: torch.Tensor | float | None, rows: int, device: torch.device) -> torch.Tensor:
    """Per-row temperatures [B] float32; 0 marks a greedy row. None means every row is greedy."""
    if temperature is None:
        return torch.zeros(rows, device=device)
    if not isinstance(temperature, torch.Tensor):
        return torch.full((rows,), float(temperature), device=device)
    temperature = temperature.to(device=device, dtype=torch.float32).reshape(-1)
    if temperature.numel() == 1:
        return temperature.expand(rows)
    if temperature.numel() != rows:
        raise ValueError(f"dspark: {temperature.numel()} temperatures for {rows} rows; pass one per row.")
    return temperature


def sample_markov_block(
    base_logits: torch.Tensor,
    anchor_ids: torch.Tensor,
    markov: MarkovWeights | None,
    hidden: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    top_n: int = 0,
    truncate: bool = False,
    exponential_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    confidence: ConfidenceWeights | None = None,
    confidence_threshold: float = 0.0,
    confidence_stop: str = "position",
) -> MarkovBlock:
    """Draft one block left to right (see the module docstring for the math).

    base_logits: [B, K, V] the backbone's logits of the K drafting slots; anchor_ids: [B] the token before slot 0;
    markov: the head's weights, or None for a plain DFlash draft (then z = U); hidden: [B, K, H] the slots' final
    hidden states (gated head and confidence head); temperature: [B], a float, or None (all greedy);
    exponential_noise: [B, K, V] Exp(1) draws for the sampled rows (drawn with `generator` when None).
    """
    if confidence_stop not in CONFIDENCE_STOP_RULES:
        raise ValueError(f"dspark: confidence_stop={confidence_stop!r}; choose one of {CONFIDENCE_STOP_RULES}.")
    rows, slots, _ = base_logits.shape
    device = base_logits.device
    temperatures = row_temperatures(temperature, rows, device)
    greedy = temperatures <= GREEDY_TEMPERATURE
    divisor = torch.where(greedy, torch.ones_like(temperatures), temperatures)[:, None]

    previous = anchor_ids.long()
    survival = torch.ones(rows, device=device)
    lengths = torch.full((rows,), slots, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logits, probs, confidences = [], [], [], []
    for slot in range(slots):
        slot_hidden = hidden[:, slot] if hidden is not None else None
        if confidence is not None:
            if slot_hidden is None:
                raise ValueError("dspark: the confidence head needs the slots' hidden states.")
            # The confidence head reads the raw table row W1[x_{k-1}], also next to a gated Markov head.
            raw = F.embedding(previous, markov.w1) if markov is not None and confidence.with_markov else None
            score = confidence_probability(confidence, slot_hidden, raw)
            survival = survival * score
            confidences.append(score)
            if confidence_threshold > 0 and slot > 0:
                compared = score if confidence_stop == "position" else survival
                newly_stopped = (compared < confidence_threshold) & ~stopped
                lengths = torch.where(newly_stopped, torch.full_like(lengths, slot), lengths)
                stopped = stopped | newly_stopped
        if markov is None:
            slot_logits = base_logits[:, slot].float()
        else:
            bias = markov_bias(markov, previous, slot_hidden)
            slot_logits = corrected_logits(base_logits[:, slot], bias, top_n, truncate)
        processed = slot_logits / divisor
        slot_probs = torch.softmax(processed, dim=-1)
        if bool(greedy.all()):
            chosen = processed.argmax(dim=-1)
        else:
            noise = exponential_noise[:, slot] if exponential_noise is not None else None
            if noise is None:
                noise = torch.empty_like(slot_probs).exponential_(generator=generator)
            raced = (slot_probs / noise).argmax(dim=-1)
            chosen = torch.where(greedy, processed.argmax(dim=-1), raced)
        tokens.append(chosen)
        logits.append(processed)
        probs.append(slot_probs)
        previous = chosen
    return MarkovBlock(
        tokens=torch.stack(tokens, dim=1),
        logits=torch.stack(logits, dim=1),
        probs=torch.stack(probs, dim=1),
        confidence=torch.stack(confidences, dim=1) if confidences else None,
        lengths=lengths,
    )


def markov_weights_from_state_dict(state: dict[str, torch.Tensor], prefix: str = "markov_head.") -> MarkovWeights:
    """MarkovWeights from a draft's state dict (keys `markov_head.markov_w1.weight`, ...)."""
    return MarkovWeights(
        w1=state[f"{prefix}markov_w1.weight"],
        w2=state[f"{prefix}markov_w2.weight"],
        gate_weight=state.get(f"{prefix}gate_proj.weight"),
        gate_bias=state.get(f"{prefix}gate_proj.bias"),
    )


def confidence_weights_from_state_dict(
    state: dict[str, torch.Tensor], with_markov: bool, prefix: str = "confidence_head."
) -> ConfidenceWeights:
    """ConfidenceWeights from a draft's state dict (keys `confidence_head.proj.weight` / `.bias`)."""
    return ConfidenceWeights(state[f"{prefix}proj.weight"], state[f"{prefix}proj.bias"], with_markov)


__all__ = [
    "CONFIDENCE_STOP_RULES",
    "GREEDY_TEMPERATURE",
    "ConfidenceWeights",
    "MarkovBlock",
    "MarkovWeights",
    "confidence_probability",
    "confidence_weights_from_state_dict",
    "corrected_logits",
    "markov_bias",
    "markov_embedding",
    "markov_weights_from_state_dict",
    "row_temperatures",
    "sample_markov_block",
]
