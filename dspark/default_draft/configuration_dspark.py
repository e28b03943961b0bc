"""Configuration of a DSpark draft model.

This file travels with every checkpoint as remote code (`trust_remote_code=True`), so it imports only
`transformers` and nothing else from the `dspark` package.
"""

from transformers import PretrainedConfig

MARKOV_HEAD_TYPES = ("vanilla", "gated")
LAYER_TYPES = ("full_attention", "sliding_attention")
CONFIDENCE_STOP_RULES = ("position", "survival")


class DSparkConfig(PretrainedConfig):
    r"""Configuration of a DSpark draft: a DFlash block-diffusion backbone plus DSpark's Markov and confidence heads.

    The draft's transformer sizes (`hidden_size`, heads, `intermediate_size`, ...) describe the draft's own layers.
    `hidden_size` must equal the target's embedding width, because the block is embedded with the target's
    embedding table and the draft's output goes through the target's `lm_head`.

    Args:
        vocab_size: the *target's* `config.vocab_size` (rows of its embedding), not the tokenizer length.
        block_size: tokens fed to the draft per round: `[anchor, MASK x (block_size - 1)]`.
        target_layer_ids: 0-based target decoder layers whose outputs condition the draft (HF
            `hidden_states[i + 1]`; -1 is the embedding output; the last layer is the post-norm state, as in HF).
        target_hidden_size: hidden size of the target (width of each selected feature).
        num_target_layers: decoder layers of the target; used to validate `target_layer_ids`.
        mask_token_id: target-vocabulary id embedded in the block's masked slots.
        sample_from_anchor: slot convention. `True` (DSpark): every slot predicts, slot k predicts the token
            after position anchor + k, giving `block_size` drafted tokens. `False` (DFlash): slots 1.. predict the
            token at their own position, giving `block_size - 1` drafted tokens.
        markov_rank: rank r of the Markov head (0 disables it: a plain DFlash draft).
        markov_head_type: "vanilla" (bias from the previous token only) or "gated" (gate also sees the hidden state).
        enable_confidence_head: add the per-slot acceptance predictor.
        confidence_head_with_markov: the confidence head also sees the previous token's Markov embedding.
        confidence_threshold: stop drafting a block early when the confidence falls below this value (0 = off).
        confidence_stop: "position" compares each slot's own confidence c_k (DeepSpec), "survival" compares the
            prefix survival product c_1 * ... * c_k (DSpark paper).
        has_embed_tokens / has_lm_head: the checkpoint ships its own copies (DeepSpec); otherwise they are borrowed
            from the target at run time.
        layer_types: per draft layer, "full_attention" or "sliding_attention" (needs `sliding_window`).
    """

    model_type = "dspark"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 8,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        attention_bias: bool = False,
        rope_parameters: dict | None = None,
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        block_size: int = 8,
        target_layer_ids: list[int] | None = None,
        target_hidden_size: int | None = None,
        num_target_layers: int | None = None,
        mask_token_id: int = 0,
        sample_from_anchor: bool = True,
        markov_rank: int = 0,
        markov_head_type: str = "vanilla",
        enable_confidence_head: bool = False,
        confidence_head_with_markov: bool = True,
        confidence_threshold: float = 0.0,
        confidence_stop: str = "position",
        has_embed_tokens: bool = False,
        has_lm_head: bool = False,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.rope_parameters = dict(rope_parameters) if rope_parameters else {"rope_type": "default", "rope_theta": 1e6}
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_types = list(layer_types) if layer_types is not None else ["full_attention"] * num_hidden_layers
        self.sliding_window = sliding_window
        self.block_size = block_size
        self.target_layer_ids = list(target_layer_ids) if target_layer_ids is not None else [0]
        self.target_hidden_size = target_hidden_size if target_hidden_size is not None else hidden_size
        self.num_target_layers = num_target_layers
        self.mask_token_id = mask_token_id
        self.sample_from_anchor = sample_from_anchor
        self.markov_rank = markov_rank
        self.markov_head_type = markov_head_type
        self.enable_confidence_head = enable_confidence_head
        self.confidence_head_with_markov = confidence_head_with_markov
        self.confidence_threshold = confidence_threshold
        self.confidence_stop = confidence_stop
        self.has_embed_tokens = has_embed_tokens
        self.has_lm_head = has_lm_head
        # Validate before PretrainedConfig's own checks so the error names the DSpark field and its fix.
        self.validate_dspark()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_draft_tokens(self) -> int:
        """Tokens proposed per round: every slot under the DSpark convention, slots 1.. under DFlash."""
        return self.block_size if self.sample_from_anchor else self.block_size - 1

    def validate_dspark(self) -> None:
        """Raise a ValueError naming the bad field and how to fix it."""

        def fail(message: str) -> None:
            raise ValueError(f"DSparkConfig: {message}")

        if self.block_size < 2:
            fail(f"block_size={self.block_size}; a block needs the anchor plus at least one masked slot (>= 2).")
        if not self.target_layer_ids or not all(isinstance(i, int) for i in self.target_layer_ids):
            fail(f"target_layer_ids={self.target_layer_ids!r} must be a non-empty list of 0-based target layer ids.")
        lowest = min(self.target_layer_ids)
        if lowest < -1:
            fail(f"target_layer_ids contains {lowest}; ids are 0-based decoder layers (-1 = embedding output).")
        if self.num_target_layers is not None:
            highest = max(self.target_layer_ids)
            if highest >= self.num_target_layers:
                fail(
                    f"target_layer_ids contains {highest} but the target has {self.num_target_layers} layers "
                    f"(valid ids: -1 .. {self.num_target_layers - 1})."
                )
        if not 0 <= self.mask_token_id < self.vocab_size:
            fail(f"mask_token_id={self.mask_token_id} is outside the target vocabulary [0, {self.vocab_size}).")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.markov_rank < 0:
            fail(f"markov_rank={self.markov_rank} must be >= 0 (0 disables the Markov head).")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            fail(f"markov_head_type={self.markov_head_type!r}; choose one of {MARKOV_HEAD_TYPES}.")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            fail("confidence_head_with_markov=True needs a Markov head (markov_rank > 0); set it to False.")
        if self.confidence_stop not in CONFIDENCE_STOP_RULES:
            fail(f"confidence_stop={self.confidence_stop!r}; choose one of {CONFIDENCE_STOP_RULES}.")
        if not 0.0 <= self.confidence_threshold < 1.0:
            fail(f"confidence_threshold={self.confidence_threshold} must lie in [0, 1).")
        if self.confidence_threshold > 0 and not self.enable_confidence_head:
            fail("confidence_threshold > 0 needs enable_confidence_head=True.")
        if len(self.layer_types) != self.num_hidden_layers:
            fail(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers.")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            fail(f"layer_types contains {unknown}; allowed: {LAYER_TYPES}.")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            fail("a sliding_attention layer needs sliding_window > 0.")


__all__ = ["DSparkConfig"]
