"""The SDS (storage data server): stores chunks on local devices and serves the data
protocol (``docs/sds.md``, ``docs/protocol.md``)."""
