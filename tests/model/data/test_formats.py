"""InternVL's published data conventions: the multi-image tile budget, null roots, meta keys."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlpipe.model.data.loader import DataConfig, MixtureLoader
from vlpipe.model.data.mixing import MixtureConfig

CONV = [{"from": "gpt", "value": "Yes."}]


def _multi_image_dataset(tmp_path, root):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (128, 32), "red").save(images / "wide.png")  # aspect 4: a 4x1 grid at tiny's 32-px tiles
    lines = []
    for k in range(1, 5):
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(k)) + "Same?"
        record = {
            "id": f"k{k}",
            "image": ["wide.png"] * k,
            "conversations": [{"from": "human", "value": question}],
        }
        record["conversations"] += CONV
        lines.append(json.dumps(record))
    (tmp_path / "multi.jsonl").write_text("\n".join(lines) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(
        json.dumps({"multi": {"root": root(images), "annotation": str(tmp_path / "multi.jsonl")}})
    )
    return meta


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # InternVL: max(1, max_dynamic_patch // k) tiles per image; tiny's max_tiles is 4.
        # k=1: 4x1 grid + thumbnail = 5; k=2: budget 2 → 2x1 + thumbnail = 3 each; k=3, 4: budget 1 → 1 each.
        ("divide", {"k1": [5], "k2": [3, 3], "k3": [1, 1, 1], "k4": [1, 1, 1, 1]}),
        ("full", {"k1": [5], "k2": [5, 5], "k3": [5, 5, 5], "k4": [5, 5, 5, 5]}),
    ],
)
def test_multi_image_tile_budget(tmp_path, tiny_tokenizer, tiny_image_cfg, tiny_preset, rule, expected):
    meta = _multi_image_dataset(tmp_path, str)
    cfg = DataConfig(
        meta=str(meta),
        max_length=4096,
        augment=False,
        v2pe_training=False,
        multi_image_tiles=rule,
        mixture=MixtureConfig(language_ratio=0),
    )
    loader = MixtureLoader(cfg, tiny_tokenizer, tiny_image_cfg, tiny_preset.tokens_per_tile)
    got = {}
    for sample in loader:
        got[sample.sample_id] = sample
        if len(got) == 4:
            break
    by_id = {f"k{int(sid.split(':')[1])}": s for sid, s in got.items()}
    assert {k: s.num_tiles for k, s in by_id.items()} == expected
    context = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    for k, sample in by_id.items():
        # 4 visual tokens per tile (tiny preset), one block per image.
        assert int((sample.input_ids == context).sum()) == 4 * sum(expected[k])
        assert sample.pixel_values.shape[0] == sum(expected[k])


def test_null_root_reads_images_beside_the_annotation(tmp_path, tiny_tokenizer, tiny_image_cfg, tiny_preset):
    images = tmp_path / "ann"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "a.png")
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]
    (images / "data.jsonl").write_text(json.dumps({"image": "a.png", "conversations": conv}) + "\n")
    meta = tmp_path / "meta.json"
    # As in OpenGVLab's own meta files: "root": null.
    meta.write_text(
        json.dumps({"d": {"root": None, "annotation": str(images / "data.jsonl"), "repeat_time": 1}})
    )
    cfg = DataConfig(meta=str(meta), max_length=512, mixture=MixtureConfig(language_ratio=0))
    loader = MixtureLoader(cfg, tiny_tokenizer, tiny_image_cfg, tiny_preset.tokens_per_tile)
    sample = next(iter(loader))
    assert sample.num_tiles == [1] and len(loader.quarantine) == 0


def test_grounding_tokens_are_single_tokens_and_control_tokens_stay_text(tiny_tokenizer):
    from vlpipe.model.conversation import ConversationEncoder

    tok = tiny_tokenizer
    vocab = tok.get_vocab()
    encoder = ConversationEncoder(tok, 4, 4096, "sft")
    text = "<ref>the cat</ref><box>[[10, 20, 30, 40]]</box> and <quad>[[1, 2]]</quad>"

    def plain(t: str) -> list[int]:
        return tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    want = (
        [vocab["<ref>"]] + plain("the cat") + [vocab["</ref>"], vocab["<box>"]] + plain("[[10, 20, 30, 40]]")
        + [vocab["</box>"]] + plain(" and ") + [vocab["<quad>"]] + plain("[[1, 2]]") + [vocab["</quad>"]]
    )  # fmt: skip
    assert encoder._content(text) == want
    # Before: "<ref>" split into characters; now one id each, the ids the tokenizer gives them.
    assert len(plain("<ref>")) > 1
    # Control tokens written in data stay text (no injection of turns or image blocks).
    ids = encoder._content("<|im_end|><img><IMG_CONTEXT>")
    control = {vocab[t] for t in ("<|im_end|>", "<img>", "<IMG_CONTEXT>")}
    assert not control & set(ids)
    sample = encoder.encode(
        {
            "conversations": [
                {"from": "human", "value": "Where is <ref>it</ref>?"},
                {"from": "gpt", "value": text},
            ]
        },
        [],
    )
    assert sample.labels.tolist().count(vocab["<box>"]) == 1  # the reply's grounding tokens carry loss


def test_system_prompt_follows_the_chat_template_unless_set(
    tmp_path, tiny_tokenizer, tiny_image_cfg, tiny_preset
):
    import copy

    from vlpipe.model.conversation import ConversationEncoder
    from vlpipe.model.tokenizer import INTERNVL_SYSTEM_MESSAGE, chat_template, template_system_prompt

    conv = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    # vlpipe's own template (the demo's) has no default system message: nothing is added.
    assert template_system_prompt(tiny_tokenizer) is None
    plain = ConversationEncoder(tiny_tokenizer, 4, 512).encode(conv, [])
    internvl = copy.deepcopy(tiny_tokenizer)
    internvl.chat_template = chat_template(INTERNVL_SYSTEM_MESSAGE)
    assert template_system_prompt(internvl) == INTERNVL_SYSTEM_MESSAGE
    with_default = ConversationEncoder(internvl, 4, 512).encode(conv, [])
    text = internvl.decode(with_default.input_ids)
    # Exactly what the template renders for the same conversation (then the reply).
    rendered = internvl.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False
    )
    assert text == rendered
    assert (
        internvl.decode(plain.input_ids)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )
    assert (
        ConversationEncoder(internvl, 4, 512, system_prompt=None).encode(conv, []).input_ids.tolist()
        == plain.input_ids.tolist()
    )
    # A stage setting, and a dataset's meta key over it.
    (tmp_path / "a.jsonl").write_text(json.dumps(conv) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(conv) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "a": {"annotation": str(tmp_path / "a.jsonl")},
        "b": {"annotation": str(tmp_path / "b.jsonl"), "system_prompt": "Dataset B."},
    }))  # fmt: skip
    cfg = DataConfig(meta=str(meta), system_prompt="Stage.", mixture=MixtureConfig(multimodal_ratio=0))
    loader = MixtureLoader(cfg, internvl, tiny_image_cfg, tiny_preset.tokens_per_tile)
    seen = {}
    for sample in loader:
        seen[sample.sample_id.split(":")[0]] = internvl.decode(sample.input_ids)
        if len(seen) == 2:
            break
    assert seen["a"].startswith("<|im_start|>system\nStage.<|im_end|>\n")
    assert seen["b"].startswith("<|im_start|>system\nDataset B.<|im_end|>\n")
