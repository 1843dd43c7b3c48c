-- Files attached to Slack messages, downloaded by the gateway with the bot token and
-- served by the control plane to the workspaces the message is routed to.
--
-- The log records each file as `message.file_stored` (with its SHA-256) or
-- `message.file_refused`; the bytes live here, beside the log, because an event is not the
-- place for megabytes. The gateway writes the row and its event in one transaction.
CREATE TABLE message_files (
    -- The `message.received` event the file is attached to.
    message_id uuid        NOT NULL,
    file_id    text        NOT NULL,
    -- The safe file name it is saved under in a workspace.
    name       text        NOT NULL,
    mimetype   text,
    size       bigint      NOT NULL CHECK (size >= 0),
    sha256     text        NOT NULL,
    content    bytea       NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, file_id)
);

-- Uncompressed out-of-line storage: the control plane serves a file in slices
-- (substring), and PostgreSQL reads only the slice's chunks of an EXTERNAL value instead of
-- decompressing the whole file for each.
ALTER TABLE message_files ALTER COLUMN content SET STORAGE EXTERNAL;
