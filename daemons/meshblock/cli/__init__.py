"""``meshctl``: the operator's command line for a meshblock cluster.

It speaks only the MDM's public REST API (``docs/api.md``): objects are named by
name on the command line and resolved to ids through the list endpoints.
"""
