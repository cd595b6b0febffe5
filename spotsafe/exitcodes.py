"""The exit statuses spotsafe gives a training process, read by ``python -m spotsafe.resume``."""

from __future__ import annotations

#: Exit status of a process that saved its state on a preemption notice:
#: EX_TEMPFAIL, "state is safe, run me again elsewhere".
EXIT_PREEMPTED = 75
#: Exit status of a ``spotsafe.Run`` whose writer lease was taken over by another instance
#: (EX_NOPERM: "this process may no longer write the store"). ``python -m spotsafe.resume``
#: does not restart it: the run lives on in the instance that took over.
EXIT_FENCED = 77
