"""``spotsafe launch/status/down --cloud gcp``: a zonal managed instance group of one Spot VM, through google-cloud-compute."""
