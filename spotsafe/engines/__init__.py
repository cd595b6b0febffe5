"""The engines that already run spot fleets: Kubernetes spot node pools and SkyPilot managed jobs.

``spotsafe k8s`` prints a Job (one node) or a JobSet (several) and ``spotsafe skypilot`` a
task file for ``sky jobs launch``; both run ``python -m spotsafe.resume`` and map its exit
statuses onto the engine's own recovery (docs/engines.md).
"""
