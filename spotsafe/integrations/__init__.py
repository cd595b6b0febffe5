"""Framework integrations: the same guarantees as :class:`spotsafe.Run`, one line in a framework's script.

- :mod:`spotsafe.integrations.lightning`: ``L.Trainer(..., callbacks=[SpotsafeCallback()])``
- :mod:`spotsafe.integrations.transformers`: ``Trainer(..., callbacks=[SpotsafeCallback()])``
- :mod:`spotsafe.integrations.accelerate`: ``AcceleratedRun(accelerator)``, a :class:`spotsafe.Run`
  that takes its state from an ``Accelerator``

Each module imports its framework lazily (``pip install spotsafe[lightning]``,
``spotsafe[transformers]``, ``spotsafe[accelerate]``); :mod:`spotsafe.integrations.core`
holds what they share. What each restores, and what differs from an uninterrupted run
where a framework makes exactness impossible: docs/integrations.md.
"""

from __future__ import annotations
