"""Operator tools that talk to the daemons directly (``replica_check``)."""
