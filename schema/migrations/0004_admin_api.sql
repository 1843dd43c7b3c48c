-- The admin API's reads.

-- The audit trail (`GET /audit`): the events an operator caused, through the admin API or
-- the declarative agents file. A partial index, so it costs nothing on the appends of
-- messages and decisions; `EventLog::query` repeats this exact list (see AUDIT_SOURCES).
CREATE INDEX events_audit_idx ON events (position)
    WHERE source IN ('admin-api', 'control-plane.config');
