"""Run by `test_transformers4.py` inside a virtualenv with transformers 4.x (not collected by pytest): read a
checkpoint with plain transformers, as a 4.x runtime would, and write what it saw as JSON.

Usage: python transformers4_probe.py CHECKPOINT_DIR INPUTS.pt OUT.json [CHECKPOINT_DIR INPUTS.pt OUT.json ...]
(OUT.json.pt gets the logits and a plain `generate`'s output).
"""

import json
import sys

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, InternVLForConditionalGeneration


def main(checkpoint: str, inputs_path: str, out_path: str) -> None:
    inputs = torch.load(inputs_path)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    image_processor = AutoImageProcessor.from_pretrained(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint, torch_dtype=inputs["dtype"]).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    forward = {k: inputs[k] for k in ("input_ids", "pixel_values", "attention_mask", "position_ids")}
    forward["pixel_values"] = forward["pixel_values"].to(model.dtype)
    with torch.no_grad():
        logits = model(**forward).logits.float()
        generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=forward["pixel_values"], max_new_tokens=4, do_sample=False)  # fmt: skip
    torch.save({"logits": logits, "generated": generated}, out_path + ".pt")
    result = {
        "transformers": transformers.__version__,
        "tokenizer_class": type(tokenizer).__name__,
        "len_tokenizer": len(tokenizer),
        "ids": tokenizer(inputs["text"])["input_ids"],
        "named": {a: getattr(tokenizer, a, None) for a in ("start_image_token", "context_image_token", "video_token")},
        "template": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        "eos": [tokenizer.eos_token_id, model.generation_config.eos_token_id, config.text_config.eos_token_id],
        "rope": [config.text_config.rope_theta, config.text_config.rope_scaling],
        "tied": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
        "image_processor": [type(image_processor).__name__, image_processor.size["height"], image_processor.max_patches],
        "dtype": str(model.dtype),
    }  # fmt: skip
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    args = sys.argv[1:]
    for i in range(0, len(args), 3):
        main(*args[i : i + 3])
