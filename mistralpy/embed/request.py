"""PoolingTask: what an embedding or scoring Request carries instead of sampling state."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mistralpy.embed.pooling import PoolState


@dataclass(slots=True, eq=False)
class PoolingTask:
    kind: str                           # "embed": pooled vector; "score": the cross-encoder's logits
    no_kv: bool                         # an encoder's: one whole step, no KV blocks
    state: PoolState | None = None      # "embed": the running statistics
    token_type_ids: list[int] | None = None   # BERT segment ids (a cross-encoder's pair)
    first_row: torch.Tensor | None = None     # "score": the first token's hidden state
    activation: str = "identity"        # "score": logits -> scores (embed/pooling._ACTIVATIONS)
    result: torch.Tensor | None = None  # set by the runner on the request's last step

    @property
    def prefix_cacheable(self) -> bool:
        """A prefix-cache hit skips computing the prefix's rows: fine when only the last is pooled."""
        return not self.no_kv and self.kind == "embed" and not self.state.cfg.needs_all_rows
