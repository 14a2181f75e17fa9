"""Every example in examples/ runs against an embedded data directory."""

from __future__ import annotations

import os
from pathlib import Path

from examples import email_signup, images, logs, orders, services


def test_email_on_signup(tmp_path: Path) -> None:
    outbox = email_signup.main(str(tmp_path / "data"))
    addresses = [to for to, _ in outbox]
    assert len(addresses) == 31 == len(set(addresses))  # bob once, despite a double submit
    assert "bob@example.com" in addresses  # sent after one failed attempt


def test_image_resize_and_thumbnails(tmp_path: Path) -> None:
    paths = images.main(str(tmp_path))
    assert len(paths) == 3 and all(os.path.getsize(p) > 0 for p in paths)
    assert [Path(p).stem.rsplit("-", 1)[1] for p in paths] == ["640x480", "128x96", "64x48"]


def test_order_pipeline_never_charges_twice(tmp_path: Path) -> None:
    out = orders.main(str(tmp_path / "data"))
    assert out["charges"] == {"o-1": 1999, "o-2": 1999, "o-3": 1999}
    assert out["calls"] == 4  # o-2's reply was lost once: retried, not charged again
    assert out["stock"]["widget"] == 10 - 3 * 2
    assert len(out["emails"]) == 3 and len(out["shipments"]) == 3


def test_log_processing_with_many_producers(tmp_path: Path) -> None:
    totals = logs.main(str(tmp_path / "data"), producers=8, lines=400)
    assert sum(totals.values()) == 3200
    assert totals["svc0:ERROR"] == 100


def test_two_services_with_replies(tmp_path: Path) -> None:
    results = services.main(str(tmp_path / "data"))
    assert [r["total_cents"] for r in results] == [1999 * i + 4999 for i in range(1, 6)]
