"""Model presets: typed shapes for InternVL3 on transformers' `InternVLForConditionalGeneration`.

`tiny` is for tests (forward+backward of a batch well under a second on CPU), `small` is a CPU model that
learns the demo task in minutes, and `1b`/`2b`/`8b` are the published InternVL3 shapes
(InternViT-300M-448px + Qwen2.5-0.5B/1.5B/7B, untied LM head, 151674-token vocabulary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PresetName = Literal["tiny", "small", "1b", "2b", "8b"]

# Qwen2.5's 151665 tokens plus InternVL's 9 added tokens (<img>, </img>, <IMG_CONTEXT>, <quad>, </quad>,
# <ref>, </ref>, <box>, </box>).
INTERNVL3_VOCAB_SIZE = 151674


class VisionPreset(BaseModel):
    """Shape of the InternViT vision encoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    image_size: int = Field(gt=0, description="Tile size in pixels (448 for the real models).")
    patch_size: int = Field(gt=0)
    attention_bias: bool = True
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    use_qk_norm: bool = False

    @model_validator(mode="after")
    def _check_shapes(self) -> VisionPreset:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if (self.image_size // self.patch_size) % 2:
            raise ValueError(
                "pixel unshuffle (downsample 0.5) needs an even number of patches per side; "
                f"got {self.image_size // self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision hidden_size must be divisible by num_attention_heads")
        return self


class TextPreset(BaseModel):
    """Shape of the Qwen2/Qwen2.5 language model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int | None = Field(
        default=None, gt=0, description="None: taken from the tokenizer (tiny/small presets)."
    )
    max_position_embeddings: int = Field(default=32768, gt=0)
    rope_theta: float = Field(default=1_000_000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)

    @model_validator(mode="after")
    def _check_heads(self) -> TextPreset:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("text hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelPreset(BaseModel):
    """A full ViT-MLP-LLM preset plus the image-tiling defaults that go with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    vision: VisionPreset
    text: TextPreset
    downsample_ratio: float = Field(default=0.5, gt=0, le=1)
    tie_word_embeddings: bool = False
    min_tiles: int = Field(default=1, ge=1)
    max_tiles: int = Field(default=12, ge=1)
    published_params: int | None = Field(default=None, description="Published parameter count, if any.")

    @model_validator(mode="after")
    def _check_tiles(self) -> ModelPreset:
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) must not exceed max_tiles ({self.max_tiles})")
        return self

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per tile after pixel unshuffle (256 for a 448 tile with patch 14)."""
        side = self.vision.image_size // self.vision.patch_size
        return int(side * side * self.downsample_ratio**2)


_INTERNVIT_300M = VisionPreset(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    image_size=448,
    patch_size=14,
)

PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        vision=VisionPreset(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        text=TextPreset(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=4096,
        ),
        max_tiles=4,
    ),
    "small": ModelPreset(
        name="small",
        vision=VisionPreset(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=64,
            patch_size=8,
        ),
        text=TextPreset(
            hidden_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=384,
            max_position_embeddings=4096,
        ),
        max_tiles=6,
    ),
    "1b": ModelPreset(
        name="1b",
        vision=_INTERNVIT_300M,
        text=TextPreset(
            hidden_size=896,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=INTERNVL3_VOCAB_SIZE,
        ),
        published_params=938_000_000,
    ),
    "2b": ModelPreset(
        name="2b",
        vision=_INTERNVIT_300M,
        text=TextPreset(
            hidden_size=1536,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=8960,
            vocab_size=INTERNVL3_VOCAB_SIZE,
        ),
        published_params=2_090_000_000,
    ),
    "8b": ModelPreset(
        name="8b",
        vision=_INTERNVIT_300M,
        text=TextPreset(
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=INTERNVL3_VOCAB_SIZE,
        ),
        published_params=7_940_000_000,
    ),
}


def get_preset(name: str) -> ModelPreset:
    """Return the preset called `name`.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
