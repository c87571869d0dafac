//! `capsule rollout`, `capsule tokens`, `capsule models`: admin calls to the hub.

use super::*;

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
        match &args.command {
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
                c.print::<Rollout>(
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
                c.print::<RolloutList>(reqwest::Method::GET, "/api/v1/rollouts", None)
                    .await?
            }
        }
        Ok(())
    })
}

pub(super) async fn action(c: &HubOptions, id: &str, action: RolloutAction) -> Result<()> {
    c.print::<Rollout>(
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
        match &args.command {
            TokensCommand::List => {
                c.print::<TokenList>(reqwest::Method::GET, "/api/v1/tokens", None)
                    .await?
            }
            TokensCommand::Admin { name } => {
                let body = serde_json::to_vec(&NewToken { name: name.clone() })?;
                c.print::<IssuedToken>(reqwest::Method::POST, "/api/v1/tokens", Some(body))
                    .await?
            }
            TokensCommand::Node { id } => {
                c.print::<IssuedToken>(
                    reqwest::Method::POST,
                    &format!("/api/v1/nodes/{id}/token"),
                    None,
                )
                .await?
            }
            TokensCommand::Revoke { hash_prefix } => {
                c.print::<TokenRevoked>(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/tokens/{hash_prefix}"),
                    None,
                )
                .await?
            }
            TokensCommand::RevokeNode { id } => {
                c.print::<NodeTokensRevoked>(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/nodes/{id}/token"),
                    None,
                )
                .await?
            }
        }
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
        match &args.command {
            ModelsCommand::List => {
                c.print::<ModelList>(reqwest::Method::GET, "/api/v1/models", None)
                    .await?
            }
            ModelsCommand::Show { model } => {
                c.print::<ModelDetail>(
                    reqwest::Method::GET,
                    &format!("/api/v1/models/{model}"),
                    None,
                )
                .await?
            }
            ModelsCommand::Compare { model, a, b } => {
                c.print::<Comparison>(
                    reqwest::Method::GET,
                    &format!("/api/v1/models/{model}/compare?a={a}&b={b}"),
                    None,
                )
                .await?
            }
        }
        Ok(())
    })
}
