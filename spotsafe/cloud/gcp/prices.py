"""GCP Spot VM prices from the Cloud Billing Catalog API (the Compute Engine service's SKUs).

``GET {base}/v1/services/6F81-5844-456A/skus?currencyCode=USD`` (paged by ``nextPageToken``),
with an API key (``--api-key`` / ``SPOTSAFE_GCP_API_KEY``) or else the user's application default
credentials. A Spot VM is billed per vCPU-hour and per GiB-hour of its family: the SKUs whose
``category`` is ``Compute`` / ``Preemptible`` and whose description reads "Spot Preemptible
FAMILY [Predefined] Instance Core|Ram running in ...", for each region in ``serviceRegions``.
A predefined machine type ``FAMILY-standard|highmem|highcpu-N`` is priced whole (N vCPUs and
the family's GiB per vCPU); GPUs and disks are billed apart and not added. The base is
``SPOTSAFE_GCP_BILLING_ENDPOINT`` (default ``https://cloudbilling.googleapis.com``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from spotsafe.cloud.pricing import Price, get_json
from spotsafe.errors import LaunchError

API = "the Cloud Billing Catalog API"
DEFAULT_ENDPOINT = "https://cloudbilling.googleapis.com"
#: The Compute Engine service in the Cloud Billing catalog.
COMPUTE_SERVICE = "6F81-5844-456A"
MAX_PAGES = 100
_SKU = re.compile(r"^Spot Preemptible (?P<family>[A-Z0-9]+)(?: Predefined)? Instance (?P<what>Core|Ram) running in ")
_SHAPE = re.compile(r"^(?P<family>[a-z][a-z0-9]*)-(?P<kind>standard|highmem|highcpu)-(?P<n>\d+)$")
#: GiB per vCPU of the predefined shapes (the machine families pages); N1 differs from the rest.
_GIB_PER_VCPU = {"standard": 4.0, "highmem": 8.0, "highcpu": 1.0}
_N1_GIB_PER_VCPU = {"standard": 3.75, "highmem": 6.5, "highcpu": 0.9}


def _headers_and_key(api_key: str | None) -> tuple[dict[str, str], dict[str, str]]:
    key = api_key or os.environ.get("SPOTSAFE_GCP_API_KEY")
    if key:
        return {}, {"key": key}
    try:
        import google.auth
        import google.auth.transport.requests

        credentials, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-billing.readonly"])
        credentials.refresh(google.auth.transport.requests.Request())  # type: ignore[no-untyped-call]
    except Exception as e:
        raise LaunchError(
            f"{API} needs an API key (--api-key or SPOTSAFE_GCP_API_KEY) or application default credentials: {e}"
        ) from e
    headers = {"Authorization": f"Bearer {credentials.token}"}
    if project:
        headers["x-goog-user-project"] = project
    return headers, {}


def _unit_price(sku: dict[str, Any]) -> tuple[float, str]:
    info = sku["pricingInfo"][-1]
    rate = info["pricingExpression"]["tieredRates"][-1]["unitPrice"]
    return int(rate.get("units") or 0) + int(rate.get("nanos") or 0) / 1e9, str(info.get("effectiveTime", ""))[:10]


def unit_prices(
    families: set[str], region: str | None, *, api_key: str | None = None, endpoint: str | None = None
) -> dict[tuple[str, str, str], tuple[float, str]]:
    """(family, region, "Core"|"Ram") -> (USD per vCPU-hour or GiB-hour, since) for the asked families."""
    base = (endpoint or os.environ.get("SPOTSAFE_GCP_BILLING_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    headers, key = _headers_and_key(api_key)
    out: dict[tuple[str, str, str], tuple[float, str]] = {}
    token = ""
    for _ in range(MAX_PAGES):
        query = {**key, "currencyCode": "USD", "pageSize": "5000", **({"pageToken": token} if token else {})}
        page = get_json(API, f"{base}/v1/services/{COMPUTE_SERVICE}/skus?{urlencode(query)}", headers)
        for sku in page.get("skus", []):
            category = sku.get("category", {})
            m = _SKU.match(sku.get("description", ""))
            if m is None or category.get("usageType") != "Preemptible" or m["family"].lower() not in families:
                continue
            for where in sku.get("serviceRegions", []):
                if region is None or where == region:
                    out[(m["family"].lower(), where, m["what"])] = _unit_price(sku)
        token = page.get("nextPageToken") or ""
        if not token:
            return out
    raise LaunchError(f"{API}: more than {MAX_PAGES} pages of SKUs")


def spot_prices(
    machine_types: Sequence[str], region: str | None = None, *, api_key: str | None = None, endpoint: str | None = None
) -> list[Price]:
    """A Spot price per (machine type, region), cheapest first; an unknown shape is priced per vCPU and per GiB."""
    families = {t.split("-")[0] for t in machine_types}
    units = unit_prices(families, region, api_key=api_key, endpoint=endpoint)
    out: list[Price] = []
    for machine_type in machine_types:
        family = machine_type.split("-")[0]
        regions = sorted({r for f, r, _ in units if f == family})
        shape = _SHAPE.match(machine_type)
        for where in regions:
            core, ram = units.get((family, where, "Core")), units.get((family, where, "Ram"))
            if core is None or ram is None:
                continue
            since = max(core[1], ram[1])
            if shape is None:
                out.append(Price(f"{family} vCPU", where, core[0], since, "per vCPU-hour (shape unknown)"))
                out.append(Price(f"{family} GiB", where, ram[0], since, "per GiB-hour (shape unknown)"))
                continue
            vcpus = int(shape["n"])
            gib = vcpus * (_N1_GIB_PER_VCPU if family == "n1" else _GIB_PER_VCPU)[shape["kind"]]
            detail = f"{vcpus} vCPU x {core[0]:.5f} + {gib:g} GiB x {ram[0]:.5f} (no GPU)"
            out.append(Price(machine_type, where, vcpus * core[0] + gib * ram[0], since, detail))
    return sorted(out, key=lambda p: (p.price, p.region, p.machine_type))
