"""Build InternVL3 models from presets, or compose one from a pretrained ViT and a pretrained base LLM.

Nothing here re-implements the architecture: it configures transformers' `InternVLForConditionalGeneration`
(InternViT → pixel unshuffle → LayerNorm/Linear/GELU/Linear projector → Qwen2 LLM).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    InternVLVisionModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from vlpipe.model.presets import ModelPreset
from vlpipe.model.storage import localize
from vlpipe.model.tokenizer import IMG_CONTEXT_TOKEN, add_internvl_tokens

log = logging.getLogger(__name__)

V2PE_CONFIG_KEY = "v2pe_delta"
# InternVL's pixel unshuffle keeps 1/4 of the patch tokens (0.5 per side).
DOWNSAMPLE_RATIO = 0.5


def internvl_config(
    preset: ModelPreset,
    *,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    v2pe_delta: float = 1.0,
) -> InternVLConfig:
    """Translate a preset into transformers' `InternVLConfig`.

    Args:
        preset: the model shape.
        vocab_size: tokenizer size; required when the preset leaves it open (tiny/small).
        image_token_id: id of `<IMG_CONTEXT>`; defaults to InternVL3's 151667.
        v2pe_delta: the inference-time V2PE position step for visual tokens, recorded in the config.

    Raises:
        ValueError: when the vocabulary size is unknown.
    """
    vocab = vocab_size or preset.text.vocab_size
    if vocab is None:
        raise ValueError(
            f"preset {preset.name!r} takes its vocabulary size from the tokenizer; pass vocab_size"
        )
    v = preset.vision
    vision = InternVLVisionConfig(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        attention_bias=v.attention_bias,
        norm_type=v.norm_type,
        use_qk_norm=v.use_qk_norm,
    )
    t = preset.text
    text = Qwen2Config(
        vocab_size=vocab,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=preset.tie_word_embeddings,
    )
    kwargs = {} if image_token_id is None else {"image_token_id": image_token_id}
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        downsample_ratio=preset.downsample_ratio,
        image_seq_length=preset.tokens_per_tile,
        tie_word_embeddings=preset.tie_word_embeddings,
        **kwargs,
        **{V2PE_CONFIG_KEY: v2pe_delta},
    )


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model, split by part."""

    vision: int
    projector: int
    language: int
    total: int


def count_parameters(model: InternVLForConditionalGeneration) -> ParamCount:
    """Count parameters of the ViT, the MLP projector and the LLM (including its LM head)."""

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    vision = n(model.model.vision_tower)
    projector = n(model.model.multi_modal_projector)
    return ParamCount(vision=vision, projector=projector, language=total - vision - projector, total=total)


def meta_parameter_count(preset: ModelPreset, vocab_size: int | None = None) -> ParamCount:
    """Parameter count of a preset computed on the meta device (no memory is allocated)."""
    config = internvl_config(preset, vocab_size=preset.text.vocab_size or vocab_size or 1024)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return count_parameters(model)


