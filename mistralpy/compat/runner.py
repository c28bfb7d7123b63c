"""mistral.rs's ``Runner``: load one model (a ``Which``) and answer ``ChatCompletionRequest`` /
``CompletionRequest`` with OpenAI-shaped objects (attribute access: ``res.choices[0].message.content``,
``res.usage.completion_tokens``), or an iterator of chunks when ``stream=True``.

    from mistralpy import Runner, Which, ChatCompletionRequest
    runner = Runner(which=Which.Plain(model_id="HuggingFaceTB/SmolLM2-135M-Instruct"), in_situ_quant="Q4K")
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=32))
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Self

from mistralpy.compat.requests import ChatCompletionRequest, CompletionRequest
from mistralpy.compat.which import UnsupportedModelKindError, engine_args
from mistralpy.engine import openai_format as oai
from mistralpy.engine.input_processor import is_token_ids
from mistralpy.engine.outputs import OpenAIObject
from mistralpy.errors import InvalidRequestError
from mistralpy.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Runner keywords of mistral.rs that change nothing here (our KV cache is always paged, prefix
# caching is always on, one device): accepted so scripts run unchanged.
_IGNORED = ("no_kv_cache", "prefix_cache_n", "no_paged_attn", "paged_attn", "pa_cache_type", "jinja_explicit",
            "num_device_layers", "enable_search", "search_bert_model", "no_bert_model", "search_embedding_model",
            "speculative_gamma", "max_run", "pa_ctxt_len", "throughput_logging")


class Runner:
    """Load ``which`` and serve requests. Extra keywords that are Engine options (``dtype``,
    ``max_model_len``, ``num_kv_blocks``, ``device``, ...) pass through to the Engine."""

    def __init__(self, which: Any, max_seqs: int = 16, token_source: str = "cache", chat_template: str | None = None,
                 in_situ_quant: str | int | None = None, which_draft: Any = None, anymoe_config: Any = None,
                 pa_gpu_mem: float | None = None, pa_blk_size: int | None = None,
                 prompt_chunksize: int | None = None, seed: int | None = None, mcp_client_config: Any = None,
                 **options: Any) -> None:
        if which_draft is not None:
            raise UnsupportedModelKindError("which_draft (speculative decoding) is not supported yet")
        if anymoe_config is not None:
            raise UnsupportedModelKindError("anymoe_config (AnyMoE) is not supported")
        for key in _IGNORED:
            if options.pop(key, None) not in (None, False):
                log.info("Runner(%s=...) has no effect in mistral.py", key)
        model, engine_opts = engine_args(which)
        engine_opts.update(max_seqs=max_seqs, token_source=token_source, chat_template=chat_template,
                           isq=in_situ_quant, seed=seed)
        if pa_blk_size is not None:
            engine_opts["block_size"] = pa_blk_size
        # mistral.rs: MB when > 1, else a fraction of free memory (our default already uses 85%).
        if pa_gpu_mem is not None and pa_gpu_mem > 1:
            engine_opts["kv_cache_memory_gb"] = pa_gpu_mem / 1024
        if prompt_chunksize is not None:
            engine_opts["max_num_batched_tokens"] = prompt_chunksize
        engine_opts.update(options)
        if mcp_client_config is not None:  # McpClientConfigPy (compat/mcp.py), or a path / dict as Engine takes
            engine_opts["mcp_config"] = mcp_client_config
        from mistralpy.engine.llm_engine import Engine

        self.which = which
        self.engine = Engine(model, **{k: v for k, v in engine_opts.items() if v is not None})

    # ---- chat ----------------------------------------------------------------------------------
    def send_chat_completion_request(self, request: ChatCompletionRequest) -> OpenAIObject | Iterator[OpenAIObject]:
        """A chat.completion object, or (``request.stream``) an iterator of chat.completion.chunk
        objects whose last one carries ``usage``."""
        if not isinstance(request, ChatCompletionRequest):
            raise InvalidRequestError("send_chat_completion_request takes a ChatCompletionRequest", "request")
        params = request.sampling()
        spec = None
        if self.engine.mcp is not None and not isinstance(request.messages, str) and params.n == 1:
            # mistral.rs runs MCP tools inside the request: Engine.chat's tool loop (engine/tool_loop.py)
            return self.engine.chat(request.messages, stream=request.stream, tools=request.tool_schemas,
                                    tool_choice=request.tool_choice, chat_template_kwargs=request.chat_template_kwargs,
                                    enable_thinking=request.enable_thinking, reasoning_effort=request.reasoning_effort,
                                    sampling_params=params)
        if isinstance(request.messages, str):  # mistral.rs: a string is an already templated prompt
            prompt, special = request.messages, True
        else:
            prompt, params, spec = self.engine.prepare_chat(
                request.messages, params, tools=request.tool_schemas, tool_choice=request.tool_choice,
                chat_template_kwargs=request.chat_template_kwargs, enable_thinking=request.enable_thinking,
                reasoning_effort=request.reasoning_effort)
            special = False  # the template wrote BOS where the model wants it
        tracker, reqs = self._prepare(prompt, params, special, request.truncate_sequence)
        chat_id, created = oai.new_chat_id(), oai.now()
        model = self._model_name(request.model)
        if request.stream:
            chunker = oai.ChatChunker(spec, model=model, chat_id=chat_id, created=created)
            return self._chat_stream(tracker, reqs, chunker)
        timing = _Timing()
        for _ in timing.watch(self.engine._stream(tracker, reqs)):
            pass
        result = oai.chat_completion(tracker.snapshot(), model=model, chat_id=chat_id, created=created, spec=spec)
        return _finish(result, timing, tracker)

    def _chat_stream(self, tracker, reqs, chunker: oai.ChatChunker) -> Iterator[OpenAIObject]:
        timing = _Timing()
        for out in timing.watch(self.engine._stream(tracker, reqs)):
            chunks = chunker.chunks(out.outputs[0])
            if tracker.finished and chunks:
                chunks[-1] = _finish(chunks[-1], timing, tracker)
            yield from chunks

    # ---- text completions ------------------------------------------------------------------------
    def send_completion_request(self, request: CompletionRequest) -> OpenAIObject | Iterator[OpenAIObject]:
        """A text_completion object (``echo_prompt`` prepends the prompt, ``best_of`` keeps the
        n_choices of highest cumulative logprob), or an iterator of chunks when ``stream``."""
        if not isinstance(request, CompletionRequest):
            raise InvalidRequestError("send_completion_request takes a CompletionRequest", "request")
        n = request.n or request.n_choices
        best_of = request.best_of or n
        if best_of < n:
            raise InvalidRequestError(f"best_of ({best_of}) must be >= n_choices ({n})", "best_of")
        if request.stream and best_of > n:
            raise InvalidRequestError("best_of > n_choices cannot be streamed", "best_of")
        params = request.sampling_params(logprobs=request.logprobs or best_of > n, n=best_of)
        prompt = request.prompt
        if request.suffix:
            prompt = self._fim(prompt, request.suffix)
        tracker, reqs = self._prepare(prompt, params, True, request.truncate_sequence)
        echo = ""
        if request.echo_prompt:
            echo = request.prompt if isinstance(request.prompt, str) else self.engine.detokenize(request.prompt)
        cid, created, model = oai.new_completion_id(), oai.now(), self._model_name(request.model)
        if request.stream:
            return self._completion_stream(tracker, reqs, model, cid, created, echo)
        timing = _Timing()
        for _ in timing.watch(self.engine._stream(tracker, reqs)):
            pass
        outputs = tracker.snapshot().outputs
        if best_of > n:
            outputs = sorted(outputs, key=lambda o: sum(e.logprob for e in o.logprobs or ()), reverse=True)[:n]
        choices = [oai.completion_choice(i, echo + o.text, o.finish_reason, None) for i, o in enumerate(outputs)]
        result = oai.text_completion(choices, model=model, completion_id=cid, created=created, usage_body={})
        return _finish(result, timing, tracker)

    def _completion_stream(self, tracker, reqs, model: str, cid: str, created: int,
                           echo: str) -> Iterator[OpenAIObject]:
        seen: set[int] = set()
        timing = _Timing()
        for out in timing.watch(self.engine._stream(tracker, reqs)):
            delta = out.outputs[0]
            text = delta.text if delta.index in seen else echo + delta.text
            seen.add(delta.index)
            chunk = oai.completion_chunk(oai.completion_choice(delta.index, text, delta.finish_reason, None),
                                         model=model, completion_id=cid, created=created)
            yield _finish(chunk, timing, tracker) if tracker.finished else chunk

    # ---- helpers ---------------------------------------------------------------------------------
    def _prepare(self, prompt: str | list[int], params: SamplingParams, add_special_tokens: bool, truncate: bool):
        if truncate:  # keep the prompt's last tokens, leaving room for max_tokens (mistral.rs's truncate_sequence)
            ids = list(prompt) if is_token_ids(prompt) else self.engine.tokenize(prompt, add_special_tokens)
            room = self.engine.inputs.max_total_tokens - (params.max_tokens or 1)
            if 0 < room < len(ids):
                prompt, add_special_tokens = ids[-room:], False
        return self.engine._prepare(prompt, params, add_special_tokens)

    def _fim(self, prompt: str | list[int], suffix: str) -> str:
        from mistralpy.server.completions import _FIM_TOKENS

        if not isinstance(prompt, str):
            raise InvalidRequestError("suffix needs a text prompt", "suffix")
        tok = self.engine.tokenizer
        for pre, suf, mid in _FIM_TOKENS:
            if all(tok.token_to_id(t) is not None for t in (pre, suf, mid)):
                return f"{pre}{prompt}{suf}{suffix}{mid}"
        raise InvalidRequestError("suffix: this model's vocabulary has no fill-in-the-middle tokens", "suffix")

    def _model_name(self, requested: str | None) -> str:
        return self.engine.model_name if requested in (None, "", "default") else requested

    # ---- embeddings --------------------------------------------------------------------------
    def send_embedding_request(self, request: Any, model_id: str | None = None) -> list[list[float]]:
        """One embedding vector per input of an EmbeddingRequest (compat/embedding.py)."""
        from mistralpy.compat.embedding import send_embedding_request

        return send_embedding_request(self.engine, request)

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.engine.detokenize(tokens, skip_special_tokens)

    def send_re_isq(self, dtype: str) -> None:
        raise UnsupportedModelKindError("re-ISQ of a loaded model is not supported; load it again with in_situ_quant=")

    def shutdown(self) -> None:
        """Stop the engine thread (also done at interpreter exit: the thread is a daemon)."""
        self.engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _Timing:
    """Wall-clock start, first token and last token of one request, for mistral.rs's usage fields."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None

    def watch(self, deltas):
        for out in deltas:
            now = time.perf_counter()
            if out.outputs and out.outputs[0].token_ids:
                self.first = self.first or now
                self.last = now
            yield out


def _finish(obj: OpenAIObject, timing: _Timing, tracker) -> OpenAIObject:
    snap = tracker.snapshot()
    first = timing.first or time.perf_counter()
    body = obj.model_dump()
    body["system_fingerprint"] = "local"
    body["usage"] = oai.timed_usage(len(snap.prompt_token_ids), snap.num_generated_tokens, snap.num_cached_tokens,
                                    prompt_time_s=first - timing.start,
                                    completion_time_s=(timing.last or first) - first)
    if tracker.error:
        from mistralpy.errors import EngineDeadError

        raise EngineDeadError(tracker.error)
    return OpenAIObject(body)
