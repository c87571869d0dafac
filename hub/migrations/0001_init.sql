-- One schema for SQLite and PostgreSQL: TEXT, BIGINT and DOUBLE PRECISION only, ids made by
-- the hub (no autoincrement), so the same migration runs on both.
CREATE TABLE models (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE versions (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    length BIGINT NOT NULL,
    manifest TEXT NOT NULL,
    provenance TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (model, version)
);

CREATE TABLE aliases (
    model TEXT NOT NULL,
    alias TEXT NOT NULL,
    version TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (model, alias)
);

CREATE TABLE metadata (
    role TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    node_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    labels TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    report TEXT NOT NULL
);

CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    previous TEXT NOT NULL,
    selector TEXT NOT NULL,
    steps TEXT NOT NULL,
    step BIGINT NOT NULL,
    percent BIGINT NOT NULL,
    state TEXT NOT NULL,
    failure_threshold DOUBLE PRECISION NOT NULL,
    step_interval_s BIGINT NOT NULL,
    reason TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE audit (
    id TEXT PRIMARY KEY,
    at_us BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    remote TEXT NOT NULL
);

CREATE TABLE hub_state (
    key TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

INSERT INTO hub_state (key, value) VALUES ('generation', 1);
