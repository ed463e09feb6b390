"""The storage data client (SDC): exports the volumes mapped to this host over NBD."""
