"""Segments: condition trees compiled to warehouse SQL, live counts, memberships kept fresh
from events, exports to target audiences, the RFM preset and customer reports."""
