//! Who calls: tokens from `Authorization: Bearer`, the dashboard's session cookie or a
//! beacon's `access_token`, and what each may do.

use super::*;
use crate::store::Token;

/// `?access_token=` on the two endpoints browsers reach with `navigator.sendBeacon`, which
/// cannot set headers (telemetry and feedback).
pub(super) fn beacon_token(parts: &Parts) -> Option<String> {
    if parts.method != axum::http::Method::POST
        || !matches!(parts.uri.path(), "/api/v1/telemetry" | "/api/v1/feedback")
    {
        return None;
    }
    parts.uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "access_token").then(|| v.to_owned())
    })
}

/// Who is calling (any valid token), from `Authorization: Bearer ...` (or, for the
/// dashboard, its session cookie; for beacons, `?access_token=`).
pub(crate) struct Caller {
    /// Whom the token names.
    pub(crate) token: Token,
    /// From where (remote address), for the audit log.
    pub(crate) remote: String,
}

/// A caller with an admin token.
pub(crate) struct Admin(pub(crate) Caller);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Caller> {
        let remote = parts
            .extensions
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let session = bearer
            .is_none()
            .then(|| crate::dashboard::session_token(&parts.headers))
            .flatten();
        // The dashboard's session cookie only reads. A browser attaches it to any request
        // to the hub, including a form or `fetch` that another page (another port of the same
        // host is the same site, so `SameSite=Strict` does not stop it) aims at a write route:
        // writes take `Authorization: Bearer`, which no other page can make a browser send.
        if session.is_some() && !matches!(parts.method, Method::GET | Method::HEAD) {
            return Err(Error::Forbidden(
                "the dashboard's session cookie is read-only; write with Authorization: Bearer"
                    .into(),
            ));
        }
        let token = bearer
            .or(session)
            .or_else(|| beacon_token(parts))
            .ok_or_else(|| {
                Error::Unauthorized("missing bearer token (Authorization: Bearer ...)".into())
            })?;
        let token =
            s.db.token(&token_hash(token.trim()))
                .await?
                .ok_or_else(|| Error::Unauthorized("unknown token".into()))?;
        if token.role == Role::Node
            && !matches!(parts.method, Method::GET | Method::HEAD)
            && !s.limits.allow(&token.node, std::time::Instant::now())
        {
            return Err(Error::TooManyRequests(format!(
                "node {:?} writes faster than {} per second (bursts of {})",
                token.node,
                crate::limits::PER_SECOND,
                crate::limits::BURST
            )));
        }
        Ok(Caller { token, remote })
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Admin> {
        let c = Caller::from_request_parts(parts, s).await?;
        if c.token.role != Role::Admin {
            return Err(Error::Forbidden(format!(
                "a {} token cannot make admin calls",
                c.token.role
            )));
        }
        Ok(Admin(c))
    }
}

impl Caller {
    /// Refuses a node token of another node.
    pub(super) fn for_node(self, id: &str) -> Result<Caller> {
        if self.token.role == Role::Node && self.token.node != id {
            return Err(Error::Forbidden(format!(
                "this node token belongs to node {:?}, not {id:?}",
                self.token.node
            )));
        }
        Ok(self)
    }
}

pub(super) async fn audit(s: &Shared, c: &Caller, action: &str, detail: Value) -> Result<()> {
    s.db.audit(&c.token.name, action, &detail.to_string(), &c.remote)
        .await
}

pub(super) fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}
