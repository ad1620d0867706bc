"""Members written on a bulk path reach the event stream as snapshots."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from omniloyal.db.engine import Database
from omniloyal.events.models import OutboxEvent
from omniloyal.kernel.clock import utcnow
from omniloyal.members.models import Member, MemberConsent
from omniloyal.members.service import publish_snapshots


def test_every_member_is_published_once_as_a_snapshot(db: Database) -> None:
    with db.transaction() as session:
        for i in range(5):
            member = Member(first_name=f"M{i}", city="Казань")
            session.add(member)
            session.flush()
            if i == 0:
                session.add(
                    MemberConsent(
                        member_id=member.id, channel="sms", granted=True, changed_at=utcnow(), source="pos"
                    )
                )
    assert publish_snapshots(db) == 5
    with db.reading() as session:
        events = session.scalars(select(OutboxEvent).where(OutboxEvent.type == "member.updated")).all()
        assert len(events) == 5
        first = min(events, key=lambda e: e.member_id or 0).payload["properties"]
        assert first["snapshot"] is True and first["changed"] == []
        assert first["member"]["city"] == "Казань"
        assert first["member"]["consents"]["sms"]["granted"] is True
    # Only members changed since a moment: none changed after now.
    assert publish_snapshots(db, changed_since=utcnow() + timedelta(seconds=1)) == 0
