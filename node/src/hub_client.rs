//! The client of the hub shared by the node's sync agent and telemetry shipper and by the
//! CLI's hub commands: one place for TLS trust, the bearer token, timeouts, bounded reads of
//! answers and what a failed call says.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Largest CA certificate file read.
const MAX_CA_BYTES: u64 = 1 << 20;

pub(crate) use crate::error::chain;

/// A body cut off at its limit (or by an error): what was read, and why it stopped.
pub(crate) struct Cut {
    /// The bytes read before it stopped.
    pub(crate) partial: Vec<u8>,
    /// Why it stopped.
    pub(crate) message: String,
}

/// Reads at most `limit` bytes of a hub response: a declared length over it is refused
/// before reading, and a body that goes on past it (a hub that never stops sending) is cut
/// there. Nothing is buffered past `limit`.
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, Cut> {
    if let Some(len) = resp.content_length()
        && len > limit as u64
    {
        return Err(Cut {
            partial: Vec::new(),
            message: format!("{what} is {len} bytes, over {limit}"),
        });
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if out.len() + chunk.len() > limit {
                    let room = limit - out.len();
                    out.extend_from_slice(&chunk[..room]);
                    return Err(Cut {
                        partial: out,
                        message: format!("{what} is over {limit} bytes"),
                    });
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) => {
                return Err(Cut {
                    partial: out,
                    message: format!("reading {what}: {}", chain(&e)),
                });
            }
        }
    }
}

/// An HTTP client of the hub, with the node's token.
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    token: String,
    pub(crate) http: reqwest::Client,
}

impl HubClient {
    /// A client of the hub at `url` (http or https) calling with `token`, trusting `ca` (a
    /// PEM certificate) besides the system's roots.
    pub fn new(url: &str, token: &str, ca: Option<&Path>) -> Result<HubClient> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5));
        if let Some(ca) = ca {
            let what = format!("cannot read {}", ca.display());
            let size = std::fs::metadata(ca).map_err(Error::io(&what))?.len();
            if size > MAX_CA_BYTES {
                return Err(Error::Config(format!(
                    "{}: {size} bytes, over {MAX_CA_BYTES} for a CA certificate",
                    ca.display()
                )));
            }
            let pem = std::fs::read(ca).map_err(Error::io(what))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Error::Config(format!("{}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(HubClient {
            base: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
        })
    }

    /// The hub's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` on the hub (the token is added when it is sent).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Sends a request and reads its JSON answer (at most `limit` bytes) as `T`.
    pub async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        limit: usize,
    ) -> std::result::Result<T, HubError> {
        let resp = self.send(req).await?;
        let bytes = read_bounded(resp, limit, "the hub's answer")
            .await
            .map_err(|c| HubError::TooLarge(c.message))?;
        serde_json::from_slice(&bytes).map_err(HubError::Json)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A POST to `path` on the hub.
    pub(crate) fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .timeout(Duration::from_secs(30))
    }

    /// Sends with the token; a non-success status is an error with the start of the hub's
    /// answer.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, HubError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(HubError::Unreachable)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        // The start of the hub's answer is enough to say what went wrong; the rest is not read.
        let text = match read_bounded(resp, 1 << 10, "the hub's error").await {
            // The hub's errors are `{"error": message}`: the message is what matters.
            Ok(bytes) | Err(Cut { partial: bytes, .. }) => {
                match serde_json::from_slice::<HubErrorBody>(&bytes) {
                    Ok(body) => body.error,
                    Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
                }
            }
        };
        Err(HubError::Status {
            status,
            text: text.chars().take(300).collect(),
        })
    }
}

/// The body of the hub's error answers.
#[derive(serde::Deserialize)]
struct HubErrorBody {
    error: String,
}

/// Why a call to the hub failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No answer (connection, TLS, timeout).
    #[error("hub unreachable")]
    Unreachable(#[source] reqwest::Error),
    /// An answer over the call's size limit.
    #[error("{0}")]
    TooLarge(String),
    /// An answer that is not the call's JSON.
    #[error("the hub's answer is not the expected JSON")]
    Json(#[source] serde_json::Error),
    /// An answer with a status other than success, and the start of its body.
    #[error("hub answered {status}: {text}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// Its first characters.
        text: String,
    },
}
