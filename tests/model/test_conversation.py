import pytest
import torch

from vlpipe.model.conversation import IGNORE_INDEX, ConversationEncoder
from vlpipe.model.errors import SampleError


@pytest.fixture()
def enc(tiny_tokenizer):
    return ConversationEncoder(tiny_tokenizer, tokens_per_tile=4, max_length=256, mode="sft")


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _sample(value="<image>\nHow many?", answer="Two."):
    return {
        "id": "s1",
        "image": "a.png",
        "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}],
    }


def test_template_and_sft_labels(enc, tiny_tokenizer):
    tok = tiny_tokenizer
    s = enc.encode(_sample(), [2])
    img = (
        [tok.convert_tokens_to_ids("<img>")]
        + [tok.convert_tokens_to_ids("<IMG_CONTEXT>")] * 8
        + [tok.convert_tokens_to_ids("</img>")]
    )
    user = _ids(tok, "<|im_start|>user\n") + img + _ids(tok, "\nHow many?") + _ids(tok, "<|im_end|>\n")
    head = _ids(tok, "<|im_start|>assistant\n")
    body = _ids(tok, "Two.") + [tok.convert_tokens_to_ids("<|im_end|>")]
    expected = user + head + body + _ids(tok, "\n")
    assert s.input_ids.tolist() == expected
    # Only the reply and its <|im_end|> carry loss.
    expected_labels = [IGNORE_INDEX] * (len(user) + len(head)) + body + [IGNORE_INDEX] * len(_ids(tok, "\n"))
    assert s.labels.tolist() == expected_labels
    assert tok.decode(s.input_ids[s.labels != IGNORE_INDEX]) == "Two.<|im_end|>"


def test_pretrain_labels_cover_text_but_never_image_tokens(tiny_tokenizer):
    enc = ConversationEncoder(tiny_tokenizer, tokens_per_tile=4, max_length=256, mode="pretrain")
    s = enc.encode(_sample(), [1])
    image_ids = torch.tensor(tiny_tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]))
    is_image = torch.isin(s.input_ids, image_ids)
    assert int(is_image.sum()) == 4 + 2
    assert (s.labels[is_image] == IGNORE_INDEX).all()
    assert torch.equal(s.labels[~is_image], s.input_ids[~is_image])


def test_multi_image_and_pure_text(enc, tiny_tokenizer):
    ctx = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    rec = {"id": "m", "image": ["a.png", "b.png"],
           "conversations": [{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"},
                             {"from": "gpt", "value": "No."}]}  # fmt: skip
    s = enc.encode(rec, [3, 1])
    assert int((s.input_ids == ctx).sum()) == (3 + 1) * 4
    text = enc.encode(
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        [],
    )
    assert (
        int((text.input_ids == ctx).sum()) == 0
        and text.num_supervised == len(_ids(tiny_tokenizer, "Hello")) + 1
    )


def test_single_image_without_placeholder_gets_one(enc, tiny_tokenizer):
    with_placeholder = enc.encode(_sample("<image>\nHow many?"), [1])
    without = enc.encode(_sample("How many?"), [1])
    assert torch.equal(with_placeholder.input_ids, without.input_ids)


def test_data_text_cannot_inject_control_tokens(enc, tiny_tokenizer):
    s = enc.encode(_sample("<image>\nSay <|im_end|> and <img>"), [1])
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    img = tiny_tokenizer.convert_tokens_to_ids("<img>")
    assert int((s.input_ids == im_end).sum()) == 2  # the user turn's and the reply's terminators only
    assert int((s.input_ids == img).sum()) == 1


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {
                "id": "x",
                "image": ["a", "b"],
                "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
            },
            "image_count_mismatch",
        ),
        (
            {
                "id": "x",
                "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
            },
            "image_count_mismatch",
        ),
        (
            {
                "id": "x",
                "image": "a",
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image>"}],
            },
            "image_count_mismatch",
        ),
        ({"id": "x", "conversations": []}, "malformed"),
        ({"id": "x", "conversations": [{"from": "robot", "value": "Q"}]}, "malformed"),
        ({"id": "x", "conversations": [{"from": "human", "value": "only a question"}]}, "malformed"),
    ],
)
def test_bad_records_name_sample_and_reason(enc, record, reason):
    n = len([record["image"]] if isinstance(record.get("image"), str) else record.get("image", []))
    with pytest.raises(SampleError) as err:
        enc.encode(record, [1] * n)
    assert err.value.reason == reason
    assert str(err.value).startswith("x:")


def test_truncation_cuts_text_but_never_an_image(tiny_tokenizer):
    long_answer = "word " * 200
    enc = ConversationEncoder(tiny_tokenizer, tokens_per_tile=4, max_length=60, mode="sft")
    s = enc.encode(_sample(answer=long_answer), [1])
    assert len(s) == 60 and s.num_supervised > 0
    with pytest.raises(SampleError) as err:
        enc.encode(_sample(answer=long_answer), [20])  # 80 image tokens cannot fit in 60
    assert err.value.reason == "too_long" and "would cut an image" in str(err.value)
    short = ConversationEncoder(tiny_tokenizer, tokens_per_tile=4, max_length=20, mode="sft")
    with pytest.raises(SampleError, match="no supervised token"):
        rec = {
            "id": "t",
            "conversations": [
                {"from": "human", "value": "a long question " * 10},
                {"from": "gpt", "value": "A"},
            ],
        }
        short.encode(rec, [])


def test_generation_prompt_ends_with_assistant_header(enc, tiny_tokenizer):
    rec = {"id": "g", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}]}
    s = enc.encode(rec, [1], add_generation_prompt=True)
    tail = _ids(tiny_tokenizer, "<|im_start|>assistant\n")
    assert s.input_ids[-len(tail) :].tolist() == tail
    assert s.num_supervised == 0
