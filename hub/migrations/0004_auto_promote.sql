-- Rollouts that promote themselves on the canary's health: the policy (JSON, NULL for a
-- manual rollout) and what the version had served when the rollout started (JSON).
ALTER TABLE rollouts ADD COLUMN auto_promote TEXT;
ALTER TABLE rollouts ADD COLUMN baseline TEXT;
