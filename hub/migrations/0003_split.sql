-- The split form of a capsule (issue 15): a version registered from now on records its model
-- image and the guest code module it needs, both content-addressed blobs. NULL for versions
-- registered before (the node then downloads the single file).
ALTER TABLE versions ADD COLUMN image_sha256 TEXT;
ALTER TABLE versions ADD COLUMN image_length BIGINT;
ALTER TABLE versions ADD COLUMN code_sha256 TEXT;
ALTER TABLE versions ADD COLUMN code_length BIGINT;
