use thiserror::Error;

/// Errors of the format crate: decoding and validation of untrusted bytes and JSON.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Bytes that should hold an encoded message could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// The message kind being decoded.
        what: &'static str,
        /// Why decoding failed.
        reason: String,
    },
    /// A message could not be encoded (only happens past size limits).
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// The message kind being encoded.
        what: &'static str,
        /// Why encoding failed.
        reason: String,
    },
    /// The manifest section was written by a newer (or unknown) format version.
    #[error("unsupported manifest format version {found} (this build reads version {supported})")]
    UnsupportedFormatVersion {
        /// Version found in the section header.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// A datatype name that the protocol does not define.
    #[error(
        "unknown datatype {0:?} (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BYTES)"
    )]
    UnknownDType(String),
    /// A tensor whose shape, datatype and data disagree.
    #[error("tensor {name:?}: {reason}")]
    InvalidTensor {
        /// The tensor's name (empty when unnamed).
        name: String,
        /// What is inconsistent.
        reason: String,
    },
    /// A request's inputs that do not fit the capsule's signature (`request`).
    #[error("{0}")]
    Signature(String),
    /// A V2 JSON request or response that does not follow the protocol.
    #[error("invalid inference request: {0}")]
    InvalidRequest(String),
    /// Telemetry (reference statistics, batches, feedback) that breaks its bounds or form.
    #[error("{0}")]
    InvalidTelemetry(String),
    /// A pipeline spec that does not fit the model or contradicts itself.
    #[error("invalid pipeline: {at}: {reason}")]
    InvalidPipeline {
        /// The step and field at fault (`input "image"`, `output "label" step 2 (top_k)`).
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// Update metadata or a download that fails a signature, version, expiry, length or hash
    /// check (`tuf`).
    #[error("refused ({step}): {reason}")]
    Refused {
        /// The TUF client-workflow step that refused (`5.6.3`, ...), or `capsule` for checks
        /// of our own.
        step: &'static str,
        /// What failed.
        reason: String,
    },
    /// A model image (the split form of a capsule, `split`) that is malformed.
    #[error("invalid model image: {what}")]
    InvalidImage {
        /// What is wrong.
        what: String,
    },
    /// A model image given a code module other than the one it names.
    #[error("the model image needs guest code {expected}; given {found}")]
    CodeMismatch {
        /// SHA-256 of the code the image names.
        expected: String,
        /// What was given instead (its SHA-256, or why it cannot be it).
        found: String,
    },
    /// A model image's payload could not be compressed.
    #[error("cannot compress the model image")]
    Compress(#[source] std::io::Error),
    /// A model image's payload is not gzip data.
    #[error("invalid model image: its payload does not decompress")]
    Decompress(#[source] std::io::Error),
    /// Something larger than a documented bound.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The bound.
        limit: u64,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
