//! `capsule keys`, `capsule sign`, `capsule push`, `capsule rollout`, `capsule models`: the
//! publisher's side of signed updates and the hub's admin client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use capsule_format::hub::{AutoPromote, NewRollout, NewToken, RolloutAction};
use capsule_format::tuf::{self, PublicKey, Root, Signed, SigningKey, Targets};
use capsule_node::{HubClient, HubError};
use serde_json::{Value, json};

use crate::read_limited;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `capsule keys`.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Generate an ed25519 key pair: NAME.key (secret, mode 0600; keep it offline) and NAME.pub.
    Generate {
        /// Path prefix of the two files.
        name: PathBuf,
    },
    /// Write signed root metadata: which keys sign root and targets metadata, and how many must.
    Root {
        /// Public keys (NAME.pub) of the root role.
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        /// Signatures the root role needs.
        #[arg(long, default_value_t = 1)]
        root_threshold: u32,
        /// Public keys of the targets role (publishers).
        #[arg(long = "targets-key", required = true)]
        targets_keys: Vec<PathBuf>,
        /// Signatures the targets role needs.
        #[arg(long, default_value_t = 1)]
        targets_threshold: u32,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
        /// The root this one replaces (key rotation: version + 1; sign with a threshold of
        /// the old root keys and of the new ones).
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Secret keys to sign with.
        #[arg(long = "sign", required = true)]
        signers: Vec<PathBuf>,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn read_key(path: &Path) -> Result<SigningKey> {
    let text = String::from_utf8(read_limited(path, 4096, "key")?).context("key is not UTF-8")?;
    SigningKey::from_hex(&text)
        .with_context(|| format!("{} is not an ed25519 secret key", path.display()))
}

fn read_pub(path: &Path) -> Result<PublicKey> {
    serde_json::from_slice(&read_limited(path, 4096, "public key")?)
        .with_context(|| format!("{} is not a public key", path.display()))
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn run_keys(cmd: &KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Generate { name } => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
            let key = SigningKey::from_secret(secret);
            let key_path = name.with_extension("key");
            let pub_path = name.with_extension("pub");
            {
                use std::io::Write;
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o600);
                }
                let mut f = options.open(&key_path).with_context(|| {
                    format!("creating {} (it must not exist)", key_path.display())
                })?;
                writeln!(f, "{}", key.to_hex())?;
            }
            write_json(&pub_path, &key.public())?;
            println!(
                "wrote {} and {} (key id {})",
                key_path.display(),
                pub_path.display(),
                key.public().keyid()
            );
            Ok(())
        }
        KeysCommand::Root {
            root_keys,
            root_threshold,
            targets_keys,
            targets_threshold,
            expires_days,
            previous,
            signers,
            output,
        } => {
            let rk: Vec<PublicKey> = root_keys
                .iter()
                .map(|p| read_pub(p))
                .collect::<Result<_>>()?;
            let tk: Vec<PublicKey> = targets_keys
                .iter()
                .map(|p| read_pub(p))
                .collect::<Result<_>>()?;
            let mut root = Root::new(
                &rk,
                *root_threshold,
                &tk,
                *targets_threshold,
                unix_now() + expires_days * 86_400,
            );
            if let Some(prev) = previous {
                let old: Signed<Root> = tuf::parse(&read_limited(prev, 1 << 20, "root")?, "root")?;
                root.version = old.signed.version + 1;
            }
            let mut signed = Signed {
                signed: root,
                signatures: vec![],
            };
            for s in signers {
                read_key(s)?.sign(&mut signed)?;
            }
            write_json(output, &signed)?;
            println!(
                "wrote {} (root version {})",
                output.display(),
                signed.signed.version
            );
            Ok(())
        }
    }
}

/// `capsule sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// Targets metadata to create or update.
    #[arg(long)]
    targets: PathBuf,
    /// Capsules to add (name and version from their manifests); adding bumps the version.
    #[arg(long = "add")]
    add: Vec<PathBuf>,
    /// Secret keys to sign with (several for a threshold).
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Validity in days from now (when adding).
    #[arg(long, default_value_t = 30)]
    expires_days: u64,
}

