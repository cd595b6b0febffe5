"""The environment that points spotsafe (and botocore, google-auth) at running simulators."""

from __future__ import annotations

from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.azure import AzureSimulator
from spotsafe.rehearsal.simulators.gcp import GCPSimulator
from spotsafe.rehearsal.simulators.server import Simulator

__all__ = ["simulated_environment"]


def simulated_environment(*sims: Simulator) -> dict[str, str]:
    """Environment variables that point spotsafe (and botocore, google-auth, azure-identity) at running simulators.

    ``SPOTSAFE_SOURCES`` names exactly the simulated providers plus ``signal``, so a
    rehearsal never probes the real metadata addresses.
    """
    if not sims:
        raise ValueError("simulated_environment needs at least one simulator")
    env: dict[str, str] = {}
    names: list[str] = []
    for sim in sims:
        if isinstance(sim, AWSSimulator):
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = sim.endpoint
        elif isinstance(sim, GCPSimulator):
            env["GCE_METADATA_HOST"] = sim.host
            env["GCE_METADATA_IP"] = sim.host
        elif isinstance(sim, AzureSimulator):
            env["SPOTSAFE_AZURE_METADATA_ENDPOINT"] = sim.endpoint
            # azure-identity's managed identity credential asks this host for its tokens.
            env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = sim.endpoint
        else:
            raise TypeError(f"not a spotsafe simulator: {sim!r}")
        names.append(sim.name)
    env["SPOTSAFE_SOURCES"] = ",".join([*names, "signal"])
    return env
