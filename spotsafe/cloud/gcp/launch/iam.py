"""The run's least-privilege identity on GCP: a service account, a custom role, two conditional bindings.

``spotsafe launch --cloud gcp`` (without ``--service-account``) gives the VM its own service account
``spotsafe-NAME@PROJECT.iam.gserviceaccount.com`` (IAM ``projects.serviceAccounts.create``;
``description`` ``spotsafe-run=NAME``, service accounts having no labels) and lets it do exactly
what the VM does:

- **resize its own group to 0** (``python -m spotsafe.cloud.gcp.finish``): a custom role
  ``spotsafe_NAME`` (``projects.roles.create``) with ``compute.instanceGroupManagers.get`` and
  ``.update`` only, bound on the project (Compute has no IAM policy on a managed instance group)
  under an IAM condition naming the group:
  ``resource.name == "projects/P/zones/Z/instanceGroupManagers/spotsafe-NAME"``
  (Resource Manager ``projects.setIamPolicy``, policy version 3);
- **read and write its checkpoints** when the store is ``gs://BUCKET/PREFIX``: ``roles/storage.objectUser``
  on the bucket (Cloud Storage ``buckets.setIamPolicy``) under a condition limiting it to the objects
  under the prefix (and the bucket itself, for listing). Conditions on a bucket need uniform
  bucket-level access.

Every call is a plain REST call through google-auth's ``AuthorizedSession`` (no extra SDK);
``endpoint`` points all three APIs at one base (tests, private endpoints). A custom role that
``down`` deleted stays for 7 days as deleted and its id cannot be reused: a later launch of the
same name undeletes it (``projects.roles.undelete``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from spotsafe.cloud.plan import Verb
from spotsafe.errors import LaunchError

LABEL = "spotsafe-run"
PERMISSIONS = ("compute.instanceGroupManagers.get", "compute.instanceGroupManagers.update")
STORE_ROLE = "roles/storage.objectUser"
_ENDPOINTS = {
    "iam": "https://iam.googleapis.com",
    "crm": "https://cloudresourcemanager.googleapis.com",
    "storage": "https://storage.googleapis.com",
}


def account_id(name: str) -> str:
    """The service account id of a run: ``spotsafe-NAME``, 6-30 characters (a long name is hashed)."""
    full = f"spotsafe-{name}"
    if len(full) <= 30:
        return full
    return f"spotsafe-{name[:14].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def account_email(name: str, project: str) -> str:
    return f"{account_id(name)}@{project}.iam.gserviceaccount.com"


def role_id(name: str) -> str:
    return "spotsafe_" + name.replace("-", "_")


@dataclass(frozen=True)
class Binding:
    """One conditional role binding spotsafe owns (recognised by its condition's title and expression)."""

    where: str  # "project" or "bucket BUCKET"
    role: str
    member: str
    title: str
    expression: str

    def matches(self, b: dict[str, Any]) -> bool:
        cond = b.get("condition") or {}
        return bool(
            b.get("role") == self.role
            and self.member in b.get("members", [])
            and cond.get("title") == self.title
            and cond.get("expression") == self.expression
        )

    def body(self) -> dict[str, Any]:
        condition = {"title": self.title, "description": f"spotsafe launch {self.title}", "expression": self.expression}
        return {"role": self.role, "members": [self.member], "condition": condition}


def bindings(name: str, project: str, zone: str, store: str) -> list[Binding]:
    """The run's bindings: the custom role on its group; with a gs:// store, object access under its prefix."""
    member = f"serviceAccount:{account_email(name, project)}"
    title = f"spotsafe-{name}"
    group = f"projects/{project}/zones/{zone}/instanceGroupManagers/spotsafe-{name}"
    out = [
        Binding(
            "project",
            f"projects/{project}/roles/{role_id(name)}",
            member,
            title,
            f'resource.name == "{group}"',
        )
    ]
    if store.startswith("gs://"):
        bucket, _, prefix = store[len("gs://") :].partition("/")
        objects = f"projects/_/buckets/{bucket}/objects/{prefix.rstrip('/')}/" if prefix else ""
        expression = (
            f'resource.type == "storage.googleapis.com/Bucket" || resource.name.startsWith("{objects}")'
            if objects
            else 'resource.type == "storage.googleapis.com/Bucket" || resource.type == "storage.googleapis.com/Object"'
        )
        out.append(Binding(f"bucket {bucket}", STORE_ROLE, member, title, expression))
    return out


class GoogleRest:
    """IAM, Resource Manager and Cloud Storage JSON APIs over one AuthorizedSession."""

    def __init__(self, credentials: Any, endpoint: str | None = None) -> None:
        from google.auth.transport.requests import AuthorizedSession

        self.session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
        self.base = {k: (endpoint or v).rstrip("/") for k, v in _ENDPOINTS.items()}

    def call(self, what: str, method: str, api: str, path: str, body: Any = None, **params: str) -> Any:
        """One call; a 404 is None, any other failure a LaunchError naming ``what``."""
        try:
            url = f"{self.base[api]}{path}"
            r = self.session.request(method, url, json=body, params=params or None, timeout=60)  # type: ignore[no-untyped-call]
        except Exception as e:
            raise LaunchError(f"{what}: {e}") from e
        if r.status_code == 404:
            return None
        if r.status_code >= 300:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500]
            raise LaunchError(f"{what}: {r.status_code} {message}")
        return r.json() if r.content else {}


