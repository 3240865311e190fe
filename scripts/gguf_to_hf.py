"""Turns the Gemma 3 270M GGUF into a Hugging Face safetensors directory vLLM can serve.

Run by scripts/prepare-model inside the real vLLM CPU test image (it has torch and transformers;
the `gguf` package is added for the run): `python gguf_to_hf.py MODEL.gguf OUT_DIR`.
transformers dequantizes the GGUF to bf16; then three repairs make the result behave like the
GGUF does under llama.cpp: its tokenizer adds `<bos>` (the GGUF asks for it, the conversion
forgets it, and without it the text degenerates), it gets Gemma's chat template (the base model
ships none), and its stop tokens are `<eos>` (1) and `<end_of_turn>` (106).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

BOS_ID = 2
STOP_IDS = [1, 106]  # <eos>, <end_of_turn>
# Gemma's turn format: a system message opens the first user turn; the assistant is "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\\n' + ns.system + message['content'] | trim "
    "+ '<end_of_turn>\\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def convert(gguf: Path, out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    model.config.eos_token_id = STOP_IDS[0]
    model.generation_config.eos_token_id = STOP_IDS
    model.generation_config.bos_token_id = BOS_ID
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_bos_token = True
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    _drop_quantization(out / "config.json")
    _check(out)


def _drop_quantization(config_file: Path) -> None:
    """The weights are plain bf16 now: a GGUF quantization config would mislead the loader."""
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _check(out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Hello")["input_ids"]
    assert ids[0] == BOS_ID, f"the tokenizer does not add <bos>: {ids}"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<start_of_turn>model\n"), chat
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == STOP_IDS, generation


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(sys.argv[2])
