//! Storage: one `sqlx` Any pool over SQLite (embedded default, WAL) or PostgreSQL, the same
//! migrations and queries for both. The [`Store`] holds every SQL statement of the hub and
//! maps its rows to the hub's types; it is the one place that knows which database it is
//! talking to. The registry, tokens, nodes, rollouts and the audit log are here; telemetry
//! ingestion and retention in `telemetry`, what monitoring reads and the alerts it writes in
//! `monitoring`.

use std::collections::BTreeMap;

use capsule_format::clock::SharedClock;
pub use capsule_format::hub::Rollout;
use capsule_format::hub::{ModelState, Report, Role, RolloutState, TokenInfo};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use crate::{Error, Result};

mod monitoring;
mod telemetry;

/// The error a query returns ([`Error::Database`]).
pub(crate) use sqlx::Error as QueryError;
/// The error failed migrations return ([`Error::Migrate`]).
pub(crate) use sqlx::migrate::MigrateError;

/// A fresh random id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The database: every query of the hub.
#[derive(Debug, Clone)]
pub struct Store {
    /// Writes, and reads inside a write's transaction.
    pool: AnyPool,
    /// Reads: connections of their own, read-only.
    reads: AnyPool,
    sqlite: bool,
    clock: SharedClock,
}

pub use capsule_format::hub::{SplitBlobs, VersionInfo};

/// Whom a token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// What it may do.
    pub role: Role,
    /// Its name (`node:ID` for node tokens), the actor in the audit log.
    pub name: String,
    /// The node it belongs to (empty for admin tokens).
    pub node: String,
}

/// A node as the hub knows it.
pub type NodeRow = capsule_format::hub::NodeInfo;

pub use capsule_format::hub::AuditEntry;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

fn version_row(r: &AnyRow) -> Result<VersionInfo> {
    Ok(VersionInfo {
        model: r.try_get("model")?,
        version: r.try_get("version")?,
        sha256: r.try_get("sha256")?,
        length: r.try_get("length")?,
        // A summary an older hub wrote in another shape reads as empty, not as an error
        // that would hide the version.
        manifest: serde_json::from_str(&r.try_get::<String, _>("manifest")?).unwrap_or_default(),
        provenance: json(&r.try_get::<String, _>("provenance")?),
        metrics: json(&r.try_get::<String, _>("metrics")?),
        created_at: r.try_get("created_at")?,
        created_by: r.try_get("created_by")?,
        split: match (
            r.try_get::<Option<String>, _>("image_sha256")?,
            r.try_get::<Option<i64>, _>("image_length")?,
            r.try_get::<Option<String>, _>("code_sha256")?,
            r.try_get::<Option<i64>, _>("code_length")?,
        ) {
            (Some(image_sha256), Some(image_length), Some(code_sha256), Some(code_length)) => {
                Some(SplitBlobs {
                    image_sha256,
                    image_length,
                    code_sha256,
                    code_length,
                })
            }
            _ => None,
        },
    })
}

/// A column holding one of an enum's names.
fn named<T: std::str::FromStr<Err = capsule_format::hub::UnknownName>>(
    r: &AnyRow,
    column: &'static str,
) -> Result<T> {
    r.try_get::<String, _>(column)?
        .parse()
        .map_err(|source| Error::Stored { column, source })
}