def _policy_path(where: str, project: str) -> tuple[str, str, str]:
    """(api, get path, set path) of a binding's policy."""
    if where == "project":
        return "crm", f"/v1/projects/{project}:getIamPolicy", f"/v1/projects/{project}:setIamPolicy"
    bucket = quote(where.split(" ", 1)[1], safe="")
    return "storage", f"/storage/v1/b/{bucket}/iam", f"/storage/v1/b/{bucket}/iam"


def get_policy(rest: GoogleRest, where: str, project: str) -> dict[str, Any]:
    api, get, _ = _policy_path(where, project)
    if api == "crm":
        policy = rest.call(
            f"get the IAM policy of {where}", "POST", api, get, {"options": {"requestedPolicyVersion": 3}}
        )
    else:
        policy = rest.call(f"get the IAM policy of {where}", "GET", api, get, optionsRequestedPolicyVersion="3")
    if policy is None:
        raise LaunchError(f"the {where} does not exist (or this account cannot read its IAM policy)")
    return dict(policy)


def set_policy(rest: GoogleRest, where: str, project: str, policy: dict[str, Any]) -> None:
    """Write a policy read by :func:`get_policy` (its etag guards against a concurrent change)."""
    api, _, put = _policy_path(where, project)
    policy = {**policy, "version": 3}
    if api == "crm":
        rest.call(f"set the IAM policy of {where}", "POST", api, put, {"policy": policy})
    else:
        rest.call(f"set the IAM policy of {where}", "PUT", api, put, policy)


Say = Callable[[Verb, str, str, str], None]


