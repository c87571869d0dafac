//! One test per attack on the update path (tough's layout: one failure hides nothing). Each
//! starts a hub on SQLite and one synced node, registers `wat` 1.0.0, 2.0.0 and 3.0.0, and
//! then serves what an attacker wants: metadata signed wrongly, or, for a compromised hub,
//! its database and blob store written directly. Every attack is refused by the node at the
//! TUF step named, nothing is installed, and the good version keeps serving.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use capsule_format::tuf::{Root, Signed, SigningKey, Target, Targets};
use capsule_tests::{WatCapsule, wat_capsule};
use serde_json::{Value, json};

use crate::common::*;

const V1: &str = "wat/1.0.0.capsule.wasm";
const V2: &str = "wat/2.0.0.capsule.wasm";
const VERSIONS: [&str; 3] = ["1.0.0", "2.0.0", "3.0.0"];

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A hub, one node synced with it, and the three versions' single files.
struct Setup {
    dir: tempfile::TempDir,
    hub: String,
    database: String,
    node: String,
    node_token: String,
    /// The node's models directory.
    models: PathBuf,
    blobs: Vec<Vec<u8>>,
    _procs: Vec<Proc>,
    rt: tokio::runtime::Runtime,
}

impl Setup {
    /// Everything registered, production at 1.0.0, no targets metadata yet.
    fn start() -> Result<Setup> {
        let dir = tempfile::tempdir()?;
        publisher_keys(dir.path(), &["evil", "pub3"])?;
        let mut blobs = Vec::new();
        for (v, y) in VERSIONS.iter().zip([1.0, 2.0, 3.0]) {
            let bytes = wat_capsule(&WatCapsule {
                name: "wat".into(),
                version: semver::Version::parse(v)?,
                y,
                golden_y: None,
            })?;
            std::fs::write(dir.path().join(format!("wat-{v}.capsule.wasm")), &bytes)?;
            blobs.push(bytes);
        }
        let database = format!("sqlite://{}", dir.path().join("hub.db").display());
        let port = free_port()?;
        let hub_proc = start_hub(dir.path(), &database, port, &[])?;
        let hub = format!("http://127.0.0.1:{port}");
        let node_token = node_token(&hub, "node-a")?;
        let (node_proc, node) = start_synced_node(
            dir.path(),
            &hub,
            "node-a",
            &node_token,
            &["--label", "site=lab"],
        )?;
        for v in VERSIONS {
            let file = dir.path().join(format!("wat-{v}.capsule.wasm"));
            run(&[
                "push",
                &file.to_string_lossy(),
                "--hub",
                &hub,
                "--token",
                ADMIN,
            ])?;
        }
        // `push` uploads the split form; the single files too, as an older publisher
        // would, so attacks can tamper with them on the hub's disk.
        for bytes in &blobs {
            let status = http()
                .post(format!("{hub}/api/v1/blobs"))
                .bearer_auth(ADMIN)
                .body(bytes.clone())
                .send()?
                .status();
            assert_eq!(status, 200);
        }
        let setup = Setup {
            models: dir.path().join("models-node-a"),
            dir,
            hub,
            database,
            node,
            node_token,
            blobs,
            _procs: vec![hub_proc, node_proc],
            rt: tokio::runtime::Runtime::new()?,
        };
        setup.set_production("1.0.0")?;
        Ok(setup)
    }

    fn set_production(&self, version: &str) -> Result<()> {
        let (s, v) = api(
            &self.hub,
            "PUT",
            "/api/v1/models/wat/aliases/production",
            ADMIN,
            Some(json!({ "version": version })),
        )?;
        if s != 200 {
            bail!("production -> {version}: {s} {v}");
        }
        Ok(())
    }

    fn key(&self, name: &str) -> Result<SigningKey> {
        let path = self.dir.path().join(format!("{name}.key"));
        SigningKey::from_hex(&std::fs::read_to_string(path)?).context("key")
    }

    /// Targets metadata listing `entries` (path, index of the version), unsigned.
    fn targets(&self, version: u64, expires_in: i64, entries: &[(&str, usize)]) -> Signed<Targets> {
        Signed {
            signed: Targets {
                kind: "targets".into(),
                version,
                expires: (unix_now() + expires_in).max(0) as u64,
                targets: entries
                    .iter()
                    .map(|(path, i)| {
                        (
                            (*path).to_owned(),
                            Target {
                                length: self.blobs[*i].len() as u64,
                                sha256: sha(&self.blobs[*i]),
                                model: "wat".into(),
                                version: VERSIONS[*i].into(),
                                code: None,
                            },
                        )
                    })
                    .collect(),
            },
            signatures: vec![],
        }
    }

