import pytest
import torch

from vlpipe.model.build import count_parameters, meta_parameter_count
from vlpipe.model.presets import PRESETS, ModelPreset, get_preset


@pytest.mark.parametrize(
    ("name", "published"), [("1b", 938_000_000), ("2b", 2_090_000_000), ("8b", 7_940_000_000)]
)
def test_real_presets_match_published_parameter_counts(name, published):
    counts = meta_parameter_count(get_preset(name))
    assert abs(counts.total / published - 1) < 0.005, counts
    # InternViT-300M is shared by all three; the projector maps 4·1024 unshuffled features to the LLM width.
    assert counts.vision == 304_012_288
    hidden = get_preset(name).text.hidden_size
    assert counts.projector == 2 * 4096 + 4096 * hidden + hidden + hidden * hidden + hidden


def test_real_presets_have_untied_head_and_internvl_vocab():
    for name in ("1b", "2b", "8b"):
        p = get_preset(name)
        assert p.text.vocab_size == 151674
        assert p.tie_word_embeddings is False
        assert p.tokens_per_tile == 256  # (448/14)^2 / 4


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*'1b'"):
        get_preset("huge")


def test_preset_rejects_bad_shapes():
    from vlpipe.model.presets import VisionPreset

    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionPreset(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     image_size=30, patch_size=8)  # fmt: skip
    with pytest.raises(ValueError, match="Extra inputs"):
        ModelPreset.model_validate({**PRESETS["tiny"].model_dump(), "surprise": 1})


def test_tiny_forward_backward(tiny_model, tiny_preset):
    # Speed lives in `make bench`, not in timed tests; this checks shapes, gradients and the param count.
    vocab = tiny_model.config.text_config.vocab_size
    n_img = tiny_preset.tokens_per_tile
    ids = torch.randint(0, 300, (8, 64))
    ids[:, 1 : 1 + n_img] = tiny_model.config.image_token_id
    pixels = torch.randn(8, 3, 32, 32)
    tiny_model.train()
    out = tiny_model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert out.logits.shape == (8, 64, vocab)
    vision_grads = [p.grad for p in tiny_model.model.vision_tower.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in vision_grads)  # images reach the loss
    counts = count_parameters(tiny_model)
    assert counts.total == sum(p.numel() for p in tiny_model.parameters())
