"""A shrunken InternVL3 checkpoint in the published layout (OpenGVLab's `InternVL3-1B-hf` files), built locally.

What is kept from the published checkpoint (vlpipe's FACTS.md): the 151674-id vocabulary (Qwen2.5's 151643
byte-level BPE ids, its 22 special tokens 151643–151664, InternVL's nine added tokens 151665–151673 with
`<IMG_CONTEXT>` = 151667), `tokenizer_class: Qwen2TokenizerFast`, InternVL2.5/3's chat template with its default
system message, a `config.json` whose text config says `tie_word_embeddings: false` and `rope_scaling` dynamic
×2 with θ = 1e6 (as transformers 4.x writes it: no `rope_parameters`, no top-level `tie_word_embeddings`),
bos 151643 / eos 151645, bfloat16 weights, and a GotOcr2 image processor. What is shrunken: the ViT and the LLM
(a few thousand parameters besides the 151674-row embeddings). Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN_BASE_IDS = 151643
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
INTERNVL_TOKENS = [
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
VOCAB_SIZE = QWEN_BASE_IDS + len(QWEN_SPECIAL) + len(INTERNVL_TOKENS)  # 151674
BOS_ID, EOS_ID, IMAGE_TOKEN_ID = 151643, 151645, 151667
TILE = 32
PATCH = 8
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4


def published_tokenizer(out: Path) -> None:
    """Write a 151674-id byte-level BPE tokenizer with Qwen2.5's and InternVL's special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    while len(vocab) < QWEN_BASE_IDS:  # ids no merge produces: they only fill the table to Qwen2.5's size
        vocab[f"<unused_{len(vocab)}>"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL + INTERNVL_TOKENS]
    )
    assert bpe.get_vocab_size() == VOCAB_SIZE and bpe.token_to_id("<IMG_CONTEXT>") == IMAGE_TOKEN_ID
    out.mkdir(parents=True, exist_ok=True)
    bpe.save(str(out / "tokenizer.json"))
    from vlpipe.model.tokenizer import INTERNVL_SYSTEM_MESSAGE, chat_template

    decoder = {
        str(QWEN_BASE_IDS + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
        for i, t in enumerate(QWEN_SPECIAL + INTERNVL_TOKENS)
    }  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS],
        "bos_token": None,
        "chat_template": chat_template(INTERNVL_SYSTEM_MESSAGE),
        "clean_up_tokenization_spaces": False,
        "context_image_token": "<IMG_CONTEXT>",
        "end_image_token": "</img>",
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {
            "context_image_token": "<IMG_CONTEXT>",
            "end_image_token": "</img>",
            "start_image_token": "<img>",
            "video_token": "<video>",
        },
        "model_max_length": 8192,
        "pad_token": "<|endoftext|>",
        "processor_class": "InternVLProcessor",
        "split_special_tokens": False,
        "start_image_token": "<img>",
        "tokenizer_class": "Qwen2TokenizerFast",
        "unk_token": None,
        "video_token": "<video>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def published_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """Write the shrunken published-layout checkpoint to `out` (see the module docstring); returns `out`."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": [TILE, TILE], "patch_size": [PATCH, PATCH], "model_type": "internvl_vision",
    }  # fmt: skip
    text = {
        "model_type": "qwen2", "vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
        "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 24,
        "attention_dropout": 0.0, "tie_word_embeddings": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }  # fmt: skip
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    # The published config.json as transformers 4.x wrote it.
    written = json.loads((out / "config.json").read_text())
    written.pop("tie_word_embeddings", None)
    t = written["text_config"]
    t.pop("rope_parameters", None)
    t.update(
        rope_theta=1000000.0,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        sliding_window=32768,
        tie_word_embeddings=False,
    )
    written["torch_dtype"] = written.pop("dtype", "bfloat16")
    written["transformers_version"] = "4.52.0.dev0"
    (out / "config.json").write_text(json.dumps(written, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"transformers_version": "4.52.0.dev0"}))
    published_tokenizer(out)
    image = {
        "crop_to_patches": True, "data_format": "channels_first", "default_to_square": True, "do_center_crop": None,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "GotOcr2ImageProcessorFast",
        "image_std": [0.229, 0.224, 0.225], "max_patches": 4, "min_patches": 1, "processor_class": "InternVLProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": TILE, "width": TILE},
    }  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    processor = {"image_seq_length": TOKENS_PER_TILE, "processor_class": "InternVLProcessor"}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out
