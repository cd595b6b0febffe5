"""A local fake of Azure Resource Manager (Microsoft.Compute), over TLS, checked against the REST specs.

ARM is HTTPS only (azure-core refuses to send a bearer token over plain HTTP), so the fake
serves TLS with a self-signed certificate made here (:func:`self_signed`); clients trust it
through ``REQUESTS_CA_BUNDLE`` (which azure-core's requests transport reads).

Where each fact comes from (the Azure REST API reference, Compute,
https://learn.microsoft.com/rest/api/compute/, generated from azure-rest-api-specs
``specification/compute/resource-manager/Microsoft.Compute/ComputeRP/stable/*/virtualMachineScaleSet.json``):

- Virtual Machine Scale Sets - Update: ``PATCH /subscriptions/{sub}/resourceGroups/{rg}/providers/
  Microsoft.Compute/virtualMachineScaleSets/{name}?api-version=...``, body
  ``VirtualMachineScaleSetUpdate``: ``sku`` is a ``Sku`` (``name`` string, ``tier`` string,
  ``capacity`` integer/int64: "the number of virtual machines in the scale set"); answers 200
  with the scale set (``properties.provisioningState``) -- reference page
  virtual-machine-scale-sets/update.
- Virtual Machine Scale Sets - Get: ``GET`` the same path: 200 and the scale set, or 404 with
  ``{"error": {"code": "ResourceNotFound", "message"}}`` -- reference page virtual-machine-scale-sets/get
  and the ARM error format (azure-resource-manager/management/common-deployment-errors).
- Every call carries ``api-version`` (required query parameter of every ARM operation).
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

from tests.restfake import Answer, Request, RestFake, SchemaError, check

SUB = r"/subscriptions/(?P<sub>[^/]+)"
RG = SUB + r"/resourceGroups/(?P<rg>[^/]+)"
VMSS = RG + r"/providers/Microsoft\.Compute/virtualMachineScaleSets/(?P<name>[^/]+)"

#: virtualMachineScaleSet.json, definitions Sku and VirtualMachineScaleSetUpdate (the fields spotsafe sends).
SKU = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tier": {"type": "string"}, "capacity": {"type": "integer"}},
}
VMSS_UPDATE = {"type": "object", "properties": {"sku": SKU}}


def self_signed(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 and the PEM file a client trusts it with."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "arm.pem", directory / "arm.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx, cert_path


class ARMFake(RestFake):
    """Scale sets in memory: ``scale_sets[(subscription, resource group, name)]``."""

    name = "arm"

    def __init__(self, tls: ssl.SSLContext, ca: Path) -> None:
        super().__init__(tls=tls)
        #: the PEM file a client trusts this server with
        self.ca = ca
        self.scale_sets: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.route("GET", VMSS, self._get)
        self.route("PATCH", VMSS, self._update)

    def add_scale_set(self, sub: str, rg: str, name: str, *, capacity: int = 1) -> dict[str, Any]:
        vmss = {
            "id": f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}",
            "name": name,
            "type": "Microsoft.Compute/virtualMachineScaleSets",
            "location": "eastus",
            "sku": {"name": "Standard_NC4as_T4_v3", "tier": "Standard", "capacity": capacity},
            "properties": {"orchestrationMode": "Flexible", "provisioningState": "Succeeded"},
        }
        with self.lock:
            self.scale_sets[(sub, rg, name)] = vmss
        return vmss

    def _key(self, r: Request) -> tuple[str, str, str]:
        if not r.query.get("api-version"):
            raise SchemaError("the required query parameter api-version is missing")
        return r.match["sub"], r.match["rg"], r.match["name"]

    def _missing(self, name: str) -> Answer:
        message = f"The Resource 'Microsoft.Compute/virtualMachineScaleSets/{name}' was not found."
        return 404, {"error": {"code": "ResourceNotFound", "message": message}}, {}

    def _get(self, r: Request) -> Answer:
        vmss = self.scale_sets.get(self._key(r))
        return (200, vmss, {}) if vmss is not None else self._missing(r.match["name"])

    def _update(self, r: Request) -> Answer:
        key = self._key(r)
        check(r.body, VMSS_UPDATE)
        vmss = self.scale_sets.get(key)
        if vmss is None:
            return self._missing(r.match["name"])
        vmss["sku"].update(r.body.get("sku", {}))
        return 200, vmss, {}