pub fn run_sign(args: &SignArgs) -> Result<()> {
    let mut metadata: Signed<Targets> = if args.targets.exists() {
        tuf::parse(&read_limited(&args.targets, 1 << 20, "targets")?, "targets")?
    } else {
        Signed {
            signed: Targets {
                kind: "targets".into(),
                version: 0,
                expires: 0,
                targets: BTreeMap::new(),
            },
            signatures: vec![],
        }
    };
    if !args.add.is_empty() || metadata.signed.version == 0 {
        for path in &args.add {
            // Both forms: the single file (browsers, older nodes), the model image that
            // names its code, and the code as a target of its own.
            let forms = crate::split::BothForms::read(path)?;
            let m = &forms.capsule.manifest;
            let version = m.version.to_string();
            let sha = capsule_format::split::sha256_hex(&forms.image);
            metadata.signed.targets.extend(tuf::capsule_targets(
                &m.name,
                &version,
                (forms.capsule.size() as u64, &forms.capsule.sha256),
                (forms.image.len() as u64, &sha),
                (forms.code.len() as u64, &forms.code_sha256),
            ));
        }
        metadata.signed.version += 1;
        metadata.signed.expires = unix_now() + args.expires_days * 86_400;
        metadata.signatures.clear();
    }
    for k in &args.keys {
        read_key(k)?.sign(&mut metadata)?;
    }
    write_json(&args.targets, &metadata)?;
    println!(
        "wrote {} (targets version {}, {} targets, {} signatures)",
        args.targets.display(),
        metadata.signed.version,
        metadata.signed.targets.len(),
        metadata.signatures.len()
    );
    Ok(())
}

/// Where and as whom admin commands talk to the hub.
#[derive(Debug, clap::Args)]
pub struct HubOptions {
    /// The hub's URL.
    #[arg(long, env = "CAPSULE_HUB", default_value = "http://127.0.0.1:8400")]
    hub: String,
    /// An admin token.
    #[arg(long, env = "CAPSULE_HUB_TOKEN", hide_env_values = true)]
    token: String,
    /// A CA certificate (PEM) to trust for an https:// hub.
    #[arg(long, env = "CAPSULE_HUB_CA")]
    ca: Option<PathBuf>,
}

/// Largest answer of the hub an admin command reads.
const MAX_ANSWER_BYTES: usize = 64 << 20;

impl HubOptions {
    /// The hub's client (the node's sync agent uses the same one).
    fn client(&self) -> Result<HubClient> {
        Ok(HubClient::new(&self.hub, &self.token, self.ca.as_deref())?)
    }

    /// Whether the hub has this resource (`HEAD`: 200 or 404).
    async fn has(&self, path: &str) -> Result<bool> {
        let c = self.client()?;
        match c.send(c.request(reqwest::Method::HEAD, path)).await {
            Ok(_) => Ok(true),
            Err(HubError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("HEAD {path}")),
        }
    }

    /// A call whose answer is printed or read as JSON.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value> {
        let c = self.client()?;
        let mut req = c.request(method, path);
        if let Some(b) = body {
            req = req.body(b);
        }
        Ok(c.json(req, MAX_ANSWER_BYTES).await?)
    }
}

/// `capsule push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The capsule.
    capsule: PathBuf,
    #[command(flatten)]
    client: HubOptions,
    /// Signed targets metadata to publish with it (from `capsule sign`).
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Provenance (JSON file: dataset_sha256, params, code_revision, ...).
    #[arg(long)]
    provenance: Option<PathBuf>,
    /// Metrics (JSON file of name -> value; default: the model card's).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Point this alias at the version (e.g. production).
    #[arg(long)]
    alias: Option<String>,
}

