-- Webhook endpoints managed through the admin API, with their signing secrets.
--
-- Each change is also an event (`webhook_endpoint.configured` / `.removed`, without the
-- secret), written in the same transaction as the row. The secret lives only here, never in
-- the log: the log cannot forget, and a rotated or deleted secret must be gone. The gateway
-- reads this table (woken by NOTIFY warren_webhook_endpoints) and verifies deliveries with
-- it; endpoints from the gateway's own file are kept beside these.
CREATE TABLE webhook_endpoints (
    name                text PRIMARY KEY,
    -- github, standard_webhooks or hmac_sha256.
    scheme              text        NOT NULL,
    -- The agent its deliveries are addressed to.
    agent               text        NOT NULL,
    -- hmac_sha256 only: where the signature and the delivery id are.
    signature_header    text,
    delivery_header     text,
    secret              text        NOT NULL,
    -- After a rotation, the old secret still verifies until previous_expires_at, so senders
    -- can be moved to the new one without refused deliveries.
    previous_secret     text,
    previous_expires_at timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
