"""The run's least-privilege identity on Azure: role assignments for the scale set's own managed identity.

The scale set has a system-assigned identity (created and deleted with it). ``launch`` gives it,
through ``Microsoft.Authorization/roleAssignments`` PUTs (azure-mgmt-authorization):

- **Virtual Machine Contributor scoped to the scale set only** (to set its capacity to 0 when the
  run completes: ``python -m spotsafe.cloud.azure.finish``); it reaches nothing else in the
  resource group;
- with an ``az://CONTAINER/...`` store, **Storage Blob Data Contributor scoped to that container**
  of the ``--storage-account`` (data-plane read/write of the checkpoints, nothing else).

Each assignment's name is a UUID derived from (scope, role, run), so a rerun finds the one an
interrupted launch made (a second PUT of the same principal, role and scope under another name
would be refused ``RoleAssignmentExists``); its ``description`` is ``spotsafe-run=NAME``.
``down`` deletes them *before* the scale set (an assignment whose principal is gone lingers as
"Identity not found"). A freshly created identity can take a while to replicate: a
``PrincipalNotFound`` answer is retried for up to :data:`PRINCIPAL_WAIT` seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spotsafe.cloud.plan import Verb
from spotsafe.errors import LaunchError

TAG = "spotsafe-run"
#: Built-in role definition ids (the same in every subscription).
VM_CONTRIBUTOR = "9980e02c-c2be-4d73-94e8-173b1dc7cf3c"
BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
PRINCIPAL_WAIT = 300.0
#: How ensure() waits between PrincipalNotFound answers (tests replace it).
pause: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class Assignment:
    scope: str
    role: str  # a role definition id (GUID)
    what: str  # for the plan: "Virtual Machine Contributor on the scale set"

    def name(self, run: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"spotsafe:{run}:{self.role}:{self.scope.lower()}"))


def storage_account_id(subscription: str, resource_group: str, account: str) -> str:
    """A storage account's resource id from a name (in the run's resource group) or an id as given."""
    if account.startswith("/subscriptions/"):
        return account.rstrip("/")
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Storage/storageAccounts/{account}"


def assignments(
    subscription: str, resource_group: str, resource: str, store: str, account: str | None
) -> list[Assignment]:
    scale_set = (
        f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
        f"/providers/Microsoft.Compute/virtualMachineScaleSets/{resource}"
    )
    out = [Assignment(scale_set, VM_CONTRIBUTOR, "Virtual Machine Contributor on the scale set")]
    if store.startswith("az://") and account:
        container = store[len("az://") :].split("/", 1)[0]
        scope = (
            f"{storage_account_id(subscription, resource_group, account)}/blobServices/default/containers/{container}"
        )
        out.append(Assignment(scope, BLOB_DATA_CONTRIBUTOR, f"Storage Blob Data Contributor on container {container}"))
    return out


def _get(auth: Any, a: Assignment, run: str) -> Any:
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    try:
        return auth.role_assignments.get(a.scope, a.name(run))
    except ResourceNotFoundError:
        return None
    except HttpResponseError as e:
        raise LaunchError(f"get the role assignment {a.what}: {e.message}") from e


Say = Callable[[Verb, str, str, str], None]


def ensure(
    auth: Any,
    subscription: str,
    run: str,
    wanted: list[Assignment],
    principal: str | None,
    *,
    apply: bool,
    say: Say,
) -> None:
    """Create the missing assignments for ``principal`` (None: the scale set is yet to be made: plan them)."""
    from azure.core.exceptions import HttpResponseError

    for a in wanted:
        current = _get(auth, a, run) if principal else None
        if current is not None:
            say("keep", "role assignment", a.what, "")
            continue
        say("create", "role assignment", a.what, "for the scale set's managed identity")
        if not apply:
            continue
        if not principal:
            raise LaunchError("the scale set has no system-assigned identity: cannot assign it roles")
        from azure.mgmt.authorization.v2022_04_01.models import RoleAssignmentCreateParameters

        params = RoleAssignmentCreateParameters(
            role_definition_id=f"/subscriptions/{subscription}/providers/Microsoft.Authorization/roleDefinitions/{a.role}",
            principal_id=principal,
            principal_type="ServicePrincipal",
            description=f"{TAG}={run}",
        )
        deadline = time.monotonic() + PRINCIPAL_WAIT
        while True:
            try:
                auth.role_assignments.create(a.scope, a.name(run), params)
                break
            except HttpResponseError as e:
                code = getattr(getattr(e, "error", None), "code", "") or ""
                if code == "PrincipalNotFound" and time.monotonic() < deadline:
                    pause(10.0)  # the new identity has not replicated yet
                    continue
                raise LaunchError(f"assign {a.what}: {e.message}") from e


def remove(auth: Any, run: str, wanted: list[Assignment], *, apply: bool, say: Say) -> list[str]:
    """Delete the run's assignments (only plan without ``apply``); those still there after."""
    from azure.core.exceptions import HttpResponseError

    left: list[str] = []
    for a in wanted:
        current = _get(auth, a, run)
        if current is None or (current.description or "") != f"{TAG}={run}":
            continue
        say("delete", "role assignment", a.what, "")
        if apply:
            try:
                auth.role_assignments.delete(a.scope, a.name(run))
            except HttpResponseError as e:
                raise LaunchError(f"delete the role assignment {a.what}: {e.message}") from e
            if _get(auth, a, run) is not None:
                left.append(f"role assignment {a.what}")
    return left