    /// `targets` signed by each of `keys`.
    fn signed(
        &self,
        version: u64,
        expires_in: i64,
        entries: &[(&str, usize)],
        keys: &[&str],
    ) -> Result<Signed<Targets>> {
        let mut t = self.targets(version, expires_in, entries);
        for k in keys {
            self.key(k)?.sign(&mut t)?;
        }
        Ok(t)
    }

    /// Uploads targets metadata; the hub's generation after it.
    fn upload(&self, t: &Signed<Targets>) -> Result<i64> {
        let (s, v) = api(
            &self.hub,
            "POST",
            "/api/v1/metadata/targets",
            ADMIN,
            Some(serde_json::to_value(t)?),
        )?;
        if s != 200 {
            bail!("upload: {s} {v}");
        }
        generation(&self.hub)
    }

    /// The node's report for a generation at or after `after` says the model failed
    /// verification at `step`.
    fn refused(&self, after: i64, step: &str) -> Result<()> {
        let report = wait_report(&self.hub, "node-a", after)?;
        let m = &report["models"][0];
        assert_eq!(m["state"], "verify_failed", "{report}");
        assert!(
            m["detail"].as_str().unwrap_or("").contains(step),
            "want {step}: {report}"
        );
        Ok(())
    }

    /// The node reports `version` serving for a generation at or after `after`.
    fn serving(&self, after: i64, version: &str) -> Result<()> {
        let report = wait_report(&self.hub, "node-a", after)?;
        assert_eq!(report["models"][0]["state"], "serving", "{report}");
        assert_eq!(report["models"][0]["version"], version, "{report}");
        Ok(())
    }

    /// The good state: 1.0.0 and 2.0.0 signed by both publishers (targets version 10), 1.0.0
    /// serving.
    fn good(&self) -> Result<Signed<Targets>> {
        let good = self.signed(10, 3600, &[(V1, 0), (V2, 1)], &["pub1", "pub2"])?;
        let g = self.upload(&good)?;
        self.serving(g, "1.0.0")?;
        assert_eq!(served_y(&self.node), Some(1.0));
        Ok(good)
    }

    /// Runs SQL on the hub's database as a compromised hub would, then bumps the generation
    /// so nodes look again; the new generation.
    fn sql(&self, query: &str, binds: &[&str]) -> Result<i64> {
        self.rt.block_on(async {
            let db = sqlx::SqlitePool::connect(&self.database).await?;
            let mut q = sqlx::query(query);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(&db).await?;
            sqlx::query("UPDATE hub_state SET value = value + 1 WHERE key = 'generation'")
                .execute(&db)
                .await?;
            let row: (i64,) =
                sqlx::query_as("SELECT value FROM hub_state WHERE key = 'generation'")
                    .fetch_one(&db)
                    .await?;
            db.close().await;
            Ok(row.0)
        })
    }

    /// Points production at `version` in the database, as a compromised hub would (the
    /// registry's API checks nothing here that matters to the attacks); the new generation.
    fn production_by_sql(&self, version: &str) -> Result<i64> {
        self.sql(
            "UPDATE aliases SET version = $1 WHERE model = 'wat' AND alias = 'production'",
            &[version],
        )
    }

    /// Uploads a root version 2 signed by key `root_key`, trusting `targets_key` alone for
    /// targets (the hub stores root metadata as given; nodes verify it).
    fn post_root(&self, root_key: &str, targets_key: &str) -> Result<()> {
        let root = root_v2(&self.key(root_key)?, &self.key(targets_key)?)?;
        let (status, v) = api(
            &self.hub,
            "POST",
            "/api/v1/metadata/root",
            ADMIN,
            Some(root),
        )?;
        if status != 200 {
            bail!("root upload: {status} {v}");
        }
        Ok(())
    }

    /// Where the hub keeps a blob.
    fn blob_path(&self, sha: &str) -> PathBuf {
        self.dir
            .path()
            .join("blobs")
            .join(&sha[..2])
            .join(format!("{sha}.capsule.wasm"))
    }

    /// Nothing is installed and nothing serves.
    fn expect_nothing(&self) {
        assert_eq!(
            capsule_files(&self.models),
            Vec::<String>::new(),
            "nothing installed"
        );
        assert_eq!(served_y(&self.node), None);
    }

    /// 1.0.0 still serves and nothing else is installed.
    fn expect_v1(&self, what: &str) {
        assert_eq!(served_y(&self.node), Some(1.0), "{what}: still v1");
        assert_eq!(
            capsule_files(&self.models),
            vec!["wat/1.0.0/wat.capsule.wasm".to_owned()],
            "{what}: nothing installed"
        );
    }
}

#[test]
fn a_key_the_root_does_not_trust_does_not_count() -> Result<()> {
    let s = Setup::start()?;
    let t = s.signed(1, 3600, &[(V1, 0)], &["evil", "pub1"])?;
    s.refused(
        s.upload(&t)?,
        "refused (5.6.3): targets has 1 valid signature(s) of trusted keys, the threshold is 2",
    )?;
    s.expect_nothing();
    Ok(())
}

