-- The control plane's read models: tables derived from the event log, each row naming the
-- position of the last event that changed it. They hold nothing the log does not: 
-- `warren-control-plane rebuild` truncates them and replays the log from position 0.

-- Agents as configured (agent.configured / agent.removed).
CREATE TABLE agents (
    name              text PRIMARY KEY,
    workspace         text        NOT NULL,
    driver            text        NOT NULL,
    settings          jsonb       NOT NULL,
    idle_timeout_secs bigint      NOT NULL,
    position          bigint      NOT NULL
);

-- Which channel or webhook endpoint reaches which agent (route.configured / route.removed).
CREATE TABLE routes (
    route    text PRIMARY KEY,
    agent    text   NOT NULL,
    position bigint NOT NULL
);

-- Workspaces: what the decisions want (desired), where they are in their life (phase), what
-- the backend last reported (observed_*), and the last activity idleness counts from.
CREATE TABLE workspaces (
    name              text PRIMARY KEY,
    desired           text,
    phase             text,
    observed_phase    text,
    observed_instance text,
    observed_detail   text,
    last_activity     timestamptz,
    position          bigint NOT NULL
);

-- Every message that reached Warren (message.received), as normalised.
CREATE TABLE messages (
    message_id  uuid PRIMARY KEY,
    position    bigint      NOT NULL,
    origin      jsonb       NOT NULL,
    text        text        NOT NULL,
    received_at timestamptz NOT NULL
);

-- Deliveries of messages (and agent mentions) to agents (message.routed).
CREATE TABLE message_routes (
    decision_id uuid PRIMARY KEY,
    message_id  uuid   NOT NULL,
    agent       text   NOT NULL,
    workspace   text   NOT NULL,
    reason      text   NOT NULL,
    position    bigint NOT NULL
);
CREATE INDEX message_routes_message ON message_routes (message_id);

-- Agents' replies (agent.replied) and their delivery to Slack (reply.delivered).
CREATE TABLE replies (
    reply_id     uuid PRIMARY KEY,
    workspace    text   NOT NULL,
    agent        text   NOT NULL,
    reply_to     jsonb  NOT NULL,
    text         text   NOT NULL,
    position     bigint NOT NULL,
    delivered_ts text,
    delivered_at bigint
);
