-- Running totals that the read paths (/metrics, the dashboard, summaries, canary judging)
-- use instead of scanning the history, and indexes for the retention sweep (issue 18).

-- Per node: batches stored and the node's own drop counters (cumulative: the highest seen).
CREATE TABLE telemetry_node_totals (
    node_id TEXT PRIMARY KEY,
    batches BIGINT NOT NULL,
    dropped_batches BIGINT NOT NULL,
    dropped_requests BIGINT NOT NULL
);
INSERT INTO telemetry_node_totals (node_id, batches, dropped_batches, dropped_requests)
    SELECT node_id, COUNT(*), MAX(dropped_batches), MAX(dropped_requests)
    FROM telemetry_batches GROUP BY node_id;

-- Per model version: predictions with a feedback label, and how many the model got right.
CREATE TABLE accuracy_totals (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    labeled BIGINT NOT NULL,
    correct BIGINT NOT NULL,
    PRIMARY KEY (model, version)
);
INSERT INTO accuracy_totals (model, version, labeled, correct)
    SELECT p.model, p.version, COUNT(*), SUM(CASE WHEN p.class = f.label THEN 1 ELSE 0 END)
    FROM predictions p JOIN feedback f ON p.model = f.model AND p.id = f.id
    GROUP BY p.model, p.version;

CREATE INDEX telemetry_batches_received ON telemetry_batches (received_at);
CREATE INDEX predictions_at ON predictions (at);
CREATE INDEX feedback_at ON feedback (at);
CREATE INDEX alert_events_at ON alert_events (at_us);
