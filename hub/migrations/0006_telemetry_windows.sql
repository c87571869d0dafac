-- Telemetry aggregated at ingest per model version, node group and node window (issue 18):
-- evaluation, the windows API and the dashboard read these rows instead of every node's
-- batch, and a batch's row keeps only what deduplication and late re-evaluation need (its
-- body is emptied once folded in).
CREATE TABLE telemetry_windows (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    grp TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    window_end BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (model, version, grp, window_start)
);
CREATE INDEX telemetry_windows_start ON telemetry_windows (window_start);
CREATE INDEX telemetry_windows_updated ON telemetry_windows (updated_at);
