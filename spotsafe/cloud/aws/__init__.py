"""AWS: the instance metadata service, the spot notice source, the launch commands and the EBS volume tool."""

from __future__ import annotations
