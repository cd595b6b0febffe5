"""Real HTTP simulators of the AWS, GCP and Azure metadata endpoints, on loopback.

They serve what spotsafe (and botocore, google-auth, curl) read from the real
services, close enough that the same client code runs against both: IMDSv2
tokens and their rules, spot instance-action and rebalance recommendations, GCP's
hanging ``wait_for_change`` GETs with ETags, Azure Scheduled Events with
``DocumentIncarnation`` and acknowledgements. Use them to rehearse a preemption on
a laptop and in tests::

    from spotsafe.rehearsal.simulators.aws import AWSSimulator
    from spotsafe.rehearsal.simulators.environment import simulated_environment

    with AWSSimulator() as sim:
        os.environ.update(simulated_environment(sim))
        ...                      # start training; spotsafe now watches the simulator
        sim.arm("terminate")     # the spot interruption notice appears

From a shell: ``python -m spotsafe.simulate aws`` prints the ``export`` line and
serves until interrupted; another process arms it with
``curl -X POST $ENDPOINT/spotsafe/arm?action=terminate``.

Every simulator can inject faults (:meth:`~spotsafe.rehearsal.simulators.server.Simulator.inject`:
an HTTP status, a garbage body, a delay) to prove that errors never turn into false notices.

- :mod:`~spotsafe.rehearsal.simulators.server`: the :class:`Simulator` base (server, faults, control API);
- :mod:`~spotsafe.rehearsal.simulators.aws`, :mod:`~spotsafe.rehearsal.simulators.gcp`,
  :mod:`~spotsafe.rehearsal.simulators.azure`: one simulator per cloud;
- :mod:`~spotsafe.rehearsal.simulators.environment`: :func:`simulated_environment`;
- :mod:`~spotsafe.rehearsal.simulators.serve`: ``python -m spotsafe.simulate aws|gcp|azure``.
"""

from __future__ import annotations
