-- Warren's event log: one append-only table, the single source of truth.
-- See docs/event-log.md for why each piece exists; the short version is in the comments here.

-- Positions come from a sequence with CACHE 1 (the default, stated here because the gap-free
-- reader depends on it): `pg_sequence_last_value` must be the highest position handed out to
-- any session. A per-session cache would hand out values below that later.
CREATE SEQUENCE events_position_seq AS bigint CACHE 1;

CREATE TABLE events (
    -- Global position: unique and increasing in allocation order. Subscribers read in this
    -- order, but only up to the safe horizon (see event_log_watermark below), never past a
    -- position that an in-flight transaction may still commit.
    position        bigint      NOT NULL DEFAULT nextval('events_position_seq'),
    -- Deterministic id chosen by the writer (Slack team + event_id, webhook delivery id,
    -- decision + cause): appending it again is a no-op that reports the stored position.
    event_id        uuid        NOT NULL,
    -- The stream the event belongs to (a Slack conversation, a workspace, an agent) and its
    -- version inside that stream, starting at 1 with no holes. Expected-version appends
    -- (optimistic concurrency, leader fencing) compare against the highest version.
    stream          text        NOT NULL,
    stream_version  bigint      NOT NULL,
    -- Type name (`message.received`) and schema version of the payload.
    event_type      text        NOT NULL,
    event_version   smallint    NOT NULL,
    payload         jsonb       NOT NULL,
    -- W3C trace context of the request or decision that produced the event.
    traceparent     text,
    -- The conversation this event belongs to, and the event that directly caused it.
    correlation_id  uuid,
    causation_id    uuid,
    -- Who produced it: `gateway/slack`, `control-plane/decide`, ... and the acting user,
    -- agent or sender where there is one.
    source          text        NOT NULL,
    actor           text,
    -- When the outside world handed us the event, and when the log stored it.
    received_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT events_pkey PRIMARY KEY (position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream, stream_version),
    CONSTRAINT events_stream_check CHECK (length(stream) BETWEEN 1 AND 512),
    CONSTRAINT events_stream_version_check CHECK (stream_version >= 1),
    CONSTRAINT events_event_type_check CHECK (event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'),
    CONSTRAINT events_event_version_check CHECK (event_version >= 1),
    CONSTRAINT events_source_check CHECK (length(source) BETWEEN 1 AND 128)
);
ALTER SEQUENCE events_position_seq OWNED BY events.position;

COMMENT ON TABLE events IS 'Warren event log: append-only, immutable, the source of truth.';

CREATE INDEX events_type_idx ON events (event_type, position);
CREATE INDEX events_correlation_idx ON events (correlation_id, position) WHERE correlation_id IS NOT NULL;
CREATE INDEX events_causation_idx ON events (causation_id) WHERE causation_id IS NOT NULL;

-- Immutability is enforced by the database, not by convention.
CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER events_immutable
    BEFORE UPDATE OR DELETE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Gap-free reading depends on one ordering fact: a transaction has its transaction id
-- *before* it allocates any position. (PostgreSQL assigns the id lazily, at the first row
-- written, which is after the column default has called nextval.) This statement-level
-- trigger fires before the INSERT evaluates any row, so the rule holds for every writer,
-- including an operator with psql.
CREATE FUNCTION events_assign_xact_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN NULL;
END
$$;
CREATE TRIGGER events_xact_id_first
    BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_assign_xact_id();

-- The reader's watermark, three readings taken in this order:
--   allocated       the highest position handed out so far;
--   next_xid        the next transaction id to be assigned (nothing assigned yet is >= it);
--   oldest_running  the oldest transaction id still running (a snapshot's xmin).
-- Every position <= allocated was handed out by a transaction whose id is < next_xid (the
-- id comes first, see above). So once a *later* reading's oldest_running is >= this
-- reading's next_xid, all of those transactions have ended, and every position <= allocated
-- is settled: committed rows are visible, missing ones are holes for good.
--
-- Why not pg_snapshot_xmax? It is latestCompletedXid + 1, not the next id: a transaction
-- running with a higher id is neither below it nor in the snapshot's xip list. The next id
-- is read with age(), which in a transaction without an id of its own measures against
-- ReadNextTransactionId() without assigning one (so a reader writes no WAL). age() is
-- 32-bit; it is widened against the 64-bit xmax of the same statement, which is at most
-- 2^31 behind it.
CREATE FUNCTION event_log_watermark(
    OUT allocated bigint, OUT next_xid bigint, OUT oldest_running bigint
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    snap pg_snapshot;
    next32 bigint;
    xmax64 bigint;
BEGIN
    allocated := coalesce(pg_sequence_last_value('events_position_seq'), 0);
    SELECT (d.datfrozenxid::text::bigint + age(d.datfrozenxid)) % 4294967296,
           pg_snapshot_xmax(pg_current_snapshot())::text::bigint
      INTO next32, xmax64
      FROM pg_database d WHERE d.datname = current_database();
    next_xid := xmax64 + (next32 - xmax64 % 4294967296 + 4294967296) % 4294967296;
    SELECT pg_current_snapshot() INTO snap;
    oldest_running := pg_snapshot_xmin(snap)::text::bigint;
END
$$;

-- Named checkpoints of subscribers and projections: the position of the last event a
-- consumer has applied. Updated in the same transaction as the consumer's own writes.
CREATE TABLE subscription_checkpoints (
    name        text        NOT NULL,
    position    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscription_checkpoints_pkey PRIMARY KEY (name),
    CONSTRAINT subscription_checkpoints_position_check CHECK (position >= 0)
);
