"""Sans-I/O protocol codecs: bytes and JSON in, typed objects out; no sockets, no asyncio."""
