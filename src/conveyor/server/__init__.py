"""asyncio listeners: bytes <-> protocol objects <-> Broker calls."""
