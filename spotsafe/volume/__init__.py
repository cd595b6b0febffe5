"""``python -m spotsafe.volume``: the command line of the EBS volume tool (:mod:`spotsafe.cloud.aws.volume`)."""
