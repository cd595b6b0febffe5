"""IAM, Resource Manager and Cloud Storage IAM routes for tests/gcefake.py's fake (one server, all of Google).

Request bodies are checked against the discovery documents iam.v1 (``CreateServiceAccountRequest``,
``CreateRoleRequest``, ``UndeleteRoleRequest``), cloudresourcemanager.v1 (``GetIamPolicyRequest``,
``SetIamPolicyRequest``) and storage.v1 (``Policy``), with each method's required fields. What the
routes do follows the reference pages, not an observed service:

- ``projects.serviceAccounts.create`` / ``get`` / ``delete`` (``/v1/projects/P/serviceAccounts[/EMAIL]``):
  409 ``ALREADY_EXISTS`` for an existing id; the email is ``ID@P.iam.gserviceaccount.com``.
- ``projects.roles.create`` / ``get`` / ``delete`` / ``undelete``: ``delete`` marks the role
  ``deleted: true`` (it stays, and ``create`` of its id is 409, for 7 days, then 37 days unusable);
  ``undelete`` needs the role's current ``etag``.
- ``projects.getIamPolicy`` / ``setIamPolicy`` (POST ``/v1/projects/P:getIamPolicy``), storage
  ``buckets.getIamPolicy`` / ``setIamPolicy`` (GET/PUT ``/storage/v1/b/B/iam``): a set whose ``etag``
  is not the current one is refused (409 ``ABORTED`` / 412), the etag changes on every set; a
  binding with a ``condition`` needs policy ``version`` 3 (400 otherwise).
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

from tests.apischema import discovery_schema
from tests.restfake import Answer, Request, RestFake, SchemaError, check

IAM = r"/v1/projects/(?P<project>[^/:]+)"
CREATE_SA = discovery_schema("iam.v1", "CreateServiceAccountRequest", "iam.projects.serviceAccounts.create")
CREATE_ROLE = discovery_schema("iam.v1", "CreateRoleRequest")
UNDELETE_ROLE = discovery_schema("iam.v1", "UndeleteRoleRequest")
GET_POLICY = discovery_schema("cloudresourcemanager.v1", "GetIamPolicyRequest")
SET_POLICY = discovery_schema("cloudresourcemanager.v1", "SetIamPolicyRequest")
BUCKET_POLICY = discovery_schema("storage.v1", "Policy")


class GoogleIam:
    """The IAM state of the fake: ``accounts[email]``, ``roles[(project, id)]``, ``policies[resource]``."""

    def __init__(self, fake: RestFake) -> None:
        self.fake = fake
        self.accounts: dict[str, dict[str, Any]] = {}
        self.roles: dict[tuple[str, str], dict[str, Any]] = {}
        #: "projects/P" or "b/BUCKET" -> policy
        self.policies: dict[str, dict[str, Any]] = {}
        self._etags = itertools.count(1)
        fake.route("POST", IAM + r"/serviceAccounts", self._create_sa)
        fake.route("GET", IAM + r"/serviceAccounts/(?P<email>[^/]+)", self._get_sa)
        fake.route("DELETE", IAM + r"/serviceAccounts/(?P<email>[^/]+)", self._delete_sa)
        fake.route("POST", IAM + r"/roles", self._create_role)
        fake.route("GET", IAM + r"/roles/(?P<role>[^/:]+)", self._get_role)
        fake.route("DELETE", IAM + r"/roles/(?P<role>[^/:]+)", self._delete_role)
        fake.route("POST", IAM + r"/roles/(?P<role>[^/:]+):undelete", self._undelete_role)
        fake.route("POST", IAM + r":getIamPolicy", self._get_project_policy)
        fake.route("POST", IAM + r":setIamPolicy", self._set_project_policy)
        fake.route("GET", r"/storage/v1/b/(?P<bucket>[^/]+)/iam", self._get_bucket_policy)
        fake.route("PUT", r"/storage/v1/b/(?P<bucket>[^/]+)/iam", self._set_bucket_policy)

    def add_project(self, project: str) -> None:
        self.policies[f"projects/{project}"] = {"version": 1, "etag": self._etag(), "bindings": []}

    def add_bucket(self, bucket: str) -> None:
        self.policies[f"b/{bucket}"] = {
            "kind": "storage#policy",
            "resourceId": f"projects/_/buckets/{bucket}",
            "version": 1,
            "etag": self._etag(),
            "bindings": [{"role": "roles/storage.legacyBucketOwner", "members": ["projectOwner:p"]}],
        }

    def _etag(self) -> str:
        return base64.b64encode(f"etag-{next(self._etags)}".encode()).decode()

    def _error(self, code: int, status: str, message: str) -> Answer:
        return code, {"error": {"code": code, "message": message, "status": status}}, {}

    # -- service accounts
    def _create_sa(self, r: Request) -> Answer:
        check(r.body, CREATE_SA)
        email = f"{r.body['accountId']}@{r.match['project']}.iam.gserviceaccount.com"
        if email in self.accounts:
            return self._error(409, "ALREADY_EXISTS", f"Service account {r.body['accountId']} already exists")
        sa = {
            "name": f"projects/{r.match['project']}/serviceAccounts/{email}",
            "projectId": r.match["project"],
            "uniqueId": str(100000000000000000000 + len(self.accounts)),
            "email": email,
            **r.body.get("serviceAccount", {}),
        }
        self.accounts[email] = sa
        return 200, sa, {}

    def _get_sa(self, r: Request) -> Answer:
        sa = self.accounts.get(r.match["email"])
        return (200, sa, {}) if sa else self._error(404, "NOT_FOUND", f"Unknown service account {r.match['email']}")

    def _delete_sa(self, r: Request) -> Answer:
        if self.accounts.pop(r.match["email"], None) is None:
            return self._error(404, "NOT_FOUND", "Unknown service account")
        return 200, {}, {}

    # -- custom roles
    def _create_role(self, r: Request) -> Answer:
        check(r.body, CREATE_ROLE)
        if not r.body.get("roleId"):
            raise SchemaError("roleId is required")
        key = (r.match["project"], r.body["roleId"])
        if key in self.roles:
            return self._error(409, "ALREADY_EXISTS", f"A role named {key[1]} in projects/{key[0]} already exists.")
        role = {**r.body.get("role", {}), "name": f"projects/{key[0]}/roles/{key[1]}", "etag": self._etag()}
        self.roles[key] = role
        return 200, role, {}

    def _get_role(self, r: Request) -> Answer:
        role = self.roles.get((r.match["project"], r.match["role"]))
        return (200, role, {}) if role else self._error(404, "NOT_FOUND", f"Role {r.match['role']} not found")

    def _delete_role(self, r: Request) -> Answer:
        role = self.roles.get((r.match["project"], r.match["role"]))
        if role is None:
            return self._error(404, "NOT_FOUND", "role not found")
        role.update(deleted=True, etag=self._etag())
        return 200, role, {}

    def _undelete_role(self, r: Request) -> Answer:
        check(r.body, UNDELETE_ROLE)
        role = self.roles.get((r.match["project"], r.match["role"]))
        if role is None:
            return self._error(404, "NOT_FOUND", "role not found")
        if r.body.get("etag") != role["etag"]:
            return self._error(409, "ABORTED", "etag mismatch")
        role.pop("deleted", None)
        role["etag"] = self._etag()
        return 200, role, {}

    # -- policies
    def _policy(self, resource: str) -> dict[str, Any] | None:
        return self.policies.get(resource)

    def _checked_set(self, resource: str, policy: dict[str, Any], *, conflict: int) -> Answer:
        current = self.policies.get(resource)
        if current is None:
            return self._error(404, "NOT_FOUND", f"{resource} not found")
        if policy.get("etag") != current["etag"]:
            return self._error(conflict, "ABORTED", "There were concurrent policy changes (etag mismatch)")
        if any("condition" in b for b in policy.get("bindings", [])) and policy.get("version") != 3:
            raise SchemaError("a binding with a condition needs policy version 3")
        new = {**current, **policy, "etag": self._etag()}
        self.policies[resource] = new
        return 200, new, {}

    def _get_project_policy(self, r: Request) -> Answer:
        check(r.body or {}, GET_POLICY)
        p = self._policy(f"projects/{r.match['project']}")
        return (200, p, {}) if p else self._error(403, "PERMISSION_DENIED", "no such project")

    def _set_project_policy(self, r: Request) -> Answer:
        check(r.body, SET_POLICY)
        return self._checked_set(f"projects/{r.match['project']}", r.body["policy"], conflict=409)

    def _get_bucket_policy(self, r: Request) -> Answer:
        p = self._policy(f"b/{r.match['bucket']}")
        return (200, p, {}) if p else self._error(404, "NOT_FOUND", "The specified bucket does not exist.")

    def _set_bucket_policy(self, r: Request) -> Answer:
        check(r.body, BUCKET_POLICY)
        return self._checked_set(f"b/{r.match['bucket']}", r.body, conflict=412)

    def bindings(self, resource: str) -> list[dict[str, Any]]:
        return list(self.policies.get(resource, {}).get("bindings", []))
