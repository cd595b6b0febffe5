"""A local fake of Azure Resource Manager (Microsoft.Compute), over TLS, checked against the generated models.

Request bodies are checked against the schema tests/apischema.py rebuilds from the models
azure-mgmt-compute generates from the OpenAPI specs (azure-rest-api-specs): each field's REST
name, type, extensible-enum values and whether it is required; objects closed. The field lists
below are what spotsafe sends; the checker knows every field the spec has.

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
- Virtual Machine Scale Sets - Create Or Update: ``PUT`` the same path, body ``VirtualMachineScaleSet``:
  ``location``, ``tags`` (map of strings), ``sku``, ``identity.type`` (SystemAssigned | UserAssigned |
  "SystemAssigned, UserAssigned" | None), ``properties`` (``VirtualMachineScaleSetProperties``:
  ``orchestrationMode`` Uniform | Flexible, ``platformFaultDomainCount`` integer,
  ``spotRestorePolicy`` (``enabled`` boolean, ``restoreTimeout`` ISO 8601 duration string),
  ``virtualMachineProfile`` (``priority`` Regular | Low | Spot, ``evictionPolicy`` Deallocate | Delete,
  ``billingProfile.maxPrice`` number, ``osProfile`` (``computerNamePrefix``, ``adminUsername``,
  ``customData`` base64 strings, ``linuxConfiguration``: ``disablePasswordAuthentication`` boolean,
  ``ssh.publicKeys[]``: ``path``, ``keyData``), ``storageProfile`` (``imageReference``: ``publisher``,
  ``offer``, ``sku``, ``version``; ``osDisk``: ``createOption`` FromImage | Empty | Attach | Copy | Restore,
  ``caching`` None | ReadOnly | ReadWrite, ``managedDisk.storageAccountType`` (Standard_LRS |
  Premium_LRS | StandardSSD_LRS | UltraSSD_LRS | Premium_ZRS | StandardSSD_ZRS | PremiumV2_LRS),
  ``deleteOption`` Delete | Detach), ``networkProfile`` (``networkApiVersion`` 2020-11-01,
  ``networkInterfaceConfigurations[]``: ``name``, ``properties``: ``primary``, ``deleteOption``,
  ``ipConfigurations[]``: ``name``, ``properties``: ``primary``, ``subnet.id``,
  ``publicIPAddressConfiguration``: ``name``, ``properties.deleteOption``)))) -- reference page
  virtual-machine-scale-sets/create-or-update; a Flexible scale set needs ``networkApiVersion``
  and ``platformFaultDomainCount`` (the same page's Flexible example).
- Virtual Machine Scale Sets - Delete: ``DELETE`` the same path: 200/202/204 -- reference page
  virtual-machine-scale-sets/delete. Disks - List By Resource Group: ``GET .../providers/
  Microsoft.Compute/disks``: ``{"value": [...]}`` -- reference page disks/list-by-resource-group.
- Every call carries ``api-version`` (required query parameter of every ARM operation).
"""

from __future__ import annotations

import datetime
import ssl
import uuid
from pathlib import Path
from typing import Any

from azure.mgmt.authorization.v2022_04_01 import models as authorization_models
from azure.mgmt.compute import models as compute_models

from tests.apischema import azure_schema
from tests.restfake import Answer, Request, RestFake, SchemaError, check

SUB = r"/subscriptions/(?P<sub>[^/]+)"
RG = SUB + r"/resourceGroups/(?P<rg>[^/]+)"
VMSS_PATH = RG + r"/providers/Microsoft\.Compute/virtualMachineScaleSets/(?P<name>[^/]+)"