#[test]
fn one_publisher_of_two_is_below_the_threshold() -> Result<()> {
    let s = Setup::start()?;
    let t = s.signed(2, 3600, &[(V1, 0)], &["pub2"])?;
    s.refused(s.upload(&t)?, "refused (5.6.3)")?;
    s.expect_nothing();
    Ok(())
}

#[test]
fn expired_metadata_is_refused() -> Result<()> {
    let s = Setup::start()?;
    let t = s.signed(3, -10, &[(V1, 0)], &["pub1", "pub2"])?;
    s.refused(s.upload(&t)?, "refused (5.6.5)")?;
    s.expect_nothing();
    Ok(())
}

#[test]
fn a_path_traversal_in_a_signed_target_refuses_the_whole_file() -> Result<()> {
    let s = Setup::start()?;
    let t = s.signed(
        4,
        3600,
        &[(V1, 0), ("../../../etc/cron.d/x", 1)],
        &["pub1", "pub2"],
    )?;
    s.refused(s.upload(&t)?, "is not a plain relative path")?;
    s.expect_nothing();
    Ok(())
}

#[test]
fn older_metadata_served_again_is_a_rollback() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    let old = s.signed(9, 3600, &[(V1, 0), (V2, 1)], &["pub1", "pub2"])?;
    let g = s.sql(
        "UPDATE metadata SET body = $1, version = 9 WHERE role = 'targets'",
        &[&serde_json::to_string(&old)?],
    )?;
    s.refused(
        g,
        "refused (5.6.4): targets version 9 is older than the trusted version 10",
    )?;
    s.expect_v1("rollback");
    Ok(())
}

#[test]
fn a_version_pointing_at_another_versions_blob_is_refused() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    // The entry first, then production (the node would install a genuine 2.0.0 between).
    s.sql(
        "UPDATE versions SET sha256 = $1 WHERE model = 'wat' AND version = '2.0.0'",
        &[&sha(&s.blobs[2])],
    )?;
    let g = s.production_by_sql("2.0.0")?;
    s.refused(g, "does not match the signed target")?;
    s.expect_v1("mix and match");
    Ok(())
}

#[test]
fn a_tampered_blob_is_refused() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    let blob = s.blob_path(&sha(&s.blobs[1]));
    let mut bytes = std::fs::read(&blob)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let g = s.production_by_sql("2.0.0")?;
    s.refused(g, "refused (5.7.3): wat/2.0.0.capsule.wasm: sha256")?;
    s.expect_v1("tampered blob");
    Ok(())
}

#[test]
fn oversized_metadata_is_refused_before_it_is_parsed() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    let huge = format!("{{\"signed\": \"{}\"}}", "x".repeat(2 << 20));
    let g = s.sql(
        "UPDATE metadata SET body = $1, version = 11 WHERE role = 'targets'",
        &[&huge],
    )?;
    s.refused(
        g,
        "refused (5.6.1): targets metadata is 2097166 bytes, over the limit of 1048576",
    )?;
    s.expect_v1("oversized metadata");
    Ok(())
}

#[test]
fn a_node_token_cannot_publish_nor_read_another_nodes_state() -> Result<()> {
    let s = Setup::start()?;
    let good = s.good()?;
    let (status, v) = api(
        &s.hub,
        "POST",
        "/api/v1/metadata/targets",
        &s.node_token,
        Some(serde_json::to_value(&good)?),
    )?;
    assert_eq!(
        (status, v),
        (
            403,
            json!({"error": "a node token cannot make admin calls"})
        )
    );
    let (status, v) = api(
        &s.hub,
        "GET",
        "/api/v1/nodes/node-b/desired",
        &s.node_token,
        None,
    )?;
    assert_eq!(
        (status, v),
        (
            403,
            json!({"error": "this node token belongs to node \"node-a\", not \"node-b\""})
        )
    );
    let (status, v) = api(&s.hub, "GET", "/api/v1/models", "not-a-token", None)?;
    assert_eq!((status, v), (401, json!({"error": "unknown token"})));
    s.expect_v1("token misuse");
    Ok(())
}

/// A root version 2 signed by `root_key`, trusting `targets_key` alone for targets.
fn root_v2(root_key: &SigningKey, targets_key: &SigningKey) -> Result<Value> {
    let mut r = Signed {
        signed: Root {
            version: 2,
            ..Root::new(
                &[root_key.public()],
                1,
                &[targets_key.public()],
                1,
                (unix_now() + 3600) as u64,
            )
        },
        signatures: vec![],
    };
    root_key.sign(&mut r)?;
    Ok(serde_json::to_value(&r)?)
}

