"""Azure Spot VM prices from the Azure Retail Prices API (public, no sign-in).

``GET {base}/api/retail/prices?$filter=...`` with the filter ``serviceName eq 'Virtual Machines'
and armSkuName eq 'SIZE' and priceType eq 'Consumption' and contains(meterName, 'Spot')`` (and
``armRegionName eq 'REGION'`` when one is asked for); pages follow ``NextPageLink``. The
Windows meters (``productName`` ending in "Windows") are left out: the boot script is Linux.
The base is ``SPOTSAFE_AZURE_PRICES_ENDPOINT`` (default ``https://prices.azure.com``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.parse import urlencode

from spotsafe.cloud.pricing import Price, get_json
from spotsafe.errors import LaunchError

API = "the Azure Retail Prices API"
DEFAULT_ENDPOINT = "https://prices.azure.com"
#: The most pages one lookup follows (a size has a few dozen Spot meters).
MAX_PAGES = 50


def price_filter(size: str, region: str | None) -> str:
    """The OData ``$filter`` of one size's Spot consumption meters."""
    parts = [
        "serviceName eq 'Virtual Machines'",
        f"armSkuName eq '{size}'",
        "priceType eq 'Consumption'",
        "contains(meterName, 'Spot')",
    ]
    if region:
        parts.insert(1, f"armRegionName eq '{region}'")
    return " and ".join(parts)


def spot_prices(sizes: Sequence[str], region: str | None = None, *, endpoint: str | None = None) -> list[Price]:
    """The Linux Spot price per (size, region), cheapest first."""
    base = (endpoint or os.environ.get("SPOTSAFE_AZURE_PRICES_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    found: dict[tuple[str, str], Price] = {}
    for size in sizes:
        if not size.replace("_", "").isalnum():
            raise LaunchError(f"--instance-types {size!r}: an Azure VM size such as Standard_NC4as_T4_v3")
        url: str | None = f"{base}/api/retail/prices?" + urlencode({"$filter": price_filter(size, region)})
        for _ in range(MAX_PAGES):
            if not url:
                break
            page = get_json(API, url)
            for item in page.get("Items", []):
                if str(item.get("productName", "")).endswith("Windows") or "Low Priority" in item.get("meterName", ""):
                    continue
                p = Price(
                    item["armSkuName"],
                    item["armRegionName"],
                    float(item["retailPrice"]),
                    str(item.get("effectiveStartDate", ""))[:10],
                    item.get("meterName", ""),
                )
                key = (p.machine_type, p.region)
                if key not in found or found[key].since < p.since:
                    found[key] = p
            url = page.get("NextPageLink")
        else:
            raise LaunchError(f"{API}: more than {MAX_PAGES} pages for {size}; give --region")
    return sorted(found.values(), key=lambda p: (p.price, p.region, p.machine_type))
