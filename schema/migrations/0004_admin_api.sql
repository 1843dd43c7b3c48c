-- The admin API's reads.

-- The audit trail (`GET /audit`): the events an operator caused, through the admin API or
-- the declarative agents file. A partial index, so it costs nothing on the appends of
-- messages and decisions; `EventLog::query` repeats this exact list (see AUDIT_SOURCES).
CREATE INDEX events_audit_idx ON events (position)
    WHERE source IN ('admin-api', 'control-plane.config');

-- "As of this instant" (`/v1/as-of?at=`): the last position recorded by then. A BRIN index:
-- recorded_at grows with position, so block ranges summarise it in a few pages and appends
-- pay almost nothing for it.
CREATE INDEX events_recorded_at_brin ON events USING brin (recorded_at);
