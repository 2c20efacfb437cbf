"""Checkpoints runtimes take as they are, and a published InternVL3 checkpoint (shrunken, built locally) as the
starting point: bf16 export, bos/eos, tie flags, the source LLM's settings, the vocabulary invariant, templates."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig, InternVLForConditionalGeneration

from tests.published_checkpoint import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, VOCAB_SIZE, published_checkpoint
from vlpipe.model.build import internvl_config, preset_for_config
from vlpipe.model.check import check_checkpoint
from vlpipe.model.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint, weights_tied
from vlpipe.model.conversation import ConversationEncoder
from vlpipe.model.presets import get_preset
from vlpipe.model.tokenizer import CHAT_TEMPLATE, INTERNVL_SYSTEM_MESSAGE, chat_template


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return published_checkpoint(tmp_path_factory.mktemp("published") / "InternVL3-shrunken-hf")


def _config(path):
    return json.loads((path / "config.json").read_text())


def _prompt(loaded):
    enc = ConversationEncoder(loaded.tokenizer, loaded.tokens_per_tile, max_length=256)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, loaded.image_cfg.tile_size, loaded.image_cfg.tile_size)
    record = {"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nhe"}]}
    s = enc.encode(record, [1], pixel_values=pixels, add_generation_prompt=True)
    return {"input_ids": s.input_ids[None], "pixel_values": pixels, "position_ids": s.position_ids[None],
            "attention_mask": torch.ones(1, len(s))}  # fmt: skip


def test_fixture_is_in_the_published_layout(published):
    """The shrunken checkpoint has the published vocabulary, ids and config form (the source of what follows)."""
    tok = AutoTokenizer.from_pretrained(published)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>"]) == [
        BOS_ID,
        EOS_ID,
        IMAGE_TOKEN_ID,
    ]
    config = _config(published)
    assert "tie_word_embeddings" not in config and config["text_config"]["tie_word_embeddings"] is False
    assert config["text_config"]["vocab_size"] == VOCAB_SIZE == 151674


def test_published_checkpoint_loads_untied_with_its_template(published):
    loaded = load_checkpoint(published)
    # transformers 5 alone would tie the LM head to the embeddings (no top-level tie_word_embeddings).
    assert not weights_tied(loaded.model)
    with safe_open(str(published / "model.safetensors"), "pt") as f:
        head = f.get_tensor("language_model.lm_head.weight").float()  # the published (4.x) key layout
    assert torch.equal(loaded.model.lm_head.weight[:VOCAB_SIZE], head)
    assert loaded.tokenizer.chat_template == chat_template(INTERNVL_SYSTEM_MESSAGE)  # the source's, kept
    assert "preset" not in loaded.metadata  # a shrunken shape matches no preset: nothing, not "unknown"
    # Vocabulary invariant: every id has a row. transformers 5 adds the processor's named `<video>` token to
    # InternVL's 151674 ids; that one row is added (the mean of the others) and recorded.
    rows = loaded.model.get_input_embeddings().weight.shape[0]
    assert max(loaded.tokenizer.get_vocab().values()) < rows == len(loaded.tokenizer)
    assert loaded.metadata.get("added_tokens", []) in ([], ["<video>"])
    if loaded.metadata.get("added_tokens"):
        embed = loaded.model.get_input_embeddings().weight
        assert torch.allclose(embed[VOCAB_SIZE], embed[:VOCAB_SIZE].mean(dim=0))
        assert torch.allclose(loaded.model.lm_head.weight[VOCAB_SIZE], head.mean(dim=0))


def test_saved_checkpoint_carries_what_runtimes_read(published, tmp_path):
    loaded = load_checkpoint(published)
    save_checkpoint(
        tmp_path / "ck", loaded.model, loaded.tokenizer, loaded.image_cfg, metadata=loaded.metadata
    )
    config = _config(tmp_path / "ck")
    text = config["text_config"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS_ID, EOS_ID)
    assert (text["bos_token_id"], text["eos_token_id"]) == (BOS_ID, EOS_ID)
    assert config["tie_word_embeddings"] is False and text["tie_word_embeddings"] is False
    # The source LLM's settings survive, also in the keys transformers 4.x reads.
    assert text["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.0} and text["rope_theta"] == 1e6
    assert text["rope_parameters"]["rope_type"] == "dynamic"
    assert (text["max_position_embeddings"], text["max_window_layers"], text["rms_norm_eps"]) == (
        32768,
        24,
        1e-6,
    )
    assert text["use_sliding_window"] is False and "_name_or_path" not in text
    assert check_checkpoint(tmp_path / "ck").ok
    assert {code for code, _ in check_checkpoint(published).problems} >= {"eos", "tie"}
    generation = GenerationConfig.from_pretrained(tmp_path / "ck")
    assert (generation.eos_token_id, generation.bos_token_id, generation.pad_token_id) == (
        EOS_ID,
        BOS_ID,
        BOS_ID,
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "ck").chat_template == chat_template(
        INTERNVL_SYSTEM_MESSAGE
    )
    # Stage checkpoints keep the training precision (fp32 here): exact equality with the model in memory.
    reloaded = InternVLForConditionalGeneration.from_pretrained(tmp_path / "ck").eval()
    assert reloaded.dtype == torch.float32 and not weights_tied(reloaded)
    x = _prompt(loaded)
    with torch.no_grad():
        assert torch.equal(loaded.model(**x).logits, reloaded(**x).logits)


@pytest.mark.slow
def test_export_writes_bf16_and_records_it(published, tmp_path):
    source = load_checkpoint(published)
    save_checkpoint(
        tmp_path / "stage", source.model, source.tokenizer, source.image_cfg, metadata={"stage": "mpo"}
    )
    export_checkpoint(tmp_path / "stage", tmp_path / "export")
    with safe_open(str(tmp_path / "export/model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 == {torch.bfloat16}
    assert _config(tmp_path / "export")["dtype"] == "bfloat16"
    assert check_checkpoint(tmp_path / "export").ok
    info = json.loads((tmp_path / "export/vlpipe.json").read_text())
    assert info["save_dtype"] == "bf16" and info["stage"] == "mpo"
    exported = load_checkpoint(tmp_path / "export", dtype=torch.bfloat16)
    want = source.model.state_dict()
    for name, value in exported.model.state_dict().items():  # exactly the source's weights, rounded to bf16
        assert torch.equal(value, want[name].to(torch.bfloat16)), name
    export_checkpoint(tmp_path / "stage", tmp_path / "fp32", save_dtype="fp32")
    assert _config(tmp_path / "fp32")["dtype"] == "float32"
    with pytest.raises(ValueError, match="save_dtype must be one of bf16, fp16, fp32"):
        export_checkpoint(tmp_path / "stage", tmp_path / "x", save_dtype="int8")


def test_template_override_and_vlpipe_default(
    published, tiny_model, tiny_tokenizer, tiny_image_cfg, tmp_path
):
    loaded = load_checkpoint(published, chat_template=CHAT_TEMPLATE)
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    # vlpipe's own template is InternVL2.5/3's without the default system message: the demo trains without one.
    msgs = [{"role": "user", "content": "Hi"}]
    assert tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    rendered = AutoTokenizer.from_pretrained(published).apply_chat_template(msgs, tokenize=False)
    assert rendered.startswith(
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\nHi"
    )


def test_preset_is_matched_by_shape():
    for name in ("1b", "2b", "8b"):
        assert preset_for_config(internvl_config(get_preset(name))) == name
    assert preset_for_config(internvl_config(get_preset("tiny"), vocab_size=407)) == "tiny"
    assert preset_for_config(internvl_config(get_preset("small"), vocab_size=999)) == "small"


def test_random_init_of_a_real_preset_names_the_preset_in_its_message(tmp_path):
    from vlpipe.model.init import init_random

    with pytest.raises(ValueError, match=r"--preset 1b --vision DIR --llm DIR") as err:
        init_random("1b", str(tmp_path / "x"))
    assert "{name}" not in str(err.value)


def test_vlpipe_checkpoint_has_bos_eos_and_tie_flags(tmp_path, tiny_model, tiny_tokenizer, tiny_image_cfg):
    save_checkpoint(tmp_path / "ck", tiny_model, tiny_tokenizer, tiny_image_cfg, metadata={"preset": "tiny"})
    config = _config(tmp_path / "ck")
    vocab = tiny_tokenizer.get_vocab()
    assert config["eos_token_id"] == vocab["<|im_end|>"] and config["bos_token_id"] == vocab["<|endoftext|>"]
    assert config["tie_word_embeddings"] == config["text_config"]["tie_word_embeddings"] is False
    assert GenerationConfig.from_pretrained(tmp_path / "ck").eos_token_id == vocab["<|im_end|>"]
    info = json.loads((tmp_path / "ck/vlpipe.json").read_text())
    assert info["dtype"] == "fp32" and info["preset"] == "tiny" and "added_tokens" not in info