def build_model(
    preset: ModelPreset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    v2pe_delta: float = 1.0,
) -> InternVLForConditionalGeneration:
    """A randomly initialised model of `preset` whose vocabulary matches `tokenizer`.

    Args:
        preset: the model shape.
        tokenizer: a tokenizer that already carries InternVL's image tokens.
        seed: torch seed for the initialisation (deterministic across runs).
        v2pe_delta: inference-time V2PE step recorded in the config.
    """
    config = internvl_config(
        preset,
        vocab_size=len(tokenizer) if preset.text.vocab_size is None else preset.text.vocab_size,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
        v2pe_delta=v2pe_delta,
    )
    _check_vocab(config, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    return model.eval()


def compose_pretrained(
    vision_uri: str,
    llm_uri: str,
    *,
    tokenizer_uri: str | None = None,
    preset: ModelPreset | None = None,
    seed: int = 0,
    v2pe_delta: float = 1.0,
    storage_options: dict | None = None,
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Native pre-training initialisation: a pretrained ViT + a pretrained *base* LLM + a fresh MLP projector.

    Args:
        vision_uri: local or `s3://` Hugging Face directory of an `InternVLVisionModel` (InternViT).
        llm_uri: local or `s3://` Hugging Face directory of a Qwen2/Qwen2.5 causal LM.
        tokenizer_uri: tokenizer directory; defaults to `llm_uri`. InternVL's image tokens are added and
            the LLM's embeddings resized when they are missing.
        preset: when given, the loaded parts must match its shapes (catches a wrong checkpoint early).
        seed: seed for the projector's initialisation.
        v2pe_delta: inference-time V2PE step recorded in the config.
        storage_options: fsspec options for remote directories (credentials come from the environment).

    Returns:
        The composed model (projector freshly initialised, everything else copied) and its tokenizer. The tokens
        that needed new embedding rows are in the model's `vlpipe_added_tokens` attribute (see `fit_embeddings`).

    Raises:
        ValueError: when a part does not match `preset` or the directories hold the wrong model type.
    """
    from transformers import AutoTokenizer

    vision_dir = localize(vision_uri, storage_options=storage_options)
    llm_dir = localize(llm_uri, storage_options=storage_options)
    tok_dir = localize(tokenizer_uri, storage_options=storage_options) if tokenizer_uri else llm_dir

    vision = InternVLVisionModel.from_pretrained(vision_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    if llm.config.model_type not in ("qwen2", "qwen3"):
        raise ValueError(
            f"{llm_uri}: expected a Qwen2/Qwen2.5 base LLM, got model_type={llm.config.model_type!r}"
        )
    tokenizer = add_internvl_tokens(AutoTokenizer.from_pretrained(tok_dir))
    added = fit_embeddings(llm, tokenizer)
    if preset is not None:
        _check_parts_match(preset, vision.config, llm.config)

    tie = bool(getattr(llm.config, "tie_word_embeddings", False))
    vision_cfg = vision.config
    side = vision_cfg.image_size[0] // vision_cfg.patch_size[0]
    # The LLM's own settings (rope_scaling/rope_parameters, rope_theta, max_position_embeddings, sliding window,
    # max_window_layers, rms_norm_eps, attention_dropout) are carried over as the source has them.
    text_config = {
        k: v for k, v in llm.config.to_dict().items() if k not in ("_name_or_path", "architectures")
    }
    config = InternVLConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
        downsample_ratio=DOWNSAMPLE_RATIO,
        image_seq_length=int(side * side * DOWNSAMPLE_RATIO**2),
        tie_word_embeddings=tie,
        **{V2PE_CONFIG_KEY: v2pe_delta},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    if not tie:
        model.lm_head.load_state_dict(llm.lm_head.state_dict())
    log.info("composed %s + %s with a fresh projector", vision_uri, llm_uri)
    model.vlpipe_added_tokens = added  # recorded in vlpipe.json by vlpipe.model.init
    return model.eval(), tokenizer


def fit_embeddings(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Keep the vocabulary invariant: every token id of `tokenizer` has a row in the input embeddings and the LM
    head. Missing rows are added, each set to the mean of the existing rows (embeddings and, when untied, LM head).

    Args:
        model: a causal LM or `InternVLForConditionalGeneration` (resized in place).
        tokenizer: the tokenizer the model will be used with.

    Returns:
        The tokens that got new rows (empty when the model already covers the tokenizer: InternVL's own
        tokenizer on an InternVL3 checkpoint).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    if size <= rows:
        return []
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = [by_id.get(i, f"<id {i}>") for i in range(rows, size)]
    with torch.no_grad():
        embed_mean = model.get_input_embeddings().weight.mean(dim=0)
        head = model.get_output_embeddings()
        head_mean = head.weight.mean(dim=0) if head is not None else None
        model.resize_token_embeddings(size, mean_resizing=False)
        model.get_input_embeddings().weight[rows:] = embed_mean
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.weight[rows:] = head_mean
            if getattr(head, "bias", None) is not None:
                head.bias[rows:] = 0.0
    log.warning(
        "the tokenizer has %d ids but the model had %d embedding rows: added %d rows (the mean of the existing "
        "ones) for %s",
        size,
        rows,
        size - rows,
        added,
    )
    return added


def preset_for_config(config: InternVLConfig) -> str | None:
    """The preset whose shapes `config` has (vision and text sizes, and the vocabulary where a preset fixes it),
    or None when no preset matches (a custom or shrunken model)."""
    from vlpipe.model.presets import PRESETS

    v, t = config.vision_config, config.text_config
    image_size = v.image_size[0] if isinstance(v.image_size, (list, tuple)) else v.image_size
    patch_size = v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size
    for name, preset in PRESETS.items():
        pv, pt = preset.vision, preset.text
        same = (
            (pv.hidden_size, pv.num_hidden_layers, pv.num_attention_heads, pv.intermediate_size)
            == (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size)
            and (pv.image_size, pv.patch_size) == (image_size, patch_size)
            and (pt.hidden_size, pt.num_hidden_layers, pt.num_attention_heads, pt.num_key_value_heads)
            == (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads)
            and pt.intermediate_size == t.intermediate_size
            and (pt.vocab_size is None or pt.vocab_size == t.vocab_size)
        )
        if same:
            return name
    return None


def _check_vocab(config: InternVLConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model vocabulary is {config.text_config.vocab_size}; "
            "use a tokenizer that matches the preset or a preset with vocab_size=None"
        )


def _check_parts_match(preset: ModelPreset, vision_cfg, text_cfg) -> None:
    expected = {
        "vision.hidden_size": (preset.vision.hidden_size, vision_cfg.hidden_size),
        "vision.num_hidden_layers": (preset.vision.num_hidden_layers, vision_cfg.num_hidden_layers),
        "text.hidden_size": (preset.text.hidden_size, text_cfg.hidden_size),
        "text.num_hidden_layers": (preset.text.num_hidden_layers, text_cfg.num_hidden_layers),
    }
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        detail = ", ".join(f"{k}: preset {a} vs checkpoint {b}" for k, (a, b) in wrong.items())
        raise ValueError(
            f"checkpoints do not match preset {preset.name!r} ({detail}); pick the matching preset"
        )
