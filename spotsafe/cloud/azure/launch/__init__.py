"""``spotsafe launch/status/down --cloud azure``: a Flexible scale set of one Spot VM, through azure-mgmt-compute."""
