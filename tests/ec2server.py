"""A real EC2 API on loopback for tests: moto's server, plus an IAM-enforcing one in a subprocess.

The fixtures on these (``ec2_server``, ``ec2``, ``launch``, ``iam_server``) are in
tests/plugins/servers.py: a test asks for them by name.

- :class:`EC2Server`: ``ThreadedMotoServer`` on 127.0.0.1 (an OS-chosen port).
- The server's EBS is made EC2-faithful where the volume tool's races need it
  (atomic, zone-checked attach; data in snapshots and volumes with a block store):
  see tests/ec2faithful.py.
- :class:`IAMEnforcingServer`: moto in a child process with IAM checks on, so a request
  the caller's policy does not allow is refused as AWS would (AccessDenied).

Nothing here talks to AWS: every client gets ``endpoint_url`` of the local server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

REGION = "us-east-1"
#: An image moto knows in us-east-1 (run_instances checks nothing else).
AMI = "ami-12c6146b"
FAKE_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class EC2Server:
    """moto's EC2 in server mode on 127.0.0.1, in a daemon thread."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> EC2Server:
        from tests.ec2faithful import install

        install()  # atomic, zone-checked attach as on EC2 (moto alone allows two attachments)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def shutdown(self) -> None:
        self._server.stop()
        inner = getattr(self._server, "_server", None)
        if inner is not None:
            inner.server_close()

    def client(self, service: str = "ec2", **keys: str) -> Any:
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint, **(keys or FAKE_KEYS))


_CHILD = r"""
import sys
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print("%s:%s" % s.get_host_and_port(), flush=True)
sys.stdin.read()  # until the parent closes our stdin
s.stop()
"""


class IAMEnforcingServer:
    """moto with IAM enforcement, in a child process (the switch is process-wide in moto).

    The first three requests are free: they make an admin user, whose keys
    (:attr:`admin`) then set the scene. :meth:`keys_for` makes a user holding
    exactly one policy document and returns its keys.
    """

    def __init__(self) -> None:
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line:
            self.shutdown()
            raise RuntimeError("the IAM-enforcing moto server did not start")
        self.endpoint = f"http://{line}"
        self.admin = self.keys_for(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]},
            name="admin",
            keys=FAKE_KEYS,
        )

    def client(self, service: str, keys: dict[str, str]) -> Any:
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint, **keys)

    def keys_for(
        self, policy: dict[str, Any], *, name: str | None = None, keys: dict[str, str] | None = None
    ) -> dict[str, str]:
        iam = self.client("iam", keys or self.admin)
        user = name or f"u{uuid.uuid4().hex[:10]}"
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        return {"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": k["SecretAccessKey"]}

    def shutdown(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()


def unique_tag() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


def run_instance(client: Any, az: str) -> str:
    r = client.run_instances(
        ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="g5.xlarge", Placement={"AvailabilityZone": az}
    )
    return str(r["Instances"][0]["InstanceId"])
