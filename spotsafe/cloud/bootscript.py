"""The boot script of a spot VM on any of the three clouds: ``userdata/spot-boot.sh``, as shipped.

One self-contained bash script (it finds its cloud from the metadata service); each cloud's
launcher puts the run's settings before it and hands the whole text to the VM as its user data
(AWS), ``startup-script`` (GCP) or custom data (Azure). ``spotsafe/userdata`` links to the
repository's ``userdata/``; wheels carry the files there.
"""

from __future__ import annotations

from pathlib import Path

from spotsafe.errors import LaunchError

#: The file's name, as users fetch it and the docs name it.
NAME = "spot-boot.sh"


def boot_script() -> str:
    """The text of ``userdata/spot-boot.sh``; :class:`LaunchError` when the installation lacks it."""
    package = Path(__file__).resolve().parents[1]  # spotsafe/
    for cand in (package / "userdata" / NAME, package.parent / "userdata" / NAME):
        if cand.is_file():
            return cand.read_text()
    raise LaunchError(f"userdata/{NAME} is not found next to {package}: reinstall spotsafe from its repository")