#[test]
fn a_forged_root_is_refused() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    s.post_root("evil", "evil")?;
    s.refused(
        generation(&s.hub)?,
        "refused (5.3.4): new root (old keys) has 0 valid signature(s)",
    )?;
    s.expect_v1("forged root");
    Ok(())
}

/// TUF 5.3: the genuine root version 2, signed by the root key, moves targets signing to
/// pub3 alone; the old publisher keys no longer count after it.
#[test]
fn after_a_root_rotation_the_old_publisher_keys_do_not_count() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    s.post_root("root", "pub3")?;
    let rotated = s.signed(20, 3600, &[(V1, 0)], &["pub3"])?;
    s.serving(s.upload(&rotated)?, "1.0.0")?;
    let stale = s.signed(21, 3600, &[(V1, 0)], &["pub1", "pub2"])?;
    s.refused(
        s.upload(&stale)?,
        "refused (5.6.3): targets has 0 valid signature(s) of trusted keys, the threshold is 1",
    )?;
    s.expect_v1("old publisher keys after rotation");
    Ok(())
}

/// Half of 2.0.0 is already on the node (an interrupted download); the hub's copy is now
/// corrupt in that first half only. A node that resumes with `Range: bytes=N-` gets the
/// intact second half and a blob matching the signed hash; one that downloaded everything
/// again would refuse it.
#[test]
fn a_resumed_download_only_fetches_what_is_missing() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    let v2_sha = sha(&s.blobs[1]);
    let half = s.blobs[1].len() / 2;
    let downloads = s.models.join(".capsule-agent").join("downloads");
    std::fs::create_dir_all(&downloads)?;
    std::fs::write(
        downloads.join(format!("{v2_sha}.part")),
        &s.blobs[1][..half],
    )?;
    let mut corrupt = s.blobs[1].clone();
    corrupt[0] ^= 0xff;
    std::fs::write(s.blob_path(&v2_sha), &corrupt)?;
    let (status, v) = http()
        .get(format!("{}/api/v1/blobs/{v2_sha}", s.hub))
        .bearer_auth(ADMIN)
        .header("range", format!("bytes={half}-"))
        .send()
        .map(|r| {
            (
                r.status().as_u16(),
                r.bytes().map(|b| b.to_vec()).unwrap_or_default(),
            )
        })?;
    assert_eq!((status, v.as_slice()), (206, &s.blobs[1][half..]));
    s.set_production("2.0.0")?;
    s.serving(generation(&s.hub)?, "2.0.0")?;
    assert_eq!(served_y(&s.node), Some(2.0));
    Ok(())
}

/// 2.0.0's model image is signed with the code it names (A), but the hub serves other code
/// (B) under A's address. The node downloads code by the hash the image's signed target
/// names, so B fails that hash (5.7.3); nothing is installed and 2.0.0 keeps serving from
/// its single file.
#[test]
fn code_swapped_under_a_signed_images_address_is_refused() -> Result<()> {
    let s = Setup::start()?;
    s.good()?;
    s.set_production("2.0.0")?;
    s.serving(generation(&s.hub)?, "2.0.0")?;
    let parts = capsule_format::split::split(&s.blobs[1])?;
    let mut code_b = capsule_format::split::split(&s.blobs[0])?.code;
    if code_b == parts.code {
        let last = code_b.len() - 1;
        code_b[last] ^= 0xff;
    }
    assert!(
        s.blob_path(&parts.code_sha256).exists(),
        "push uploaded the code"
    );
    std::fs::write(s.blob_path(&parts.code_sha256), &code_b)?;
    let mut split_targets = s.targets(30, 3600, &[(V1, 0), (V2, 1)]);
    split_targets.signed.targets.insert(
        capsule_format::tuf::image_target_path("wat", "2.0.0"),
        Target {
            length: parts.image.len() as u64,
            sha256: sha(&parts.image),
            model: "wat".into(),
            version: "2.0.0".into(),
            code: Some(parts.code_sha256.clone()),
        },
    );
    split_targets.signed.targets.insert(
        capsule_format::tuf::code_target_path(&parts.code_sha256),
        Target {
            length: parts.code.len() as u64,
            sha256: parts.code_sha256.clone(),
            model: String::new(),
            version: String::new(),
            code: None,
        },
    );
    for k in ["pub1", "pub2"] {
        s.key(k)?.sign(&mut split_targets)?;
    }
    s.refused(
        s.upload(&split_targets)?,
        &format!(
            "refused (5.7.3): code/{}.wasm: sha256 {}",
            parts.code_sha256,
            sha(&code_b)
        ),
    )?;
    assert!(!s.models.join("wat/2.0.0/wat.capsule.img").exists());
    assert_eq!(
        std::fs::read_dir(s.models.join(".capsule-code"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "no code stored"
    );
    assert_eq!(served_y(&s.node), Some(2.0));
    Ok(())
}