def ensure(rest: GoogleRest, name: str, project: str, zone: str, store: str, *, apply: bool, say: Say) -> None:
    """Create what is missing of the run's identity (only plan without ``apply``)."""
    email, rid = account_email(name, project), role_id(name)
    sa = rest.call(f"get service account {email}", "GET", "iam", f"/v1/projects/{project}/serviceAccounts/{email}")
    if sa is not None and sa.get("description") != f"{LABEL}={name}":
        raise LaunchError(f"a service account {email} exists that spotsafe did not create (its description)")
    say("keep" if sa else "create", "service account", email, "" if sa else "the VM's identity")
    if sa is None and apply:
        body = {
            "accountId": account_id(name),
            "serviceAccount": {"displayName": f"spotsafe {name}", "description": f"{LABEL}={name}"},
        }
        rest.call(f"create service account {email}", "POST", "iam", f"/v1/projects/{project}/serviceAccounts", body)
    path = f"/v1/projects/{project}/roles/{rid}"
    role = rest.call(f"get role {rid}", "GET", "iam", path)
    if role is not None and role.get("description") != f"{LABEL}={name}":
        raise LaunchError(f"a custom role {rid} exists in {project} that spotsafe did not create")
    if role is None or role.get("deleted"):
        say("create", "custom role", rid, ", ".join(PERMISSIONS) if role is None else "undelete (down deleted it)")
        if apply and role is None:
            body = {
                "roleId": rid,
                "role": {
                    "title": f"spotsafe {name}"[:100],
                    "description": f"{LABEL}={name}",
                    "includedPermissions": list(PERMISSIONS),
                    "stage": "GA",
                },
            }
            rest.call(f"create role {rid}", "POST", "iam", f"/v1/projects/{project}/roles", body)
        elif apply:
            rest.call(f"undelete role {rid}", "POST", "iam", f"{path}:undelete", {"etag": role["etag"]})
    else:
        say("keep", "custom role", rid, "")
    for b in bindings(name, project, zone, store):
        policy = get_policy(rest, b.where, project)
        if any(b.matches(x) for x in policy.get("bindings", [])):
            say("keep", f"binding on {b.where}", b.role.rsplit("/", 1)[-1], "")
            continue
        say("create", f"binding on {b.where}", b.role.rsplit("/", 1)[-1], f"{b.member} if {b.expression}")
        if apply:
            policy["bindings"] = [*policy.get("bindings", []), b.body()]
            set_policy(rest, b.where, project, policy)


def remove(rest: GoogleRest, name: str, project: str, zone: str, store: str | None, *, apply: bool, say: Say) -> None:
    """Delete the run's bindings, custom role and service account (only plan without ``apply``).

    In the reverse order of :func:`ensure`, the account last: without the run's own account there
    is nothing of the run's identity left (a run launched with ``--service-account`` has none, and
    its ``down`` reads no IAM policy).
    """
    email, rid = account_email(name, project), role_id(name)
    sa_path = f"/v1/projects/{project}/serviceAccounts/{email}"
    sa = rest.call(f"get service account {email}", "GET", "iam", sa_path)
    if sa is None or sa.get("description") != f"{LABEL}={name}":
        return
    for b in bindings(name, project, zone, store or ""):
        try:
            policy = get_policy(rest, b.where, project)
        except LaunchError:
            if b.where != "project":
                continue  # the bucket is gone: so is its binding
            raise
        kept = [x for x in policy.get("bindings", []) if not b.matches(x)]
        if len(kept) != len(policy.get("bindings", [])):
            say("delete", f"binding on {b.where}", b.role.rsplit("/", 1)[-1], "")
            if apply:
                set_policy(rest, b.where, project, {**policy, "bindings": kept})
    role = rest.call(f"get role {rid}", "GET", "iam", f"/v1/projects/{project}/roles/{rid}")
    if role is not None and not role.get("deleted") and role.get("description") == f"{LABEL}={name}":
        say("delete", "custom role", rid, "")
        if apply:
            rest.call(f"delete role {rid}", "DELETE", "iam", f"/v1/projects/{project}/roles/{rid}")
    say("delete", "service account", email, "")
    if apply:
        rest.call(f"delete service account {email}", "DELETE", "iam", sa_path)


def left(rest: GoogleRest, name: str, project: str, zone: str, store: str | None) -> list[str]:
    """What of the run's identity is still there (after ``down``)."""
    out: list[str] = []
    email, rid = account_email(name, project), role_id(name)
    sa = rest.call("get service account", "GET", "iam", f"/v1/projects/{project}/serviceAccounts/{email}")
    if sa is None or sa.get("description") != f"{LABEL}={name}":
        return out  # none of the run's own (see remove)
    out.append(f"service account {email}")
    role = rest.call("get role", "GET", "iam", f"/v1/projects/{project}/roles/{rid}")
    if role is not None and not role.get("deleted"):
        out.append(f"custom role {rid}")
    for b in bindings(name, project, zone, store or ""):
        try:
            policy = get_policy(rest, b.where, project)
        except LaunchError:
            continue
        if any(b.matches(x) for x in policy.get("bindings", [])):
            out.append(f"binding of {b.role} on {b.where}")
    return out
