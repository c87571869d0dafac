//! `capsule keys`, `capsule sign`, `capsule push`, `capsule rollout`, `capsule tokens`,
//! `capsule models`: the publisher's side of signed updates and the hub's admin client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use capsule_format::hub::{
    AliasSet, AutoPromote, Comparison, IssuedToken, ModelDetail, ModelList, NewRollout, NewToken,
    NodeTokensRevoked, Rollout, RolloutAction, RolloutList, TokenList, TokenRevoked, VersionInfo,
};
use capsule_format::tuf::{self, PublicKey, Root, Signed, SigningKey, Targets};
use capsule_node::{HubClient, HubError};
use serde_json::Value;

use crate::read_limited;

mod admin;
mod keys;
mod push;

pub use admin::*;
pub use keys::*;
pub use push::*;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
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
pub(super) const MAX_ANSWER_BYTES: usize = 64 << 20;

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

    /// A call whose answer, read as `T`, is printed as JSON.
    async fn print<T: serde::de::DeserializeOwned + serde::Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<()> {
        let answer: T = self.call_as(method, path, body).await?;
        println!("{}", serde_json::to_string_pretty(&answer)?);
        Ok(())
    }

    /// A call whose answer is read as `T`.
    async fn call_as<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let c = self.client()?;
        let mut req = c.request(method, path);
        if let Some(b) = body {
            req = req.body(b);
        }
        Ok(c.json(req, MAX_ANSWER_BYTES).await?)
    }
}