pub fn run_push(args: &PushArgs) -> Result<()> {
    let forms = crate::split::BothForms::read(&args.capsule)?;
    let m = &forms.capsule.manifest;
    let read_json = |p: &Option<PathBuf>| -> Result<Value> {
        match p {
            Some(p) => Ok(serde_json::from_slice(&read_limited(p, 1 << 20, "JSON")?)?),
            None => Ok(Value::Null),
        }
    };
    let provenance = read_json(&args.provenance)?;
    let metrics = read_json(&args.metrics)?;
    runtime()?.block_on(async {
        let c = &args.client;
        // The split form: the code only when the hub lacks it (every model of one guest
        // build shares it), then the model image; the hub joins the single file on demand.
        let code_path = format!("/api/v1/blobs/{}", forms.code_sha256);
        if c.has(&code_path).await? {
            println!("code {} already on the hub", forms.code_sha256);
        } else {
            c.call(
                reqwest::Method::POST,
                "/api/v1/blobs",
                Some(forms.code.clone()),
            )
            .await?;
            println!(
                "uploaded code {} ({} bytes)",
                forms.code_sha256,
                forms.code.len()
            );
        }
        let blob = c
            .call(
                reqwest::Method::POST,
                "/api/v1/blobs",
                Some(forms.image.clone()),
            )
            .await?;
        println!("uploaded model image ({} bytes)", forms.image.len());
        let sha = blob["sha256"].as_str().unwrap_or_default().to_owned();
        let body = json!({"sha256": sha, "provenance": provenance, "metrics": metrics});
        c.call(
            reqwest::Method::POST,
            &format!("/api/v1/models/{}/versions", m.name),
            Some(serde_json::to_vec(&body)?),
        )
        .await?;
        println!(
            "pushed {} {} (sha256 {}, image {sha})",
            m.name, m.version, forms.capsule.sha256
        );
        if let Some(t) = &args.targets {
            let text = read_limited(t, 1 << 20, "targets")?;
            let r = c
                .call(
                    reqwest::Method::POST,
                    "/api/v1/metadata/targets",
                    Some(text),
                )
                .await?;
            println!("published targets version {}", r["version"]);
        }
        if let Some(alias) = &args.alias {
            let body = json!({"version": m.version.to_string()});
            c.call(
                reqwest::Method::PUT,
                &format!("/api/v1/models/{}/aliases/{alias}", m.name),
                Some(serde_json::to_vec(&body)?),
            )
            .await?;
            println!("{alias} -> {} {}", m.name, m.version);
        }
        Ok(())
    })
}

/// `capsule rollout`.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    client: HubOptions,
    #[command(subcommand)]
    command: RolloutCommand,
}

/// Rollout actions.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of a version to the nodes matching the selector.
    Start {
        /// Model.
        #[arg(long)]
        model: String,
        /// Version.
        #[arg(long)]
        version: String,
        /// Node label the nodes must have (repeat): key=value.
        #[arg(long = "selector")]
        selector: Vec<String>,
        /// Percentages per step, e.g. 10,50,100.
        #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
        steps: Vec<u32>,
        /// Failure rate (failed / assigned nodes) above which the rollout aborts itself.
        #[arg(long, default_value_t = 0.2)]
        failure_threshold: f64,
        /// Seconds between automatic steps (0: manual `step`).
        #[arg(long, default_value_t = 0)]
        step_interval_s: i64,
        /// Let the hub promote the rollout when its canary holds (enough requests at or
        /// under the error rate, and the accuracy when given, for the hold time) and abort
        /// it when the canary is worse.
        #[arg(long)]
        auto_promote: bool,
        /// Fewest requests the new version serves before the hub judges it.
        #[arg(long, requires = "auto_promote", default_value_t = AutoPromote::default().min_requests)]
        promote_min_requests: u64,
        /// Highest failed / all requests that still promotes.
        #[arg(long, requires = "auto_promote", default_value_t = AutoPromote::default().max_error_rate)]
        promote_max_error_rate: f64,
        /// Lowest live accuracy (feedback labels) that still promotes (default: not judged).
        #[arg(long, requires = "auto_promote")]
        promote_min_accuracy: Option<f64>,
        /// Fewest labeled predictions before accuracy is judged.
        #[arg(long, requires = "auto_promote", default_value_t = AutoPromote::default().min_labels)]
        promote_min_labels: u64,
        /// Seconds the rollout runs before it may be promoted.
        #[arg(long, requires = "auto_promote", default_value_t = AutoPromote::default().hold_s)]
        promote_hold_s: i64,
    },
    /// Next step.
    Step {
        /// Rollout id.
        id: String,
    },
    /// Make the version production.
    Promote {
        /// Rollout id.
        id: String,
    },
    /// Stop: nodes go back to the production version.
    Abort {
        /// Rollout id.
        id: String,
    },
    /// Production back to the version before the rollout.
    Rollback {
        /// Rollout id.
        id: String,
    },
    /// List rollouts.
    List,
}

