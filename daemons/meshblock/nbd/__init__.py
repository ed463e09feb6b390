"""The NBD protocol (server side): fixed newstyle negotiation and simple replies.

- :mod:`meshblock.nbd.protocol`: magics, options, commands, flags and errors, and the
  wire structs, as the NBD protocol document defines them.
- :mod:`meshblock.nbd.server`: an asyncio server that serves named exports, each
  backed by a :class:`meshblock.nbd.server.Backend`.
"""
