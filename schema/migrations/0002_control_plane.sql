-- The control plane's leader lease. One row per lease name. `fence` grows by one on every
-- change of holder, so a deposed leader's fence no longer matches; the leader checks holder,
-- fence and expiry inside each transaction that records decisions (FOR SHARE, so a takeover
-- waits for that transaction to end).
CREATE TABLE leases (
    name        text PRIMARY KEY,
    -- Who holds it: a replica id (host name and process id, or a pod name).
    holder      text        NOT NULL,
    -- Incremented on every change of holder.
    fence       bigint      NOT NULL,
    -- The holder must renew before this; after it, anyone may take the lease.
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);
