"""covspec.transport: the wire protocol and the link emulator."""
