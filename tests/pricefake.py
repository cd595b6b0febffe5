"""Local fakes of the two price APIs ``spotsafe price --cloud gcp|azure`` reads, serving pages shaped like theirs.

- :class:`BillingFake`: the Cloud Billing Catalog API's ``services.skus.list``
  (``GET /v1/services/{service}/skus``): every query parameter must be one the discovery document
  ``cloudbilling.v1`` lists for that method (or a standard one, ``key`` among them), and a call
  needs ``key`` or an ``Authorization`` header (403 ``PERMISSION_DENIED`` otherwise, as the API
  answers a call with neither). Pages of :attr:`page_size` SKUs linked by ``nextPageToken``; a SKU
  is shaped as the API's ``Sku`` (``name``, ``skuId``, ``description``, ``category``,
  ``serviceRegions``, ``pricingInfo[].pricingExpression.tieredRates[].unitPrice {currencyCode,
  units, nanos}``, ``serviceProviderName``, ``geoTaxonomy``), checked against the discovery
  document's ``Sku`` schema when added.
- :class:`RetailPricesFake`: the Azure Retail Prices API (``GET /api/retail/prices?$filter=``):
  the filter must be ``field eq 'value'`` / ``contains(field, 'value')`` terms joined by ``and``
  (400 otherwise); answers ``{BillingCurrency, CustomerEntityId, CustomerEntityType, Items,
  NextPageLink, Count}`` with :attr:`page_size` items a page, ``NextPageLink`` carrying ``$skip``
  (as the real API's links do).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from tests.apischema import discovery_document, discovery_schema
from tests.restfake import Answer, Request, RestFake, SchemaError, check

SKU_SCHEMA = discovery_schema("cloudbilling.v1", "Sku")


def gcp_sku(description: str, regions: list[str], usd: float, *, unit: str = "h", group: str = "CPU") -> dict[str, Any]:
    """A Compute Engine SKU as ``services.skus.list`` lists it."""
    sku_id = f"{abs(hash((description, tuple(regions)))) % 0xFFFF:04X}-{len(regions):04X}-{int(usd * 1e6) % 0xFFFF:04X}"
    units, nanos = int(usd), round((usd - int(usd)) * 1e9)
    return {
        "name": f"services/6F81-5844-456A/skus/{sku_id}",
        "skuId": sku_id,
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": group,
            "usageType": "Preemptible" if description.startswith("Spot") else "OnDemand",
        },
        "serviceRegions": regions,
        "pricingInfo": [
            {
                "summary": "",
                "pricingExpression": {
                    "usageUnit": unit,
                    "displayQuantity": 1,
                    "tieredRates": [
                        {
                            "startUsageAmount": 0,
                            "unitPrice": {"currencyCode": "USD", "units": str(units), "nanos": nanos},
                        }
                    ],
                    "usageUnitDescription": "hour" if unit == "h" else "gibibyte hour",
                    "baseUnit": "s" if unit == "h" else "By.s",
                    "baseUnitDescription": "second" if unit == "h" else "byte second",
                    "baseUnitConversionFactor": 3600 if unit == "h" else 3865470566400,
                },
                "currencyConversionRate": 1,
                "effectiveTime": "2026-12-01T06:43:23.617Z",
            }
        ],
        "serviceProviderName": "Google",
        "geoTaxonomy": {"type": "REGIONAL" if len(regions) == 1 else "MULTI_REGIONAL", "regions": regions},
    }


class BillingFake(RestFake):
    name = "billing"

    def __init__(self, page_size: int = 2) -> None:
        super().__init__()
        self.page_size = page_size
        self.skus: list[dict[str, Any]] = []
        doc = discovery_document("cloudbilling.v1")
        method = doc["resources"]["services"]["resources"]["skus"]["methods"]["list"]
        self.allowed = set(method["parameters"]) | set(doc["parameters"])
        self.route("GET", r"/v1/services/(?P<service>[^/]+)/skus", self._list)

    def add(self, sku: dict[str, Any]) -> None:
        check(sku, SKU_SCHEMA, "Sku")
        self.skus.append(sku)

    def _list(self, r: Request) -> Answer:
        unknown = set(r.query) - self.allowed
        if unknown:
            raise SchemaError(f"query parameters {sorted(unknown)} are not parameters of services.skus.list")
        if not r.query.get("key") and not r.headers.get("Authorization"):
            body = {
                "error": {
                    "code": 403,
                    "message": "The request is missing a valid API key.",
                    "status": "PERMISSION_DENIED",
                }
            }
            return 403, body, {}
        skus = [s for s in self.skus if s["name"].startswith(f"services/{r.match['service']}/")]
        start = int(r.query.get("pageToken") or 0)
        page = skus[start : start + self.page_size]
        body: dict[str, Any] = {"skus": page, "nextPageToken": ""}
        if start + self.page_size < len(skus):
            body["nextPageToken"] = str(start + self.page_size)
        return 200, body, {}


_TERM = re.compile(r"(?:(?P<field>\w+) eq '(?P<value>[^']*)'|contains\((?P<cfield>\w+), '(?P<cvalue>[^']*)'\))")


class RetailPricesFake(RestFake):
    name = "retail-prices"

    def __init__(self, page_size: int = 2) -> None:
        super().__init__()
        self.page_size = page_size
        self.items: list[dict[str, Any]] = []
        self.route("GET", r"/api/retail/prices", self._list)

    def add(self, size: str, region: str, usd: float, *, meter: str = "Spot", product: str = "Linux") -> None:
        """One meter as the API lists it (``meter``: Spot, Low Priority or "" for pay-as-you-go)."""
        short = size.removeprefix("Standard_").replace("_", " ")
        meter_name = f"{short} {meter}".strip()
        series = "NCasT4_v3 Series" + ("" if product == "Linux" else " Windows")
        self.items.append(
            {
                "currencyCode": "USD",
                "tierMinimumUnits": 0.0,
                "retailPrice": usd,
                "unitPrice": usd,
                "armRegionName": region,
                "location": region.upper(),
                "effectiveStartDate": "2026-11-01T00:00:00Z",
                "meterId": f"{len(self.items):08d}-0000-0000-0000-000000000000",
                "meterName": meter_name,
                "productId": "DZH318Z0BQ4L",
                "skuId": f"DZH318Z0BQ4L/{len(self.items):04d}",
                "productName": f"Virtual Machines {series}",
                "skuName": meter_name,
                "serviceName": "Virtual Machines",
                "serviceId": "DZH313Z7MMC8",
                "serviceFamily": "Compute",
                "unitOfMeasure": "1 Hour",
                "type": "Consumption",
                "isPrimaryMeterRegion": True,
                "armSkuName": size,
            }
        )

    def _matches(self, item: dict[str, Any], flt: str) -> bool:
        terms = flt.split(" and ")
        for term in terms:
            m = _TERM.fullmatch(term.strip())
            if m is None:
                raise SchemaError(f"$filter term {term!r}: not field eq 'value' nor contains(field, 'value')")
            if m["field"]:
                field = "type" if m["field"] == "priceType" else m["field"]
                if str(item.get(field)) != m["value"]:
                    return False
            elif m["cvalue"] not in str(item.get(m["cfield"], "")):
                return False
        return True

    def _list(self, r: Request) -> Answer:
        flt = r.query.get("$filter", "")
        items = [i for i in self.items if self._matches(i, flt)] if flt else list(self.items)
        skip = int(r.query.get("$skip") or 0)
        page = items[skip : skip + self.page_size]
        nxt = None
        if skip + self.page_size < len(items):
            nxt = f"{self.endpoint}/api/retail/prices?" + urlencode({"$filter": flt, "$skip": skip + self.page_size})
        body = {
            "BillingCurrency": "USD",
            "CustomerEntityId": "Default",
            "CustomerEntityType": "Retail",
            "Items": page,
            "NextPageLink": nxt,
            "Count": len(page),
        }
        return 200, body, {}