/// Replaces a node's rows of `node_model_states` with what `report` says (in `tx`).
async fn replace_model_states(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    node: &str,
    report: &Report,
) -> Result<()> {
    sqlx::query("DELETE FROM node_model_states WHERE node_id = $1")
        .bind(node)
        .execute(&mut **tx)
        .await?;
    // A report names each model version once; a repeated one keeps its last state.
    let mut states = BTreeMap::new();
    for m in &report.models {
        states.insert((m.model.as_str(), m.version.as_str()), m.state);
    }
    for ((model, version), state) in states {
        sqlx::query(
            "INSERT INTO node_model_states (node_id, model, version, state) VALUES ($1, $2, $3, $4)",
        )
        .bind(node)
        .bind(model)
        .bind(version)
        .bind(state.as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn node_row(r: &AnyRow) -> Result<NodeRow> {
    Ok(NodeRow {
        id: r.try_get("id")?,
        labels: serde_json::from_str(&r.try_get::<String, _>("labels")?).unwrap_or_default(),
        registered_at: r.try_get("registered_at")?,
        last_seen: r.try_get("last_seen")?,
        report: serde_json::from_str(&r.try_get::<String, _>("report")?).ok(),
    })
}

fn token_info(r: &AnyRow) -> Result<TokenInfo> {
    let hash: String = r.try_get("hash")?;
    Ok(TokenInfo {
        kind: named(r, "kind")?,
        name: r.try_get("name")?,
        node_id: r.try_get("node_id")?,
        created_at: r.try_get("created_at")?,
        hash_prefix: hash.chars().take(8).collect(),
    })
}

fn rollout_row(r: &AnyRow) -> Result<Rollout> {
    Ok(Rollout {
        id: r.try_get("id")?,
        model: r.try_get("model")?,
        version: r.try_get("version")?,
        previous: r.try_get("previous")?,
        selector: serde_json::from_str(&r.try_get::<String, _>("selector")?).unwrap_or_default(),
        steps: serde_json::from_str(&r.try_get::<String, _>("steps")?).unwrap_or_default(),
        step: r.try_get("step")?,
        percent: r.try_get("percent")?,
        state: named(r, "state")?,
        failure_threshold: r.try_get("failure_threshold")?,
        step_interval_s: r.try_get("step_interval_s")?,
        reason: r.try_get("reason")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        auto_promote: r
            .try_get::<Option<String>, _>("auto_promote")?
            .and_then(|t| serde_json::from_str(&t).ok()),
        baseline: r
            .try_get::<Option<String>, _>("baseline")?
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
    })
}

const ROLLOUT_COLUMNS: &str = "id, model, version, previous, selector, steps, step, percent, state, failure_threshold, step_interval_s, reason, created_at, updated_at, auto_promote, baseline";

impl Store {
    /// Connects (creating a SQLite file when missing) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|source| Error::Connect {
                url: redact(&url),
                source,
            })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        // Reads take connections of their own. SQLite has one writer: a connection waiting
        // for the write lock (up to its busy timeout) is held from the pool meanwhile, so
        // under a burst of telemetry every connection of one shared pool waited on writes,
        // and reads (the dashboard, `/metrics`, admin calls) queued behind them; WAL lets
        // readers see the last commit while a write runs. On PostgreSQL the writes' pool is
        // as busy under load (each batch's transaction holds a connection), so reads get a
        // pool there too.
        let reads = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA query_only = ON").await?;
                    } else {
                        conn.execute("SET default_transaction_read_only = on")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|source| Error::Connect {
                url: redact(&url),
                source,
            })?;
        Ok(Store {
            pool,
            reads,
            sqlite,
            clock: capsule_format::clock::system(),
        })
    }

    /// The same database, its rows stamped by `clock`.
    pub fn with_clock(self, clock: SharedClock) -> Store {
        Store { clock, ..self }
    }

    /// The clock rows are stamped with.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Seconds since the Unix epoch, by the database's clock.
    pub fn now(&self) -> i64 {
        self.clock.now_s()
    }

    /// The database's size in bytes (SQLite: its pages, the write-ahead log not included;
    /// PostgreSQL: `pg_database_size`).
    pub async fn size_bytes(&self) -> Result<i64> {
        let sql = if self.sqlite {
            "SELECT CAST(page_count * page_size AS BIGINT) AS n FROM pragma_page_count(), pragma_page_size()"
        } else {
            "SELECT CAST(pg_database_size(current_database()) AS BIGINT) AS n"
        };
        Ok(sqlx::query(sql)
            .fetch_one(&self.reads)
            .await?
            .try_get("n")?)
    }

    /// A counter of `hub_state`.
    pub async fn state(&self, key: &str) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM hub_state WHERE key = $1")
            .bind(key)
            .fetch_one(&self.reads)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// Moves a `hub_state` counter from `from` to `to`, only if it is still `from` (several
    /// hubs may race); false otherwise.
    pub async fn claim_state(&self, key: &str, from: i64, to: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE hub_state SET value = $1 WHERE key = $2 AND value = $3")
            .bind(to)
            .bind(key)
            .bind(from)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The state generation (bumped by every change nodes must see).
    pub async fn generation(&self) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM hub_state WHERE key = 'generation'")
            .fetch_one(&self.reads)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// Bumps the generation.
    pub async fn bump(&self) -> Result<i64> {
        sqlx::query("UPDATE hub_state SET value = value + 1 WHERE key = 'generation'")
            .execute(&self.pool)
            .await?;
        self.generation().await
    }

    /// Moves the generation to `floor` or one past where it is, whichever is higher. The hub
    /// calls it at start-up with the wall clock in milliseconds, so a database restored from
    /// a backup never hands out again a generation its nodes already saw (a node that was told
    /// generation G takes a later state also numbered G for the one it has, and keeps it).
    pub async fn advance_generation(&self, floor: i64) -> Result<i64> {
        sqlx::query(
            "UPDATE hub_state SET value = CASE WHEN value + 1 > $1 THEN value + 1 ELSE $1 END \
             WHERE key = 'generation'",
        )
        .bind(floor)
        .execute(&self.pool)
        .await?;
        self.generation().await
    }

    /// Records an admin action.
    pub async fn audit(&self, actor: &str, action: &str, detail: &str, remote: &str) -> Result<()> {
        sqlx::query("INSERT INTO audit (id, at_us, actor, action, detail, remote) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(new_id())
            .bind(self.clock.now_us())
            .bind(actor)
            .bind(action)
            .bind(detail)
            .bind(remote)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The audit log, oldest first.
    pub async fn audit_log(&self) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT at_us, actor, action, detail, remote FROM audit ORDER BY at_us, id",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at_us: r.try_get("at_us")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    detail: r.try_get("detail")?,
                    remote: r.try_get("remote")?,
                })
            })
            .collect()
    }

    /// Deletes every token of a node (they stop working at once: every request looks its
    /// token up). Returns how many there were.
    pub async fn revoke_node_tokens(&self, node_id: &str) -> Result<u64> {
        let done = sqlx::query("DELETE FROM tokens WHERE kind = 'node' AND node_id = $1")
            .bind(node_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Stores a token's hash.
    pub async fn add_token(&self, hash: &str, role: Role, name: &str, node_id: &str) -> Result<()> {
        sqlx::query("INSERT INTO tokens (hash, kind, name, node_id, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (hash) DO NOTHING")
            .bind(hash)
            .bind(role.as_str())
            .bind(name)
            .bind(node_id)
            .bind(self.now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every token, oldest first (hashes cut to their first 8 hex digits).
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(
            "SELECT kind, name, node_id, created_at, hash FROM tokens ORDER BY created_at, hash",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(token_info).collect()
    }

    /// Revokes the one token whose hash starts with `prefix` (at least 8 lowercase hex
    /// digits, as the token list shows them): 404 when none does, 409 when several do (give
    /// more digits) or when it is the last admin token (a hub without one generates a new one
    /// at its next start, so even a race of two hubs does not lock the fleet out for good).
    pub async fn revoke_token(&self, prefix: &str) -> Result<TokenInfo> {
        if !(8..=64).contains(&prefix.len())
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::BadRequest(
                "a token is named by 8 to 64 lowercase hex digits of its hash".into(),
            ));
        }
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT kind, name, node_id, created_at, hash FROM tokens WHERE hash LIKE $1 LIMIT 2",
        )
        .bind(format!("{prefix}%"))
        .fetch_all(&mut *tx)
        .await?;
        let (info, hash) = match rows.as_slice() {
            [] => return Err(Error::NotFound(format!("no token {prefix}"))),
            [one] => (token_info(one)?, one.try_get::<String, _>("hash")?),
            _ => {
                return Err(Error::Conflict(format!(
                    "several tokens start with {prefix}: give more digits of the hash"
                )));
            }
        };
        if info.kind == Role::Admin {
            let admins: i64 = sqlx::query("SELECT COUNT(*) AS n FROM tokens WHERE kind = 'admin'")
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
            if admins <= 1 {
                return Err(Error::Conflict(
                    "this is the last admin token: issue another one first".into(),
                ));
            }
        }
        sqlx::query("DELETE FROM tokens WHERE hash = $1")
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(info)
    }

    /// The token with this hash.
    pub async fn token(&self, hash: &str) -> Result<Option<Token>> {
        let row = sqlx::query("SELECT kind, name, node_id FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.reads)
            .await?;
        row.map(|r| {
            Ok(Token {
                role: named(&r, "kind")?,
                name: r.try_get("name")?,
                node: r.try_get("node_id")?,
            })
        })
        .transpose()
    }

    /// Whether any admin token exists.
    pub async fn has_admin(&self) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM tokens WHERE kind = 'admin'")
            .fetch_one(&self.reads)
            .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Registers a model version (and its model).
    pub async fn add_version(&self, v: &VersionInfo) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO models (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&v.model)
        .bind(self.now())
        .execute(&mut *tx)
        .await?;
        let split = v.split.as_ref();
        let done = sqlx::query("INSERT INTO versions (model, version, sha256, length, manifest, provenance, metrics, created_at, created_by, image_sha256, image_length, code_sha256, code_length) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
            .bind(&v.model)
            .bind(&v.version)
            .bind(&v.sha256)
            .bind(v.length)
            .bind(serde_json::to_string(&v.manifest)?)
            .bind(v.provenance.to_string())
            .bind(v.metrics.to_string())
            .bind(v.created_at)
            .bind(&v.created_by)
            .bind(split.map(|s| s.image_sha256.clone()))
            .bind(split.map(|s| s.image_length))
            .bind(split.map(|s| s.code_sha256.clone()))
            .bind(split.map(|s| s.code_length))
            .execute(&mut *tx)
            .await;
        if let Err(e) = done {
            let message = e.to_string().to_lowercase();
            if message.contains("unique") || message.contains("duplicate") {
                return Err(Error::Conflict(format!(
                    "{} {} is already registered (versions are immutable)",
                    v.model, v.version
                )));
            }
            return Err(e.into());
        }
        tx.commit().await?;
        Ok(())
    }

    /// Model names.
    pub async fn models(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM models ORDER BY name")
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("name")?)).collect()
    }

    /// Every registered (model, version): the only names the hub's metrics label series with.
    pub async fn registered_versions(&self) -> Result<std::collections::HashSet<(String, String)>> {
        let rows = sqlx::query("SELECT model, version FROM versions")
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("model")?, r.try_get("version")?)))
            .collect()
    }

    /// A model's versions, oldest first.
    pub async fn versions(&self, model: &str) -> Result<Vec<VersionInfo>> {
        let rows =
            sqlx::query("SELECT * FROM versions WHERE model = $1 ORDER BY created_at, version")
                .bind(model)
                .fetch_all(&self.reads)
                .await?;
        rows.iter().map(version_row).collect()
    }

    /// One version.
    pub async fn version(&self, model: &str, version: &str) -> Result<Option<VersionInfo>> {
        let row = sqlx::query("SELECT * FROM versions WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version)
            .fetch_optional(&self.reads)
            .await?;
        row.as_ref().map(version_row).transpose()
    }

    /// A model's aliases.
    pub async fn aliases(&self, model: &str) -> Result<BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT alias, version FROM aliases WHERE model = $1")
            .bind(model)
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("alias")?, r.try_get("version")?)))
            .collect()
    }

    /// Points an alias at a version.
    pub async fn set_alias(&self, model: &str, alias: &str, version: &str) -> Result<()> {
        sqlx::query("INSERT INTO aliases (model, alias, version, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at")
            .bind(model)
            .bind(alias)
            .bind(version)
            .bind(self.now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores signed metadata of a role.
    pub async fn set_metadata(&self, role: &str, version: i64, body: &str) -> Result<()> {
        sqlx::query("INSERT INTO metadata (role, version, body, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (role) DO UPDATE SET version = excluded.version, body = excluded.body, updated_at = excluded.updated_at")
            .bind(role)
            .bind(version)
            .bind(body)
            .bind(self.now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Signed metadata of a role: (version, JSON text).
    pub async fn metadata(&self, role: &str) -> Result<Option<(i64, String)>> {
        let row = sqlx::query("SELECT version, body FROM metadata WHERE role = $1")
            .bind(role)
            .fetch_optional(&self.reads)
            .await?;
        row.map(|r| Ok((r.try_get("version")?, r.try_get("body")?)))
            .transpose()
    }

    /// Registers (or re-registers) a node. Returns whether anything nodes must see changed:
    /// a new node, or new labels (labels decide rollout groups). A re-registration with the
    /// same labels only marks the node as seen.
    pub async fn register_node(&self, id: &str, labels: &BTreeMap<String, String>) -> Result<bool> {
        let labels = serde_json::to_string(labels)?;
        let known: Option<String> = sqlx::query("SELECT labels FROM nodes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reads)
            .await?
            .map(|r| r.try_get("labels"))
            .transpose()?;
        if known.as_deref() == Some(labels.as_str()) {
            self.touch(id).await?;
            return Ok(false);
        }
        sqlx::query("INSERT INTO nodes (id, labels, registered_at, last_seen, report) VALUES ($1, $2, $3, $3, '') ON CONFLICT (id) DO UPDATE SET labels = excluded.labels, last_seen = excluded.last_seen")
            .bind(id)
            .bind(labels)
            .bind(self.now())
            .execute(&self.pool)
            .await?;
        Ok(true)
    }

    /// Stores a node's report.
    pub async fn set_report(&self, id: &str, report: &Report) -> Result<()> {
        let text = serde_json::to_string(report)?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE nodes SET report = $1, last_seen = $2 WHERE id = $3")
            .bind(text)
            .bind(self.now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        replace_model_states(&mut tx, id, report).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Fills `node_model_states` from the reports stored before it existed (once; several
    /// hubs starting together may each do it: it replaces rows, so the result is the same).
    pub async fn build_model_states(&self) -> Result<usize> {
        if self.state("node_model_states_built").await? != 0 {
            return Ok(0);
        }
        let nodes = self.nodes().await?;
        for n in &nodes {
            if let Some(report) = &n.report {
                let mut tx = self.pool.begin().await?;
                replace_model_states(&mut tx, &n.id, report).await?;
                tx.commit().await?;
            }
        }
        self.claim_state("node_model_states_built", 0, 1).await?;
        Ok(nodes.len())
    }

    /// How many nodes report each (model, version, state), from the maintained rows.
    pub async fn model_state_counts(&self) -> Result<Vec<(String, String, ModelState, i64)>> {
        let rows = sqlx::query(
            "SELECT model, version, state, COUNT(*) AS n FROM node_model_states GROUP BY model, version, state",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("model")?,
                    r.try_get("version")?,
                    named(r, "state")?,
                    r.try_get("n")?,
                ))
            })
            .collect()
    }

    /// Registered nodes, and how many of them called at or after `since` (Unix seconds).
    pub async fn node_counts(&self, since: i64) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, CAST(COALESCE(SUM(CASE WHEN last_seen >= $1 THEN 1 ELSE 0 END), 0) AS BIGINT) AS online FROM nodes",
        )
        .bind(since)
        .fetch_one(&self.reads)
        .await?;
        Ok((row.try_get("total")?, row.try_get("online")?))
    }

    /// Marks a node as seen.
    pub async fn touch(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE nodes SET last_seen = $1 WHERE id = $2")
            .bind(self.now())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every node.
    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = sqlx::query(
            "SELECT id, labels, registered_at, last_seen, report FROM nodes ORDER BY id",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(node_row).collect()
    }

    /// One node.
    pub async fn node(&self, id: &str) -> Result<Option<NodeRow>> {
        let row = sqlx::query(
            "SELECT id, labels, registered_at, last_seen, report FROM nodes WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(node_row).transpose()
    }

    /// Creates a rollout.
    pub async fn add_rollout(&self, r: &Rollout) -> Result<()> {
        sqlx::query(&format!("INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"))
            .bind(&r.id)
            .bind(&r.model)
            .bind(&r.version)
            .bind(&r.previous)
            .bind(serde_json::to_string(&r.selector)?)
            .bind(serde_json::to_string(&r.steps)?)
            .bind(r.step)
            .bind(r.percent)
            .bind(r.state.as_str())
            .bind(r.failure_threshold)
            .bind(r.step_interval_s)
            .bind(&r.reason)
            .bind(r.created_at)
            .bind(r.updated_at)
            .bind(
                r.auto_promote
                    .map(|p| serde_json::to_string(&p))
                    .transpose()
                    ?,
            )
            .bind(serde_json::to_string(&r.baseline)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores what an event did to a rollout (see [`crate::rollout::apply`]) in one
    /// transaction: the rollout, the production alias when it moves, and the audit entry by
    /// `actor`. Only if the rollout is still where `before` found it (same state and step):
    /// several hubs sharing a database, or two admins, may race to change it, and only the
    /// first one does. Returns whether this one did.
    pub async fn save_rollout(
        &self,
        before: &Rollout,
        change: &crate::rollout::Change,
        actor: &str,
        remote: &str,
        detail: &str,
    ) -> Result<bool> {
        let r = &change.rollout;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE rollouts SET step = $1, percent = $2, state = $3, reason = $4, updated_at = $5 WHERE id = $6 AND state = $7 AND step = $8")
            .bind(r.step)
            .bind(r.percent)
            .bind(r.state.as_str())
            .bind(&r.reason)
            .bind(r.updated_at)
            .bind(&r.id)
            .bind(before.state.as_str())
            .bind(before.step)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        if let Some(version) = &change.production {
            sqlx::query("INSERT INTO aliases (model, alias, version, updated_at) VALUES ($1, 'production', $2, $3) ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at")
                .bind(&r.model)
                .bind(version)
                .bind(r.updated_at)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO audit (id, at_us, actor, action, detail, remote) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(new_id())
            .bind(self.clock.now_us())
            .bind(actor)
            .bind(change.action)
            .bind(detail)
            .bind(remote)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// How many rollouts are in each state.
    pub async fn rollout_counts(&self) -> Result<BTreeMap<RolloutState, i64>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM rollouts GROUP BY state")
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|r| Ok((named(r, "state")?, r.try_get("n")?)))
            .collect()
    }

    /// The active rollouts (at most one per model), newest first.
    pub async fn active_rollouts(&self) -> Result<Vec<Rollout>> {
        let rows = sqlx::query(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state = 'active' ORDER BY created_at DESC, id"
        ))
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(rollout_row).collect()
    }

    /// Every rollout, newest first.
    pub async fn rollouts(&self) -> Result<Vec<Rollout>> {
        let rows = sqlx::query(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_at DESC, id"
        ))
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(rollout_row).collect()
    }

    /// What kind of blob a hash names, for the download counters: a code module or a model
    /// image of some version, else a single-file capsule.
    pub async fn blob_kind(&self, sha256: &str) -> Result<capsule_format::hub::BlobKind> {
        let row = sqlx::query(
            "SELECT CASE WHEN code_sha256 = $1 THEN 'code' ELSE 'image' END AS kind FROM versions WHERE code_sha256 = $1 OR image_sha256 = $1 LIMIT 1",
        )
        .bind(sha256)
        .fetch_optional(&self.reads)
        .await?;
        Ok(
            match row
                .map(|r| r.try_get::<String, _>("kind"))
                .transpose()?
                .as_deref()
            {
                Some("code") => capsule_format::hub::BlobKind::Code,
                Some(_) => capsule_format::hub::BlobKind::Image,
                None => capsule_format::hub::BlobKind::Capsule,
            },
        )
    }

    /// The version whose single-file capsule has this hash and that has a split form (the
    /// hub stores the split form and joins the single file on demand).
    pub async fn version_by_capsule(&self, sha256: &str) -> Result<Option<VersionInfo>> {
        let row = sqlx::query(
            "SELECT * FROM versions WHERE sha256 = $1 AND image_sha256 IS NOT NULL LIMIT 1",
        )
        .bind(sha256)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(version_row).transpose()
    }

    /// One rollout.
    pub async fn rollout(&self, id: &str) -> Result<Option<Rollout>> {
        let row = sqlx::query(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(rollout_row).transpose()
    }

    /// Every model's `production` version (models without one are left out).
    pub async fn production_versions(&self) -> Result<BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT model, version FROM aliases WHERE alias = 'production'")
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("model")?, r.try_get("version")?)))
            .collect()
    }

    /// Marks nodes as seen at the given times (seconds), in one transaction.
    pub async fn touch_all(&self, seen: &[(String, i64)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (id, at) in seen {
            sqlx::query("UPDATE nodes SET last_seen = $1 WHERE id = $2 AND last_seen < $1")
                .bind(at)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// A count or time as the database stores it (saturating).
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored count (a negative one, which the hub never writes, reads as 0).
fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use capsule_format::hub::{ModelState, Report, ReportedModel};

    use super::Store;
    use crate::{Error, Result};

    fn report(models: &[(&str, ModelState)]) -> Report {
        Report {
            generation: 1,
            models: models
                .iter()
                .map(|(m, state)| ReportedModel {
                    model: (*m).into(),
                    version: "1".into(),
                    state: *state,
                    detail: String::new(),
                })
                .collect(),
        }
    }

    /// `/metrics` counts the maintained rows: a report replaces its node's rows, and the
    /// rows of reports stored before the table existed are built once at start.
    #[tokio::test]
    async fn node_model_states_follow_the_reports() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("temp dir"))?;
        let db =
            Store::connect(&format!("sqlite://{}", dir.path().join("hub.db").display())).await?;
        for n in ["a", "b"] {
            db.register_node(n, &Default::default()).await?;
        }
        db.set_report(
            "a",
            &report(&[("m", ModelState::Serving), ("k", ModelState::LoadFailed)]),
        )
        .await?;
        db.set_report("b", &report(&[("m", ModelState::Serving)]))
            .await?;
        db.set_report("a", &report(&[("m", ModelState::Serving)]))
            .await?;
        let counts = db.model_state_counts().await?;
        assert_eq!(counts, [("m".into(), "1".into(), ModelState::Serving, 2)]);
        // A report an earlier release stored, without rows: built at start, once.
        sqlx::query("DELETE FROM node_model_states")
            .execute(&db.pool)
            .await?;
        sqlx::query("UPDATE hub_state SET value = 0 WHERE key = 'node_model_states_built'")
            .execute(&db.pool)
            .await?;
        assert_eq!(db.build_model_states().await?, 2);
        assert_eq!(db.build_model_states().await?, 0);
        assert_eq!(db.model_state_counts().await?, counts);
        Ok(())
    }
}
