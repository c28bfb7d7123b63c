"""Tiny random embedding / scoring checkpoints, written with transformers and sentence-transformers
themselves (so the folders hold exactly what those libraries save), and the real assets' paths."""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

WORDS = ["the", "a", "an", "of", "to", "in", "is", "was", "cat", "dog", "bird", "fish", "tree", "house", "car", "road", "sun", "moon", "star", "sky", "sea", "river", "red", "blue", "green", "small", "big", "old", "new", "fast", "slow", "happy", "sad", "runs", "sleeps", "eats", "sees", "likes", "hates", "and", "or", "but", "with", "on", "under", "over", "near", "far", "query", "document", "answer", "question", "what", "who", "where", "why", "how"]
SENTENCES = [f"{WORDS[(3 * i) % len(WORDS)]} {WORDS[(7 * i + 1) % len(WORDS)]} " +
             " ".join(WORDS[(i + j * 5) % len(WORDS)] for j in range(i % 9 + 1)) for i in range(50)]


def _tokenizer(path: Path, specials: list[str], single: str, pair: str, **named: Any) -> None:
    """A word-level tokenizer (vocabulary: the specials, then WORDS) saved as a transformers fast
    tokenizer; ``single`` / ``pair``: the post-processor's templates."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    unk = str(named.get("unk_token", specials[0]))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = {t for t in specials if t in single or t in pair}
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(t, vocab[t]) for t in specials if t in used])
    PreTrainedTokenizerFast(tokenizer_object=tok, **named).save_pretrained(str(path))


def bert_tokenizer(path: Path) -> None:
    _tokenizer(path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1",
               pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
               model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # as BertTokenizer


def roberta_tokenizer(path: Path) -> None:
    # pad is id 1: RoBERTa-style models count positions from padding_idx + 1
    _tokenizer(path, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", "<s> $A </s> </s> $B </s>",
               bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", cls_token="<s>",
               sep_token="</s>")


def decoder_tokenizer(path: Path, eos: str = "<|endoftext|>") -> None:
    _tokenizer(path, ["<unk>", eos, "<bos>"], f"$A {eos}", f"$A {eos} $B:1 {eos}:1",
               unk_token="<unk>", eos_token=eos, pad_token=eos)


def gemma_tokenizer(path: Path) -> None:
    _tokenizer(path, ["<pad>", "<eos>", "<bos>", "<unk>"], "<bos> $A <eos>", "<bos> $A <eos> $B:1 <eos>:1",
               pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


VOCAB = len(WORDS) + 4
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def _st_save(model_dir: Path, out: Path, pooling: str, dense: list[tuple[int, int]] = (),
             normalize: bool = True, prompts: dict[str, str] | None = None, include_prompt: bool = True) -> Path:
    """A sentence-transformers folder around the transformers checkpoint in model_dir."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    torch.manual_seed(1)
    first = Transformer(str(model_dir))
    modules = [first, Pooling(first.get_embedding_dimension(), pooling_mode=pooling, include_prompt=include_prompt)]
    for i, o in dense:
        modules.append(Dense(i, o, bias=False, activation_function=torch.nn.Identity()))
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, prompts=prompts or {}, device="cpu").save(str(out))
    return out


def make_bert(root: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = root / "bert-hf"
    BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **SMALL)).save_pretrained(str(d))
    bert_tokenizer(d)
    return d


def make_bert_instructor(root: Path) -> Path:
    """INSTRUCTOR-style: a prompt that is not pooled (include_prompt false), mean pooling."""
    return _st_save(tiny("bert"), root / "bert-instr", "mean", prompts={"query": "query what is the"},
                    include_prompt=False)


def make_xlm_roberta(root: Path) -> Path:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    d = root / "xlmr-hf"
    cfg = XLMRobertaConfig(vocab_size=VOCAB, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1, **SMALL)
    XLMRobertaModel(cfg, add_pooling_layer=False).save_pretrained(str(d))
    roberta_tokenizer(d)
    return _st_save(d, root / "xlmr-st", "cls")


def make_mpnet(root: Path) -> Path:
    import torch
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    d = root / "mpnet-hf"
    MPNetModel(MPNetConfig(vocab_size=VOCAB, max_position_embeddings=66, relative_attention_num_buckets=32,
                           **SMALL), add_pooling_layer=False).save_pretrained(str(d))
    roberta_tokenizer(d)
    return _st_save(d, root / "mpnet-st", "mean")


QWEN3 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "intermediate_size": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
QWEN_PROMPTS = {"query": "Instruct: find the document\nQuery: ", "document": ""}


def make_qwen3_embedding(root: Path) -> Path:
    """A Qwen3-Embedding-shaped folder: bare Qwen3Model, last-token pooling, instruction prompts."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    d = root / "qwen3emb-hf"
    Qwen3Model(Qwen3Config(vocab_size=VOCAB - 1, **QWEN3)).save_pretrained(str(d))
    decoder_tokenizer(d)
    return _st_save(d, root / "qwen3emb-st", "lasttoken", prompts=QWEN_PROMPTS)


def make_qwen3_causal_embedder(root: Path) -> Path:
    """A Qwen3ForCausalLM that also embeds (modules.json: last token + normalize): one engine serves
    generation and embedding requests."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    d = root / "qwen3-causal"
    Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB - 1, **QWEN3)).save_pretrained(str(d))
    decoder_tokenizer(d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                              "pooling_mode_lasttoken": True}))
    return d


def make_embeddinggemma(root: Path) -> Path:
    """EmbeddingGemma-shaped: bidirectional Gemma3TextModel (local layers with a small window), mean
    pooling, two dense layers, normalize, prompts."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(0)
    d = root / "gemma-hf"
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           query_pre_attn_scalar=16, use_bidirectional_attention=True, pad_token_id=0,
                           eos_token_id=1, bos_token_id=2)
    Gemma3TextModel(cfg).save_pretrained(str(d))
    gemma_tokenizer(d)
    return _st_save(d, root / "gemma-st", "mean", dense=[(32, 48), (48, 32)],
                    prompts={"query": "task: search result | query: ", "document": "title: none | text: "})


def make_bert_cross_encoder(root: Path) -> Path:
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    d = root / "ce-hf"
    cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, num_labels=1, **SMALL)
    BertForSequenceClassification(cfg).save_pretrained(str(d))
    bert_tokenizer(d)
    out = root / "ce-st"
    CrossEncoder(str(d), num_labels=1, device="cpu").save(str(out))
    return out


# real assets: tests/assets.py (minilm_dir, mpnet_dir)


# ---- one build of each tiny folder per test process ----------------------------------------------
_BUILDERS = {"bert": make_bert, "bert-instr": make_bert_instructor, "xlmr": make_xlm_roberta, "mpnet": make_mpnet, "qwen3emb": make_qwen3_embedding,
             "qwen3causal": make_qwen3_causal_embedder, "gemma": make_embeddinggemma,
             "crossencoder": make_bert_cross_encoder}


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="mistralpy-embed-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def tiny(name: str) -> Path:
    """The tiny folder `name` (see _BUILDERS), built on first use (quietly: transformers and
    sentence-transformers log load reports and progress bars)."""
    import contextlib
    import io
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        return _BUILDERS[name](_root())
