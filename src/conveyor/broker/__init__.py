"""The engine. ``Broker`` is the one API every protocol adapter calls."""

from conveyor.broker.broker import Broker, make_receipt, parse_receipt
from conveyor.broker.clock import Clock, FakeClock, SystemClock

__all__ = ["Broker", "Clock", "FakeClock", "SystemClock", "make_receipt", "parse_receipt"]
