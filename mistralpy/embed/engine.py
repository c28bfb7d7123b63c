"""The Engine's embedding and scoring calls: inputs -> pooling Requests -> vectors / scores.

Requests go through the engine's one scheduler with generation traffic: an encoder's run whole in
one step without KV blocks; a causal decoder embedder's prefill in chunks through the paged cache
like any prompt and free their blocks when their last chunk is pooled (mistralpy/embed/runner.py).
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from mistralpy.core.request import Request
from mistralpy.embed.pooling import PoolState, truncate_dimensions
from mistralpy.embed.request import PoolingTask
from mistralpy.embed.st_config import EmbedSpec, ScoreSpec, embed_spec, score_spec
from mistralpy.engine.input_processor import is_token_ids, new_request_id
from mistralpy.errors import EngineDeadError, InvalidRequestError, PromptTooLongError
from mistralpy.sampling_params import SamplingParams

EmbedInput = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
Truncate = bool | int


@dataclass(slots=True)
class Prepared:
    """One input, tokenized and checked."""

    ids: list[int]
    prompt_len: int = 0
    token_type_ids: list[int] | None = None


def split_inputs(inputs: EmbedInput, name: str = "input") -> list[str | list[int]]:
    """A string, token ids, or a list of either -> a list of items (each a string or token ids)."""
    if isinstance(inputs, str) or is_token_ids(inputs) and len(inputs) > 0:
        items: list = [inputs]
    elif isinstance(inputs, (list, tuple)):
        items = list(inputs)
    else:
        raise InvalidRequestError(f"{name} must be a string, token ids or a list of them", name)
    if not items:
        raise InvalidRequestError(f"{name} is empty", name)
    for i, item in enumerate(items):
        if not isinstance(item, str) and not is_token_ids(item):
            raise InvalidRequestError(f"{name}[{i}] must be a string or a list of token ids", name)
        if len(item) == 0:
            raise InvalidRequestError(f"{name}[{i}] is empty", name)
    return [list(x) if not isinstance(x, str) else x for x in items]


class Embedder:
    """Built once per Engine; ``spec`` None: not an embedding model, ``score`` None: no cross-encoder."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        core = engine.core
        model = core.runner.model
        mc = engine.model_config
        self.model_name = engine.model_name
        self.encoder_only = bool(core.runner.encoder_only)
        self.spec: EmbedSpec | None = embed_spec(mc.path, model, mc.hf_config) if mc.path.is_dir() else None
        self.score_cfg: ScoreSpec | None = score_spec(mc.path, model, mc.hf_config) if mc.path.is_dir() else None
        limits = [core.max_total_tokens, getattr(model, "max_positions", None),
                  self.spec.max_seq_length if self.spec else None]
        self.max_tokens = min(int(x) for x in limits if x)
        self.vocab_size = mc.vocab_size
        # our own copies of the tokenizer: a folder's tokenizer.json may pad and truncate (all-MiniLM
        # pads every input to 128); here one never pads, and `_trunc` cuts at the model's limit
        raw = engine.tokenizer.backend.to_str()
        self._tok = HFTokenizer.from_str(raw)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._trunc = HFTokenizer.from_str(raw)
        self._trunc.no_padding()
        self._trunc.enable_truncation(self.max_tokens)
        self._params = SamplingParams(max_tokens=1, temperature=0.0).resolved()

    # ---- checks ------------------------------------------------------------------------------
    @property
    def dimension(self) -> int | None:
        """Length of the embeddings (None: not an embedding model)."""
        if self.spec is None:
            return None
        if self.spec.pooling.dense:
            return int(self.spec.pooling.dense[-1].weight.shape[0])
        hidden = int(self.engine.model_config.text_config["hidden_size"])
        return hidden * len(self.spec.pooling.modes)

    def require_embeddings(self) -> EmbedSpec:
        if self.spec is None:
            what = "a cross-encoder: use score() / POST /v1/score or /v1/rerank" if self.score_cfg else \
                "a generation model with no embedding configuration (no sentence-transformers modules.json)"
            raise InvalidRequestError(f"{self.model_name} does not produce embeddings: it is {what}", "model")
        return self.spec

    # ---- tokenizing --------------------------------------------------------------------------
    def _encode_text(self, text: str, truncate: Truncate) -> list[int]:
        if truncate is True:
            return self._trunc.encode(text).ids
        if truncate is False or truncate is None:
            return self._tok.encode(text).ids
        # an explicit length: cut the text's tokens, then add the special tokens back
        limit = min(int(truncate), self.max_tokens)
        enc = self._tok.encode(text, add_special_tokens=False)
        enc.truncate(max(limit - self._tok.num_special_tokens_to_add(False), 1))
        return self._tok.post_process(enc).ids

    def _check(self, ids: list[int], truncate: Truncate, name: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}", name)
        if truncate is True:
            ids = ids[:self.max_tokens]
        elif truncate not in (False, None):
            ids = ids[:min(int(truncate), self.max_tokens)]
        if len(ids) > self.max_tokens:
            raise PromptTooLongError(f"an input has {len(ids)} tokens, but {self.model_name} takes at most "
                                     f"{self.max_tokens} (pass truncate to cut it)", name)
        return ids

    def prepare(self, inputs: EmbedInput, *, truncate: Truncate = False, prompt_name: str | None = None,
                prompt: str | None = None) -> list[Prepared]:
        """Tokenize (a text gets the model's instruction prompt in front) and check every input."""
        spec = self.require_embeddings()
        if isinstance(truncate, int) and not isinstance(truncate, bool) and truncate < 1:
            raise InvalidRequestError("truncate must be true, false or a positive token count", "truncate")
        prefix = prompt if prompt is not None else spec.prompt(prompt_name)
        prompt_len = 0
        if prefix and not spec.pooling.include_prompt:   # sentence-transformers: less a trailing special token
            ids = self._tok.encode(prefix).ids
            prompt_len = len(ids) - (1 if ids and ids[-1] in self.engine.tokenizer.all_special_ids else 0)
        out = []
        for item in split_inputs(inputs):
            if isinstance(item, str):
                out.append(Prepared(self._check(self._encode_text(prefix + item, truncate), False, "input"), prompt_len))
            else:   # token ids are taken as they are: no prompt, no special tokens
                out.append(Prepared(self._check(item, truncate, "input")))
        return out

    def prepare_pairs(self, query: str, documents: Sequence[str], truncate: Truncate = False) -> list[Prepared]:
        """A cross-encoder's inputs: (query, document) encoded as one pair with segment ids."""
        tok = self._trunc if truncate else self._tok
        out = []
        for doc in documents:
            enc = tok.encode(query, doc)
            out.append(Prepared(self._check(enc.ids, False, "documents"), 0, list(enc.type_ids)))
        return out

    # ---- running -----------------------------------------------------------------------------
    def requests(self, prepared: list[Prepared], kind: str) -> list[Request]:
        rid = new_request_id("embd" if kind == "embed" else "score")
        reqs = []
        for i, p in enumerate(prepared):
            task = PoolingTask(kind, no_kv=self.encoder_only, token_type_ids=p.token_type_ids)
            if kind == "embed":
                task.state = PoolState(self.spec.pooling, len(p.ids), p.prompt_len)
            else:
                task.activation = self.score_cfg.activation
            reqs.append(Request(f"{rid}#{i}", p.ids, self._params, self.engine.core.max_total_tokens, pooling=task))
        return reqs

    def run(self, reqs: list[Request]) -> list[torch.Tensor]:
        """Submit to the engine loop and wait: one result per request, in order."""
        results: dict[str, Any] = {}
        done = threading.Event()

        def sink(update: Any) -> None:
            if update.finished:
                results[update.req.request_id] = update
                if len(results) == len(reqs):
                    done.set()

        self.engine.loop.submit(reqs, sink)
        try:
            while not done.wait(0.5):
                self.engine._check_alive()
        except BaseException:
            self.engine.loop.abort([r.request_id for r in reqs])
            raise
        return self._collect(reqs, results)

    async def run_async(self, reqs: list[Request]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        results: dict[str, Any] = {}
        fut: asyncio.Future = loop.create_future()

        def on_update(update: Any) -> None:
            if update.finished:
                results[update.req.request_id] = update
                if len(results) == len(reqs) and not fut.done():
                    fut.set_result(None)

        self.engine.loop.submit(reqs, lambda u: loop.call_soon_threadsafe(on_update, u))
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout=1.0)
                    break
                except TimeoutError:
                    self.engine._check_alive()
        except BaseException:
            self.engine.loop.abort([r.request_id for r in reqs])
            raise
        return self._collect(reqs, results)

    def _collect(self, reqs: list[Request], results: dict[str, Any]) -> list[torch.Tensor]:
        out = []
        for r in reqs:
            u = results[r.request_id]
            if u.error is not None or u.pooled is None:
                raise EngineDeadError(u.error or f"request {r.request_id} was aborted")
            out.append(u.pooled)
        return out

    def vectors(self, pooled: list[torch.Tensor], dimensions: int | None) -> np.ndarray:
        """[n, d] float32; ``dimensions`` (checked by check_dimensions): the Matryoshka prefix, renormalised."""
        x = torch.stack(pooled)
        if dimensions is not None and dimensions != x.shape[-1]:
            x = truncate_dimensions(x, dimensions, True)
        return x.numpy().astype(np.float32, copy=False)

    def check_dimensions(self, dimensions: int | None) -> None:
        """The `dimensions` errors before anything runs."""
        if dimensions is None:
            return
        d = self.dimension
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= (d or 1):
            raise InvalidRequestError(f"dimensions must be an integer in [1, {d}]", "dimensions")
        if dimensions != d and not self.spec.matryoshka:
            raise InvalidRequestError(f"{self.model_name} does not support shortened embeddings "
                                      "(it is not a Matryoshka model)", "dimensions")


