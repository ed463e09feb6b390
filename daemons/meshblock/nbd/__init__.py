"""The NBD protocol (server side): fixed newstyle negotiation and simple replies.

- :mod:`meshblock.nbd.protocol`: magics, options, commands, flags and errors, and the
  wire structs, as the NBD protocol document defines them.
- :mod:`meshblock.nbd.server`: an asyncio server that serves named exports, each
  backed by a :class:`meshblock.nbd.server.Backend`.
- :mod:`meshblock.nbd.access`: who may use a listener (its TLS, its allow list).
- :mod:`meshblock.nbd.tls`: a TCP listener's TLS context (1.3; 1.2 too on request).
"""
