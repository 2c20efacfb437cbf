import json

import pytest
import torch
from transformers import (
    AutoTokenizer,
    InternVLForConditionalGeneration,
    InternVLVisionModel,
    Qwen2ForCausalLM,
)

from vlpipe.model.build import compose_pretrained, internvl_config
from vlpipe.model.checkpoint import load_checkpoint, save_checkpoint
from vlpipe.model.conversation import ConversationEncoder


def _inputs(tok, image_cfg):
    enc = ConversationEncoder(tok, tokens_per_tile=4, max_length=256)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    rec = {
        "id": "r",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
    }
    s = enc.encode(rec, [3], pixel_values=pixels, v2pe_deltas=0.5)
    return {"input_ids": s.input_ids[None], "pixel_values": pixels, "position_ids": s.position_ids[None],
            "attention_mask": torch.ones(1, len(s))}  # fmt: skip


def test_hf_round_trip_gives_identical_logits(tmp_path, tiny_model, tiny_tokenizer, tiny_image_cfg):
    save_checkpoint(tmp_path / "ck", tiny_model, tiny_tokenizer, tiny_image_cfg, metadata={"preset": "tiny"})
    # Plain transformers, no vlpipe code: what vLLM / LMDeploy / transformers users do.
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "ck").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert hf_tok.convert_tokens_to_ids("<IMG_CONTEXT>") == hf.config.image_token_id
    assert hf_tok.context_image_token == "<IMG_CONTEXT>" and hf_tok.start_image_token == "<img>"
    x = _inputs(tiny_tokenizer, tiny_image_cfg)
    with torch.no_grad():
        assert torch.equal(tiny_model(**x).logits, hf(**x).logits)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.image_cfg == tiny_image_cfg
    assert loaded.v2pe_delta == 1.0 and loaded.metadata["preset"] == "tiny"
    assert json.loads((tmp_path / "ck/config.json").read_text())["v2pe_delta"] == 1.0
    # The HF chat template renders the same prompt text as our encoder for a text-only conversation.
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert (
        hf_tok.apply_chat_template(msgs, tokenize=False)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )


def test_save_is_atomic_and_replaces(tmp_path, tiny_model, tiny_tokenizer, tiny_image_cfg):
    target = tmp_path / "ck"
    save_checkpoint(target, tiny_model, tiny_tokenizer, tiny_image_cfg)
    with torch.no_grad():
        tiny_model.lm_head.weight.add_(1.0)
    save_checkpoint(target, tiny_model, tiny_tokenizer, tiny_image_cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers
    reloaded = load_checkpoint(target)
    assert torch.equal(reloaded.model.lm_head.weight, tiny_model.lm_head.weight)


def test_load_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def _pretrained_parts(tmp_path, tiny_preset, tok, tie=False):
    cfg = internvl_config(tiny_preset, vocab_size=len(tok) - 5)  # base LLM vocab lacks some added tokens
    torch.manual_seed(5)
    vision = InternVLVisionModel(cfg.vision_config)
    text_cfg = cfg.text_config
    text_cfg.tie_word_embeddings = tie
    llm = Qwen2ForCausalLM(text_cfg)
    vision.save_pretrained(tmp_path / "vit")
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    return vision, llm


def test_compose_copies_vit_and_llm_with_fresh_projector(tmp_path, tiny_preset, tiny_tokenizer):
    vision, llm = _pretrained_parts(tmp_path, tiny_preset, tiny_tokenizer)
    model, tok = compose_pretrained(str(tmp_path / "vit"), str(tmp_path / "llm"), preset=tiny_preset, seed=3)
    for k, v in vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    n_old = llm.get_input_embeddings().weight.shape[0]
    got = model.model.language_model.embed_tokens.weight
    assert torch.equal(got[:n_old], llm.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight[:n_old], llm.lm_head.weight[:n_old])
    assert got.shape[0] >= len(tok)
    # The rows added for the tokens the base LLM lacks are the mean of its rows (embeddings and LM head), recorded.
    assert torch.allclose(
        got[n_old:], llm.model.embed_tokens.weight.mean(dim=0).expand(got.shape[0] - n_old, -1)
    )
    assert torch.allclose(model.lm_head.weight[n_old:], llm.lm_head.weight.mean(dim=0))
    assert len(model.vlpipe_added_tokens) == got.shape[0] - n_old == 5
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    proj = model.model.multi_modal_projector
    assert proj.linear_1.in_features == 4 * tiny_preset.vision.hidden_size  # pixel unshuffle: 4x channels
    assert torch.allclose(proj.layer_norm.weight, torch.ones_like(proj.layer_norm.weight))  # fresh init
    other, _ = compose_pretrained(str(tmp_path / "vit"), str(tmp_path / "llm"), preset=tiny_preset, seed=4)
    assert not torch.equal(other.model.multi_modal_projector.linear_1.weight, proj.linear_1.weight)


def test_compose_rejects_wrong_preset(tmp_path, tiny_preset, tiny_tokenizer):
    from vlpipe.model.presets import get_preset

    _pretrained_parts(tmp_path, tiny_preset, tiny_tokenizer)
    with pytest.raises(ValueError, match="do not match preset 'small'"):
        compose_pretrained(str(tmp_path / "vit"), str(tmp_path / "llm"), preset=get_preset("small"))


def test_checkpoint_through_s3(tmp_path, s3_server, monkeypatch, tiny_model, tiny_tokenizer, tiny_image_cfg):
    import boto3

    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="models")
    save_checkpoint(
        "s3://models/tiny/v1", tiny_model, tiny_tokenizer, tiny_image_cfg, metadata={"preset": "tiny"}
    )
    loaded = load_checkpoint("s3://models/tiny/v1")
    assert loaded.path.startswith(str(tmp_path / "home" / "cache"))
    x = _inputs(tiny_tokenizer, tiny_image_cfg)
    with torch.no_grad():
        assert torch.equal(tiny_model(**x).logits, loaded.model(**x).logits)
    with pytest.raises(FileNotFoundError, match="s3://models/nothing"):
        load_checkpoint("s3://models/nothing")


def test_overwritten_s3_checkpoint_is_fetched_again(
    tmp_path, s3_server, monkeypatch, tiny_model, tiny_tokenizer, tiny_image_cfg
):
    import boto3

    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="models")
    save_checkpoint("s3://models/m", tiny_model, tiny_tokenizer, tiny_image_cfg)
    first = load_checkpoint("s3://models/m")
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(2.0)
    save_checkpoint("s3://models/m", tiny_model, tiny_tokenizer, tiny_image_cfg)
    second = load_checkpoint("s3://models/m")
    assert second.path != first.path
    assert torch.equal(second.model.lm_head.weight, tiny_model.lm_head.weight)
