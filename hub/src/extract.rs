//! The hub's request extractors: axum's, with their rejections turned into this crate's
//! [`Error`] by type (a body over its limit is 413, a path or query that does not parse is
//! 400), so every error the hub answers is its JSON `{"error": ...}` without a middleware
//! reading error bodies back.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// A client's malformed request (400), or the hub's own mistake (a route without the
/// parameter its handler reads: 500).
fn rejected(status: axum::http::StatusCode, text: String) -> Error {
    if status.is_client_error() {
        Error::BadRequest(text)
    } else {
        Error::Internal(text)
    }
}

/// Path parameters.
#[derive(Debug)]
pub(crate) struct Path<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Path<T>> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| rejected(e.status(), e.body_text()))
    }
}

/// The query string.
#[derive(Debug)]
pub(crate) struct Query<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Query<T>> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| rejected(e.status(), e.body_text()))
    }
}

/// A URL-encoded form.
#[derive(Debug)]
pub(crate) struct Form<T>(pub(crate) T);

impl<T, S> FromRequest<S> for Form<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Form<T>> {
        axum::Form::<T>::from_request(req, state)
            .await
            .map(|f| Form(f.0))
            .map_err(|e| rejected(e.status(), e.body_text()))
    }
}

/// The whole body, up to the route's limit (`DefaultBodyLimit`).
#[derive(Debug)]
pub(crate) struct RawBody(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<RawBody> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|e| match e {
                BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
                    Error::TooLarge("the request body is over this route's limit".into())
                }
                other => rejected(other.status(), other.body_text()),
            })
    }
}