#: The request bodies' schemas, from the models azure-mgmt-compute generates from the OpenAPI spec
#: (tests/apischema.py): VirtualMachineScaleSet (PUT) and VirtualMachineScaleSetUpdate (PATCH).
VMSS = azure_schema(compute_models.VirtualMachineScaleSet)
VMSS_UPDATE = azure_schema(compute_models.VirtualMachineScaleSetUpdate)
#: azure-mgmt-authorization's RoleAssignmentCreateParameters (api-version 2022-04-01, msrest _attribute_map).
ROLE_ASSIGNMENT = azure_schema(authorization_models.RoleAssignmentCreateParameters)
ROLE_ASSIGNMENT_PATH = r"(?P<scope>/subscriptions/.+)/providers/Microsoft\.Authorization/roleAssignments/(?P<ra>[^/]+)"


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
        self.route("GET", VMSS_PATH, self._get)
        self.route("PATCH", VMSS_PATH, self._update)
        self.route("PUT", VMSS_PATH, self._put)
        self.route("DELETE", VMSS_PATH, self._delete)
        self.route("GET", RG + r"/providers/Microsoft\.Compute/disks", self._disks)
        #: managed disks by (subscription, resource group, name): {"name", "tags"}
        self.disks: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.route("DELETE", RG + r"/providers/Microsoft\.Compute/disks/(?P<name>[^/]+)", self._delete_disk)
        #: the scale sets' VMs by (subscription, resource group, name)
        self.vms: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.route("GET", RG + r"/providers/Microsoft\.Compute/virtualMachines", self._list_vms)
        #: role assignments by (scope lowercased, name)
        self.role_assignments: dict[tuple[str, str], dict[str, Any]] = {}
        #: the principals that exist (a scale set's system-assigned identity, from its PUT)
        self.principals: set[str] = set()
        #: how many more assignment PUTs answer PrincipalNotFound (a new identity not replicated yet)
        self.principal_lag = 0
        #: storage accounts (resource ids, lowercased) whose containers may be assignment scopes
        self.storage_accounts: set[str] = set()
        self.route("GET", ROLE_ASSIGNMENT_PATH, self._get_assignment)
        self.route("PUT", ROLE_ASSIGNMENT_PATH, self._put_assignment)
        self.route("DELETE", ROLE_ASSIGNMENT_PATH, self._delete_assignment)

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
        self._set_vms(key, int(vmss["sku"].get("capacity", 0)))
        return 200, vmss, {}

    def _put(self, r: Request) -> Answer:
        key = self._key(r)
        check(r.body, VMSS)
        created = key not in self.scale_sets
        import copy

        vmss = {
            **copy.deepcopy(r.body),
            "id": f"/subscriptions/{key[0]}/resourceGroups/{key[1]}/providers/Microsoft.Compute/virtualMachineScaleSets/{key[2]}",
            "name": key[2],
            "type": "Microsoft.Compute/virtualMachineScaleSets",
        }
        vmss["properties"] = {**vmss.get("properties", {}), "provisioningState": "Succeeded"}
        vmss["properties"].get("virtualMachineProfile", {}).get("osProfile", {}).pop(
            "customData", None
        )  # never read back
        if created and (r.body.get("identity") or {}).get("type") == "SystemAssigned":
            principal = str(uuid.uuid4())
            self.principals.add(principal)
            vmss["identity"] = {**r.body["identity"], "principalId": principal, "tenantId": str(uuid.uuid4())}
        self.scale_sets[key] = vmss
        if created:
            # What the scale set then does: one VM, whose data disks (deleteOption Detach) outlive it.
            self._set_vms(key, int(r.body.get("sku", {}).get("capacity", 0)))
            profile = r.body.get("properties", {}).get("virtualMachineProfile", {})
            for disk in profile.get("storageProfile", {}).get("dataDisks", []):
                disk_name = f"{key[2]}_{uuid.uuid4().hex[:8]}_disk2_{uuid.uuid4().hex}"
                self.disks[(key[0], key[1], disk_name)] = {"name": disk_name, "diskSizeGB": disk.get("diskSizeGB")}
        return (201 if created else 200), vmss, {}

    def _delete(self, r: Request) -> Answer:
        key = self._key(r)
        if key not in self.scale_sets:
            return 204, None, {}
        self._set_vms(key, 0)
        del self.scale_sets[key]
        return 200, None, {}

    def _set_vms(self, key: tuple[str, str, str], capacity: int) -> None:
        """A Flexible scale set's VMs: ``NAME_xxxxxxxx``, as many as its capacity."""
        vmss_id = self.scale_sets[key]["id"]
        mine = [k for k, vm in self.vms.items() if vm["properties"]["virtualMachineScaleSet"]["id"] == vmss_id]
        for k in mine[capacity:]:
            del self.vms[k]
        for _ in range(capacity - len(mine)):
            name = f"{key[2]}_{uuid.uuid4().hex[:8]}"
            self.vms[(key[0], key[1], name)] = {
                "id": f"/subscriptions/{key[0]}/resourceGroups/{key[1]}/providers/Microsoft.Compute/virtualMachines/{name}",
                "name": name,
                "type": "Microsoft.Compute/virtualMachines",
                "location": "eastus",
                "properties": {"virtualMachineScaleSet": {"id": vmss_id}, "provisioningState": "Succeeded"},
            }

    def _list_vms(self, r: Request) -> Answer:
        if not r.query.get("api-version"):
            raise SchemaError("the required query parameter api-version is missing")
        return 200, {"value": [v for k, v in self.vms.items() if k[:2] == (r.match["sub"], r.match["rg"])]}, {}

    def _delete_disk(self, r: Request) -> Answer:
        if not r.query.get("api-version"):
            raise SchemaError("the required query parameter api-version is missing")
        if self.disks.pop((r.match["sub"], r.match["rg"], r.match["name"]), None) is None:
            return 204, None, {}
        return 200, None, {}

    def add_storage_account(self, sub: str, rg: str, name: str) -> str:
        rid = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/{name}"
        self.storage_accounts.add(rid.lower())
        return rid

    def _scope_exists(self, scope: str) -> bool:
        low = scope.lower()
        vmss = {
            f"/subscriptions/{k[0]}/resourcegroups/{k[1]}/providers/microsoft.compute/virtualmachinescalesets/{k[2]}".lower()
            for k in self.scale_sets
        }
        return low in vmss or any(
            low.startswith(a + "/blobservices/default/containers/") for a in self.storage_accounts
        )

    def _assignment_missing(self, r: Request) -> Answer:
        message = f"The role assignment '{r.match['ra']}' is not found."
        return 404, {"error": {"code": "RoleAssignmentNotFound", "message": message}}, {}

    def _get_assignment(self, r: Request) -> Answer:
        a = self.role_assignments.get((r.match["scope"].lower(), r.match["ra"]))
        return (200, a, {}) if a is not None else self._assignment_missing(r)

    def _put_assignment(self, r: Request) -> Answer:
        if not r.query.get("api-version"):
            raise SchemaError("the required query parameter api-version is missing")
        check(r.body, ROLE_ASSIGNMENT)
        key = (r.match["scope"].lower(), r.match["ra"])
        props = r.body["properties"]
        if not self._scope_exists(r.match["scope"]):
            return (
                400,
                {"error": {"code": "InvalidResourceGroup", "message": f"scope {r.match['scope']} not found"}},
                {},
            )
        if props["principalId"] not in self.principals or self.principal_lag > 0:
            self.principal_lag = max(0, self.principal_lag - 1)
            message = f"Principal {props['principalId']} does not exist in the directory."
            return 400, {"error": {"code": "PrincipalNotFound", "message": message}}, {}
        for (scope, name), a in self.role_assignments.items():
            same = a["properties"]["principalId"] == props["principalId"]
            if (
                scope == key[0]
                and name != key[1]
                and same
                and a["properties"]["roleDefinitionId"] == props["roleDefinitionId"]
            ):
                return (
                    409,
                    {"error": {"code": "RoleAssignmentExists", "message": "The role assignment already exists."}},
                    {},
                )
        if key in self.role_assignments:
            return (
                409,
                {"error": {"code": "RoleAssignmentExists", "message": "The role assignment already exists."}},
                {},
            )
        a = {
            "id": f"{r.match['scope']}/providers/Microsoft.Authorization/roleAssignments/{r.match['ra']}",
            "name": r.match["ra"],
            "type": "Microsoft.Authorization/roleAssignments",
            "properties": {**props, "scope": r.match["scope"]},
        }
        self.role_assignments[key] = a
        return 201, a, {}

    def _delete_assignment(self, r: Request) -> Answer:
        a = self.role_assignments.pop((r.match["scope"].lower(), r.match["ra"]), None)
        return (200, a, {}) if a is not None else (204, None, {})

    def _disks(self, r: Request) -> Answer:
        if not r.query.get("api-version"):
            raise SchemaError("the required query parameter api-version is missing")
        items = [d for k, d in self.disks.items() if k[:2] == (r.match["sub"], r.match["rg"])]
        return 200, {"value": items}, {}
