-- Telemetry, feedback and alerts (issue 6). Same portable subset as 0001.

-- One row per shipped batch; (node_id, seq) makes a retried batch a no-op.
CREATE TABLE telemetry_batches (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    window_end BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    dropped_batches BIGINT NOT NULL,
    dropped_requests BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE INDEX telemetry_batches_window ON telemetry_batches (window_start);

-- Exact running totals per node and model version, updated with each stored batch.
CREATE TABLE telemetry_totals (
    node_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    rows_seen BIGINT NOT NULL,
    PRIMARY KEY (node_id, model, version)
);

-- Predictions kept for feedback, and the labels that came back.
CREATE TABLE predictions (
    model TEXT NOT NULL,
    id TEXT NOT NULL,
    version TEXT NOT NULL,
    class TEXT NOT NULL,
    node_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (model, id)
);

CREATE TABLE feedback (
    model TEXT NOT NULL,
    id TEXT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (model, id)
);

-- One row per alert (rule, model, version, group, feature): its current state.
CREATE TABLE alerts (
    key TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    grp TEXT NOT NULL,
    feature TEXT NOT NULL,
    state TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    window_start BIGINT NOT NULL,
    window_end BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Every notification sent (alert firing or resolved, retraining trigger) and its delivery.
CREATE TABLE alert_events (
    id TEXT PRIMARY KEY,
    at_us BIGINT NOT NULL,
    alert_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    delivery TEXT NOT NULL
);

INSERT INTO hub_state (key, value) VALUES ('telemetry_evaluated_until', 0);
-- Batches received after this time (ms) in windows already evaluated are re-evaluated.
INSERT INTO hub_state (key, value) VALUES ('telemetry_late_mark', 0);
