"""A small byte-level BPE tokenizer trained on the standard library's sources (no download).

Saved as a Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json (ChatML template,
eos/pad tokens). Both transformers' AutoTokenizer and mistralpy load it.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus(limit: int = 400):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, path in enumerate(sorted(stdlib.glob("*.py"))):
        if i >= limit:
            break
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    # Make sure multi-byte text shows up so byte-level merges cover it.
    yield "héllo wörld ünïcode café 日本語のテキスト 中文文本 한국어 😀🎉👍 ∑∫√ " * 20


def train_tokenizer(out_dir: Path, vocab_size: int = 4096) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                 "pad_token": "<|endoftext|>"}))
    return out_dir