# ---- plans: the requests of one call and how to turn their results into the answer ---------------
@dataclass(slots=True)
class Plan:
    reqs: list[Request]
    finish: Any            # list[torch.Tensor] (one result per request) -> the answer
    num_tokens: int        # input tokens (the API's usage)


def embed_plan(emb: Embedder, inputs: EmbedInput, *, dimensions: int | None = None, truncate: Truncate = False,
               prompt_name: str | None = None, prompt: str | None = None) -> Plan:
    prepared = emb.prepare(inputs, truncate=truncate, prompt_name=prompt_name, prompt=prompt)
    emb.check_dimensions(dimensions)
    return Plan(emb.requests(prepared, "embed"), lambda res: emb.vectors(res, dimensions),
                sum(len(p.ids) for p in prepared))


def _texts(value: Any, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) for t in items):
        raise InvalidRequestError(f"{name} must be a string or a non-empty list of strings", name)
    if any(not t for t in items):
        raise InvalidRequestError(f"{name} holds an empty string", name)
    return list(items)


def score_plan(emb: Embedder, text_1: str | Sequence[str], text_2: str | Sequence[str],
               truncate: Truncate = False) -> Plan:
    """Scores of pairs (text_1 one string: against each of text_2; else pairwise, as vLLM's /score):
    a cross-encoder's activated logit, or an embedding model's cosine similarity."""
    left, right = _texts(text_1, "text_1"), _texts(text_2, "text_2")
    if len(left) == 1:
        left = left * len(right)
    elif len(left) != len(right):
        raise InvalidRequestError(f"text_1 has {len(left)} texts and text_2 {len(right)}: give one text_1 "
                                  "or as many as text_2", "text_2")
    if emb.score_cfg is not None:
        prepared = [p for q, d in zip(left, right) for p in emb.prepare_pairs(q, [d], truncate)]

        def scores(res: list[torch.Tensor]) -> list[float]:
            return [float(r[0]) if r.numel() == 1 else float(r[-1]) for r in res]
        return Plan(emb.requests(prepared, "score"), scores, sum(len(p.ids) for p in prepared))
    if emb.spec is None:
        raise InvalidRequestError(f"{emb.model_name} can neither score nor embed", "model")
    texts = list(dict.fromkeys(left + right))   # each distinct text embedded once
    prepared = emb.prepare(texts, truncate=truncate)
    where = {t: i for i, t in enumerate(texts)}

    def cosines(res: list[torch.Tensor]) -> list[float]:
        v = torch.nn.functional.normalize(torch.stack(res).float(), dim=-1)
        return [float(v[where[a]] @ v[where[b]]) for a, b in zip(left, right)]
    return Plan(emb.requests(prepared, "embed"), cosines, sum(len(p.ids) for p in prepared))
