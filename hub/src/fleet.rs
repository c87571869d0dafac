//! What every node's desired state is computed from, read from the database once per state
//! generation instead of once per node: a long-poll that wakes a thousand nodes costs the
//! queries of one. Nodes' `last_seen` is kept in memory and written in one transaction per
//! tick for the same reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use capsule_format::hub::{DesiredModel, Rollout};

use crate::Result;
use crate::store::Store;

/// A model version a node may be told to run.
#[derive(Debug, Clone, PartialEq)]
struct Offered {
    sha256: String,
    length: u64,
    split: bool,
}

/// The hub's state as of one generation, as far as desired states depend on it.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// The generation it was read at.
    pub(crate) generation: i64,
    /// The signed targets metadata.
    pub(crate) targets: Option<String>,
    /// Registered nodes' labels.
    nodes: HashMap<String, BTreeMap<String, String>>,
    /// Every model, with its production version.
    models: Vec<(String, Option<String>)>,
    /// Active rollouts.
    rollouts: Vec<Rollout>,
    /// The versions production or a rollout points at.
    versions: HashMap<(String, String), Offered>,
}

impl Snapshot {
    /// Reads it.
    pub(crate) async fn read(db: &Store, generation: i64) -> Result<Snapshot> {
        let production = db.production_versions().await?;
        let models: Vec<(String, Option<String>)> = db
            .models()
            .await?
            .into_iter()
            .map(|m| {
                let p = production.get(&m).cloned();
                (m, p)
            })
            .collect();
        let rollouts = db.active_rollouts().await?;
        let mut versions = HashMap::new();
        let wanted = models
            .iter()
            .filter_map(|(m, p)| Some((m.clone(), p.clone()?)))
            .chain(
                rollouts
                    .iter()
                    .map(|r| (r.model.clone(), r.version.clone())),
            );
        for (model, version) in wanted {
            if let Some(v) = db.version(&model, &version).await? {
                versions.insert(
                    (model, version),
                    Offered {
                        sha256: v.sha256,
                        length: u64::try_from(v.length).unwrap_or(0),
                        split: v.split.is_some(),
                    },
                );
            }
        }
        Ok(Snapshot {
            generation,
            targets: db.metadata("targets").await?.map(|(_, body)| body),
            nodes: db
                .nodes()
                .await?
                .into_iter()
                .map(|n| (n.id, n.labels))
                .collect(),
            models,
            rollouts,
            versions,
        })
    }

    /// A registered node's labels.
    pub(crate) fn labels(&self, node: &str) -> Option<&BTreeMap<String, String>> {
        self.nodes.get(node)
    }

    /// What a node with these labels should run: each model's production version, replaced
    /// by the version of an active rollout that assigns it to the node.
    pub(crate) fn desired(
        &self,
        node: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<DesiredModel> {
        let mut out = Vec::new();
        for (model, production) in &self.models {
            let version = self
                .rollouts
                .iter()
                .find(|r| &r.model == model && crate::rollout::assigned(r, node, labels))
                .map(|r| &r.version)
                .or(production.as_ref());
            let Some(version) = version else { continue };
            let Some(v) = self.versions.get(&(model.clone(), version.clone())) else {
                continue;
            };
            out.push(DesiredModel {
                path: capsule_format::tuf::target_path(model, version),
                image_path: v
                    .split
                    .then(|| capsule_format::tuf::image_target_path(model, version)),
                model: model.clone(),
                version: version.clone(),
                sha256: v.sha256.clone(),
                length: v.length,
            });
        }
        out
    }
}

/// The snapshot of the current generation, read by the first request that needs it.
#[derive(Debug, Default)]
pub(crate) struct Snapshots {
    current: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
}

impl Snapshots {
    /// The snapshot of `generation` (read now unless it is the one held).
    pub(crate) async fn get(&self, db: &Store, generation: i64) -> Result<Arc<Snapshot>> {
        let mut current = self.current.lock().await;
        if let Some(s) = current.as_ref().filter(|s| s.generation == generation) {
            return Ok(Arc::clone(s));
        }
        let s = Arc::new(Snapshot::read(db, generation).await?);
        *current = Some(Arc::clone(&s));
        Ok(s)
    }
}

/// When nodes were last seen (seconds), kept in memory until the next flush.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pending: std::sync::Mutex<HashMap<String, i64>>,
}

impl Seen {
    /// Notes that `node` called at `now`.
    pub(crate) fn note(&self, node: &str, now: i64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), now);
    }

    /// Writes what was noted since the last flush.
    pub(crate) async fn flush(&self, db: &Store) -> Result<()> {
        let pending: Vec<(String, i64)> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        if pending.is_empty() {
            return Ok(());
        }
        db.touch_all(&pending).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_format::hub::RolloutState;

    fn offered(sha: &str, split: bool) -> Offered {
        Offered {
            sha256: sha.into(),
            length: 10,
            split,
        }
    }

    #[test]
    fn desired_is_production_or_the_rollout_that_assigns_the_node() {
        let mut canary = Rollout {
            id: "r1".into(),
            model: "digits".into(),
            version: "2".into(),
            previous: "1".into(),
            selector: [("ring".to_owned(), "canary".to_owned())].into(),
            steps: vec![100],
            step: 0,
            percent: 100,
            state: RolloutState::Active,
            failure_threshold: 0.2,
            step_interval_s: 0,
            reason: String::new(),
            created_at: 0,
            updated_at: 0,
            auto_promote: None,
            baseline: Default::default(),
        };
        let snapshot = |rollouts: Vec<Rollout>| Snapshot {
            generation: 7,
            targets: None,
            nodes: HashMap::new(),
            models: vec![
                ("digits".into(), Some("1".into())),
                ("wine".into(), None),
                ("lost".into(), Some("9".into())),
            ],
            rollouts,
            versions: [
                (("digits".to_owned(), "1".to_owned()), offered("a1", false)),
                (("digits".to_owned(), "2".to_owned()), offered("a2", true)),
            ]
            .into(),
        };
        let summary = |s: &Snapshot, labels: &[(&str, &str)]| -> Vec<(String, String, bool)> {
            let labels = labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect();
            s.desired("n1", &labels)
                .into_iter()
                .map(|d| (d.model, d.version, d.image_path.is_some()))
                .collect()
        };
        let plain = snapshot(vec![]);
        assert_eq!(
            summary(&plain, &[]),
            [("digits".into(), "1".into(), false)],
            "no production, no row; a version the hub lacks, no row"
        );
        let rolling = snapshot(vec![canary.clone()]);
        assert_eq!(
            summary(&rolling, &[("ring", "main")]),
            [("digits".into(), "1".into(), false)]
        );
        assert_eq!(
            summary(&rolling, &[("ring", "canary")]),
            [("digits".into(), "2".into(), true)]
        );
        canary.percent = 0;
        let none = snapshot(vec![canary]);
        assert_eq!(
            summary(&none, &[("ring", "canary")]),
            [("digits".into(), "1".into(), false)]
        );
    }
}
