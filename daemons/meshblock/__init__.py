"""meshblock: a software-defined block storage cluster (MDM, SDS, SDC, MGMT)."""

__version__ = "0.1.0"
