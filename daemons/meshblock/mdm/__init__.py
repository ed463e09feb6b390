"""MDM: the metadata manager, meshblock's control plane."""
