"""What vlpipe writes reads the same with transformers 4.57 (the version serving runtimes pin) as with 5.x:
tokenizer, image processor config and model files, identical logits, and a plain `generate` that stops at
`<|im_end|>`. The 4.57 side runs in its own virtualenv, built by this test under `.vlpipe/compat/` on first use
(pip: torch pinned to the installed version's release, CPU wheel where pip's sources have it; transformers 4.57.6)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tests.published_checkpoint import published_checkpoint
from vlpipe.model.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint
from vlpipe.model.conversation import ConversationEncoder

pytestmark = pytest.mark.slow

TRANSFORMERS_4 = "4.57.6"
REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".vlpipe" / "compat" / f"transformers-{TRANSFORMERS_4}"
PROBE = Path(__file__).with_name("transformers4_probe.py")


@pytest.fixture(scope="session")
def transformers4_python() -> Path:
    """The 4.57 virtualenv's python (built once, kept: the stamp marks a complete install)."""
    python, stamp = VENV / "bin" / "python", VENV / ".complete"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
        torch_release = torch.__version__.split("+")[
            0
        ]  # always pinned: unpinned, pip pulls GBs of CUDA wheels
        packages = [
            f"torch=={torch_release}",
            f"transformers=={TRANSFORMERS_4}",
            f"pillow=={version('pillow')}",
        ]
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
            check=True,
            timeout=1800,
        )
        stamp.write_text(" ".join(packages) + "\n")
    return python


def _inputs(loaded, dtype=torch.float32) -> dict:
    enc = ConversationEncoder(loaded.tokenizer, loaded.tokens_per_tile, max_length=256)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, loaded.image_cfg.tile_size, loaded.image_cfg.tile_size)
    record = {
        "id": "p",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nHow many?"}],
    }
    s = enc.encode(record, [1], pixel_values=pixels, add_generation_prompt=True)
    return {"input_ids": s.input_ids[None], "pixel_values": pixels, "position_ids": s.position_ids[None],
            "attention_mask": torch.ones(1, len(s)), "dtype": dtype,
            "text": "How many <|im_end|> shapes?<IMG_CONTEXT>\n"}  # fmt: skip


def _forced_eos(model, eos: int) -> None:
    """Make `eos` every position's argmax: constant embeddings, no attention/MLP output, an LM head that only
    scores `eos` (so a plain `generate` must stop after one token)."""
    lm = model.model.language_model
    with torch.no_grad():
        lm.embed_tokens.weight.fill_(1.0)
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos] = 1.0


def test_checkpoints_read_the_same_with_transformers_4(
    transformers4_python, tmp_path, tiny_model, tiny_tokenizer, tiny_image_cfg
):
    save_checkpoint(
        tmp_path / "tiny", tiny_model, tiny_tokenizer, tiny_image_cfg, metadata={"preset": "tiny"}
    )
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    _forced_eos(tiny_model, eos)
    save_checkpoint(tmp_path / "stops", tiny_model, tiny_tokenizer, tiny_image_cfg)
    source = load_checkpoint(published_checkpoint(tmp_path / "published"))
    save_checkpoint(tmp_path / "stage", source.model, source.tokenizer, source.image_cfg)
    export_checkpoint(tmp_path / "stage", tmp_path / "bf16")  # the registered form: bf16

    cases = {"tiny": torch.float32, "stops": torch.float32, "bf16": torch.bfloat16}
    expected, args = {}, []
    for name, dtype in cases.items():
        loaded = load_checkpoint(tmp_path / name, dtype=dtype)
        x = _inputs(loaded, dtype)
        forward = {k: x[k] for k in ("input_ids", "pixel_values", "attention_mask", "position_ids")}
        forward["pixel_values"] = forward["pixel_values"].to(dtype)
        with torch.no_grad():
            logits = loaded.model(**forward).logits.float()
            generated = loaded.model.generate(  # plain generate: no eos passed, generation_config.json decides
                input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                pixel_values=forward["pixel_values"], max_new_tokens=4, do_sample=False,
            )  # fmt: skip
        expected[name] = (loaded, x, logits, generated)
        torch.save(x, tmp_path / f"{name}.pt")
        args += [str(tmp_path / name), str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}.json")]
    run = subprocess.run(
        [str(transformers4_python), str(PROBE), *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]

    for name, (loaded, x, logits, generated) in expected.items():
        seen = json.loads((tmp_path / f"{name}.json").read_text())
        outputs = torch.load(tmp_path / f"{name}.json.pt")
        tok = loaded.tokenizer
        assert seen["transformers"] == TRANSFORMERS_4
        assert seen["len_tokenizer"] == len(tok) and seen["ids"] == tok(x["text"])["input_ids"], name
        assert seen["named"] == {"start_image_token": "<img>", "context_image_token": "<IMG_CONTEXT>",
                                 "video_token": "<video>"}  # fmt: skip
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
        assert seen["template"] == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        assert seen["eos"] == [im_end, im_end, im_end]
        assert seen["tied"] is False and seen["image_processor"][1] == loaded.image_cfg.tile_size
        assert torch.equal(outputs["logits"], logits), (
            f"{name}: logits differ between transformers 5 and 4.57"
        )
        assert torch.equal(outputs["generated"], generated), name
    # A plain generate stops at <|im_end|> in both versions.
    _, x, _, generated = expected["stops"]
    prompt = x["input_ids"].shape[1]
    assert generated[0, prompt:].tolist() == [eos]
    assert json.loads((tmp_path / "bf16.json").read_text())["dtype"] == "torch.bfloat16"
    assert json.loads((tmp_path / "bf16.json").read_text())["rope"] == [
        1e6,
        {"rope_type": "dynamic", "factor": 2.0},
    ]
