"""`vlpipe model init`: a complete starting checkpoint (model, tokenizer, processor config).

Three ways in: a random model of a preset with a byte-level BPE trained on a local corpus (tests, demo), native
pre-training initialisation from a pretrained ViT and a pretrained base LLM (the paper's recipe), or an existing
checkpoint such as a published InternVL3 one (fine-tuning from where InternVL3 left off).
"""

from __future__ import annotations

from collections.abc import Iterable

from vlpipe.model.build import build_model, compose_pretrained
from vlpipe.model.checkpoint import load_checkpoint, save_checkpoint
from vlpipe.model.image import ImageProcessingConfig
from vlpipe.model.presets import ModelPreset, get_preset
from vlpipe.model.tokenizer import default_corpus, train_bpe_tokenizer


def image_config_for(preset: ModelPreset) -> ImageProcessingConfig:
    """Tiling defaults of a preset."""
    return ImageProcessingConfig(
        tile_size=preset.vision.image_size, min_tiles=preset.min_tiles, max_tiles=preset.max_tiles
    )


def init_random(
    preset_name: str,
    out: str,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    v2pe_delta: float = 1.0,
) -> str:
    """Write a randomly initialised checkpoint of `preset_name` with a tokenizer trained on `corpus`.

    Args:
        preset_name: `tiny` or `small` (the real presets need `init_composed`, or a 151674-token tokenizer).
        out: destination directory (local or `s3://`).
        corpus: texts for the BPE tokenizer; a small built-in corpus when None.
        vocab_size: BPE vocabulary size before special tokens.
        seed: initialisation seed.
        v2pe_delta: inference-time V2PE δ recorded in the checkpoint.

    Raises:
        ValueError: for an unknown preset or one with a fixed production vocabulary.
    """
    preset = get_preset(preset_name)
    if preset.text.vocab_size is not None:
        raise ValueError(
            f"preset {preset_name!r} has the fixed InternVL3 vocabulary; initialise it from pretrained parts "
            f"with `vlpipe model init --preset {preset_name} --vision DIR --llm DIR`, or start from an InternVL3 "
            "checkpoint (init.checkpoint in a recipe)"
        )
    tokenizer = train_bpe_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size=vocab_size)
    model = build_model(preset, tokenizer, seed=seed, v2pe_delta=v2pe_delta)
    meta = {"preset": preset_name, "init": "random", "seed": seed, "stage": "init"}
    return save_checkpoint(out, model, tokenizer, image_config_for(preset), metadata=meta)


def init_composed(
    preset_name: str,
    out: str,
    *,
    vision_uri: str,
    llm_uri: str,
    tokenizer_uri: str | None = None,
    seed: int = 0,
    v2pe_delta: float = 1.0,
) -> str:
    """Write the native pre-training starting point: pretrained ViT + pretrained base LLM + fresh projector."""
    preset = get_preset(preset_name)
    model, tokenizer = compose_pretrained(
        vision_uri, llm_uri, tokenizer_uri=tokenizer_uri, preset=preset, seed=seed, v2pe_delta=v2pe_delta
    )
    meta = {
        "preset": preset_name,
        "init": "composed",
        "vision": vision_uri,
        "llm": llm_uri,
        "seed": seed,
        "stage": "init",
        "added_tokens": list(getattr(model, "vlpipe_added_tokens", [])),
    }
    return save_checkpoint(out, model, tokenizer, image_config_for(preset), metadata=meta)


def init_from_checkpoint(preset_name: str, out: str, *, checkpoint_uri: str) -> str:
    """Write the starting checkpoint from an existing one (local or `s3://`): a published InternVL3 checkpoint
    in the transformers format or one vlpipe wrote. Weights, tokenizer, chat template and image settings are
    kept; the files are written as vlpipe writes every checkpoint (bos/eos, tie flags, embedding rows for every
    token id, files transformers 4.x reads), in float32 for training.

    Args:
        preset_name: the recipe's preset; a checkpoint whose shapes match another preset is refused.
        out: destination directory (local or `s3://`).
        checkpoint_uri: the checkpoint to start from.

    Raises:
        ValueError: the checkpoint's shapes are those of another preset.
        FileNotFoundError: no checkpoint at `checkpoint_uri`.
    """
    get_preset(preset_name)
    loaded = load_checkpoint(checkpoint_uri)
    matched = loaded.metadata.get("preset")
    if matched is not None and matched != preset_name:
        raise ValueError(
            f"init.checkpoint {checkpoint_uri} has the shapes of preset {matched!r}, not the recipe's "
            f"{preset_name!r}; set preset: {matched}"
        )
    meta = {
        **{k: v for k, v in loaded.metadata.items() if k in ("preset", "added_tokens")},
        "init": "checkpoint",
        "source": checkpoint_uri,
        "stage": "init",
    }
    return save_checkpoint(out, loaded.model, loaded.tokenizer, loaded.image_cfg, metadata=meta)
