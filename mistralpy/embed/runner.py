"""The model runner's pooling half: feed each embedding / scoring request's rows of a step's hidden
states into its PoolTask, and on its last step turn them into the result (worker/model_runner.py
calls these two functions; generation rows are untouched)."""
from __future__ import annotations

from typing import Any

import torch

from mistralpy.core.scheduler import SchedulerOutput
from mistralpy.embed.pooling import _ACTIVATIONS, finish
from mistralpy.worker.forward_batch import ForwardBatch


def pooling_kwargs(model: Any, sched: SchedulerOutput, batch: ForwardBatch) -> dict[str, Any]:
    """Extra forward inputs: BERT's token types when some request of the step has them."""
    if not any(s.req.pooling is not None and s.req.pooling.token_type_ids for s in sched.seqs):
        return {}
    types: list[int] = []
    for s in sched.seqs:
        start = s.req.num_computed_tokens
        ids = s.req.pooling.token_type_ids if s.req.pooling is not None else None
        types.extend(ids[start:start + s.num_new_tokens] if ids else [0] * s.num_new_tokens)
    return {"token_type_ids": torch.tensor(types, dtype=torch.long, device=batch.input_ids.device)}


def pool_step(model: Any, sched: SchedulerOutput, batch: ForwardBatch, hidden: torch.Tensor) -> None:
    """Accumulate every pooling request's rows; set ``task.result`` for those whose last chunk ran."""
    embeds, scores = [], []
    for s, base in zip(sched.seqs, batch.query_start_loc):
        task = s.req.pooling
        if task is None:
            continue
        start = s.req.num_computed_tokens
        rows = hidden[base:base + s.num_new_tokens]
        if task.kind == "score":
            if start == 0:
                task.first_row = rows[0]
            if s.samples:
                scores.append(task)
        else:
            task.state.add(start, rows)
            if s.samples:
                embeds.append(task)
    if embeds:
        by_cfg: dict[int, list] = {}
        for task in embeds:   # (one engine has one config; grouped anyway)
            by_cfg.setdefault(id(task.state.cfg), []).append(task)
        for group in by_cfg.values():
            vectors = finish([t.state.result() for t in group], group[0].state.cfg).cpu()
            for task, vec in zip(group, vectors):
                task.result = vec
    if scores:
        logits = model.score(torch.stack([t.first_row for t in scores]))
        values = _ACTIVATIONS[scores[0].activation](logits.float()).cpu()
        for task, value in zip(scores, values):
            task.result = value
