-- What each node last reported of each model version, one row per (node, model, version),
-- replaced with every report (issue 18): `/metrics` counts these rows instead of reading
-- and parsing every node's report on every scrape. The rows of reports stored before this
-- table existed are filled in once at start (`node_model_states_built`).
CREATE TABLE node_model_states (
    node_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (node_id, model, version)
);
INSERT INTO hub_state (key, value) VALUES ('node_model_states_built', 0);