pub fn run_rollout(args: &RolloutArgs) -> Result<()> {
    let c = &args.client;
    runtime()?.block_on(async {
        let value = match &args.command {
            RolloutCommand::Start {
                model,
                version,
                selector,
                steps,
                failure_threshold,
                step_interval_s,
                auto_promote,
                promote_min_requests,
                promote_max_error_rate,
                promote_min_accuracy,
                promote_min_labels,
                promote_hold_s,
            } => {
                let mut sel = BTreeMap::new();
                for s in selector {
                    let (k, v) = s
                        .split_once('=')
                        .with_context(|| format!("--selector {s:?}: expected key=value"))?;
                    sel.insert(k.to_owned(), v.to_owned());
                }
                let body = NewRollout {
                    model: model.clone(),
                    version: version.clone(),
                    selector: sel,
                    steps: steps.clone(),
                    failure_threshold: *failure_threshold,
                    step_interval_s: *step_interval_s,
                    auto_promote: auto_promote.then_some(AutoPromote {
                        min_requests: *promote_min_requests,
                        max_error_rate: *promote_max_error_rate,
                        min_accuracy: *promote_min_accuracy,
                        min_labels: *promote_min_labels,
                        hold_s: *promote_hold_s,
                    }),
                };
                c.call(
                    reqwest::Method::POST,
                    "/api/v1/rollouts",
                    Some(serde_json::to_vec(&body)?),
                )
                .await?
            }
            RolloutCommand::Step { id } => action(c, id, RolloutAction::Step).await?,
            RolloutCommand::Promote { id } => action(c, id, RolloutAction::Promote).await?,
            RolloutCommand::Abort { id } => action(c, id, RolloutAction::Abort).await?,
            RolloutCommand::Rollback { id } => action(c, id, RolloutAction::Rollback).await?,
            RolloutCommand::List => {
                c.call(reqwest::Method::GET, "/api/v1/rollouts", None)
                    .await?
            }
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(())
    })
}

async fn action(c: &HubOptions, id: &str, action: RolloutAction) -> Result<Value> {
    c.call(
        reqwest::Method::POST,
        &format!("/api/v1/rollouts/{id}/{action}"),
        None,
    )
    .await
}

/// `capsule tokens`.
#[derive(Debug, clap::Args)]
pub struct TokensArgs {
    #[command(flatten)]
    client: HubOptions,
    #[command(subcommand)]
    command: TokensCommand,
}

/// The hub's tokens (stored hashed; a token is shown once, when issued).
#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Every token: kind, name, node, issue time, the first 8 hex digits of its hash.
    List,
    /// Issue an admin token (print it once).
    Admin {
        /// Its name, the actor of its calls in the audit log.
        name: String,
    },
    /// Issue a token for a node (print it once).
    Node {
        /// The node's id.
        id: String,
    },
    /// Revoke one token, named by the first digits of its hash (from `list`).
    Revoke {
        /// At least 8 hex digits of its hash.
        hash_prefix: String,
    },
    /// Revoke every token of a node (a lost or stolen device).
    RevokeNode {
        /// The node's id.
        id: String,
    },
}

pub fn run_tokens(args: &TokensArgs) -> Result<()> {
    let c = &args.client;
    runtime()?.block_on(async {
        let value = match &args.command {
            TokensCommand::List => c.call(reqwest::Method::GET, "/api/v1/tokens", None).await?,
            TokensCommand::Admin { name } => {
                let body = serde_json::to_vec(&NewToken { name: name.clone() })?;
                c.call(reqwest::Method::POST, "/api/v1/tokens", Some(body))
                    .await?
            }
            TokensCommand::Node { id } => {
                c.call(
                    reqwest::Method::POST,
                    &format!("/api/v1/nodes/{id}/token"),
                    None,
                )
                .await?
            }
            TokensCommand::Revoke { hash_prefix } => {
                c.call(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/tokens/{hash_prefix}"),
                    None,
                )
                .await?
            }
            TokensCommand::RevokeNode { id } => {
                c.call(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/nodes/{id}/token"),
                    None,
                )
                .await?
            }
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(())
    })
}

/// `capsule models`.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    client: HubOptions,
    #[command(subcommand)]
    command: ModelsCommand,
}

/// Registry queries.
#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Models with their versions and aliases.
    List,
    /// One model: versions with provenance and metrics.
    Show {
        /// Model.
        model: String,
    },
    /// Two versions side by side, with metric differences.
    Compare {
        /// Model.
        model: String,
        /// First version.
        a: String,
        /// Second version.
        b: String,
    },
}

pub fn run_models(args: &ModelsArgs) -> Result<()> {
    let c = &args.client;
    runtime()?.block_on(async {
        let value = match &args.command {
            ModelsCommand::List => c.call(reqwest::Method::GET, "/api/v1/models", None).await?,
            ModelsCommand::Show { model } => {
                c.call(
                    reqwest::Method::GET,
                    &format!("/api/v1/models/{model}"),
                    None,
                )
                .await?
            }
            ModelsCommand::Compare { model, a, b } => {
                c.call(
                    reqwest::Method::GET,
                    &format!("/api/v1/models/{model}/compare?a={a}&b={b}"),
                    None,
                )
                .await?
            }
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(())
    })
}
