"""covspec.transport: the wire protocol (`protocol`), the ZeroMQ client and byte counters (`channel`),
and the user-space TCP link emulator (`link`)."""
