"""Multi-rank runs under ``torchrun``: agreement on a notice, who writes what, sharded state.

Everything here rides on ``torch.distributed`` itself; nothing replaces it. One module
per seam:

- :mod:`spotsafe.distributed.context`: :class:`DistContext`, the process group and the
  two gloo groups (agreement, checkpoint collectives) beside the training backend;
- :mod:`spotsafe.distributed.agreement`: :class:`NoticeAgreement`, every rank acting on
  a notice at the same step;
- :mod:`spotsafe.distributed.commit`: the commit protocol for files several ranks wrote
  (barrier, gather, rank 0 commits the manifest, outcome broadcast) and the DDP writer
  roles (:data:`RANK_KEYS`, :func:`source_rank`, :func:`rescale_batch`);
- :mod:`spotsafe.distributed.sharded`: :class:`ShardedState` and :func:`is_sharded`;
- :mod:`spotsafe.distributed.board`: ``NoticeBoard``, small keys in the job's own
  c10d store for background threads (the snapshot guards' side channel);
- :mod:`spotsafe.distributed.dcp`: :func:`save_sharded` / :func:`load_sharded` through
  ``torch.distributed.checkpoint`` into ``<step dir>/dcp/`` of any store (imported on
  first use: DCP takes seconds to import);
- the elastic sampler (:class:`ElasticDistributedSampler`, :func:`resplit`) lives with
  the other loader code in :mod:`spotsafe.data`.

Every name below is importable from ``spotsafe.distributed`` as before the split.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spotsafe.checkpoint import checksum
from spotsafe.data import ElasticDistributedSampler, resplit
from spotsafe.distributed.agreement import (
    LEVEL_FINAL,
    LEVEL_NONE,
    LEVEL_REBALANCE,
    Agreement,
    NoticeAgreement,
    notice_level,
)
from spotsafe.distributed.commit import (
    RANK_KEYS,
    FileRecord,
    failed_ranks,
    merge_rank_state,
    persist_rank_files,
    rank_state,
    rescale_batch,
    source_rank,
)
from spotsafe.distributed.context import DEFAULT_TIMEOUT, DistContext, missing_ranks
from spotsafe.distributed.sharded import ShardedState, is_sharded

if TYPE_CHECKING:
    from spotsafe.distributed.dcp import DCP_DIR, load_sharded, save_sharded

#: Format version of what this package adds to a checkpoint (the ``dcp/`` layout and rank files).
FORMAT_VERSION = 1

_DCP = ("DCP_DIR", "load_sharded", "save_sharded")

__all__ = [
    "DCP_DIR",
    "DEFAULT_TIMEOUT",
    "FORMAT_VERSION",
    "LEVEL_FINAL",
    "LEVEL_NONE",
    "LEVEL_REBALANCE",
    "RANK_KEYS",
    "Agreement",
    "DistContext",
    "ElasticDistributedSampler",
    "FileRecord",
    "NoticeAgreement",
    "ShardedState",
    "checksum",
    "failed_ranks",
    "is_sharded",
    "load_sharded",
    "merge_rank_state",
    "missing_ranks",
    "notice_level",
    "persist_rank_files",
    "rank_state",
    "rescale_batch",
    "resplit",
    "save_sharded",
    "source_rank",
]


def __getattr__(name: str) -> Any:
    if name in _DCP:
        value = getattr(importlib.import_module("spotsafe.distributed.dcp"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spotsafe.distributed' has no attribute {name!r}")
