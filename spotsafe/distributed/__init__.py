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
  ``torch.distributed.checkpoint`` into ``<step dir>/dcp/`` of any store (import it only
  where sharded state is used: DCP takes seconds to import);
- the elastic sampler (:class:`ElasticDistributedSampler`, :func:`resplit`) lives with
  the other loader code in :mod:`spotsafe.data`.
"""

from __future__ import annotations
