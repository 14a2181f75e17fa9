"""The ``conveyor`` command (click + rich)."""
