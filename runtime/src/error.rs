use capsule_format::wire::GuestError;
use thiserror::Error;

/// How a guest call ended when it trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// The per-call deadline passed (epoch interruption).
    Deadline,
    /// The guest hit `unreachable`: a panic, or an allocation refused by the memory cap.
    Unreachable,
    /// A memory access out of bounds.
    MemoryOutOfBounds,
    /// The host kernels refused the guest's operands ([`crate::host_kernels`]).
    HostKernel,
    /// Any other trap.
    Other,
}

/// Errors of the Capsule runtime.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not a capsule this runtime can run.
    #[error("invalid capsule: {0}")]
    InvalidCapsule(String),
    /// The capsule's manifest cannot be decoded.
    #[error("invalid capsule manifest: {0}")]
    Manifest(#[from] capsule_format::Error),
    /// A request that does not fit the capsule's signature (checked before the guest runs).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A request larger than the configured limit.
    #[error("request is {size} bytes, over the limit of {limit} bytes")]
    RequestTooLarge {
        /// Encoded request size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The guest reported a typed error.
    #[error("guest error: {0}")]
    Guest(GuestError),
    /// The guest trapped; the instance was discarded.
    #[error("guest trapped ({kind:?}): {message}")]
    Trap {
        /// What kind of trap.
        kind: TrapKind,
        /// wasmtime's description (and the guest's panic message when there is one).
        message: String,
    },
    /// The guest broke the ABI (bad pointer, undecodable response).
    #[error("guest broke the ABI: {0}")]
    Abi(String),
    /// Compiling or instantiating code failed (wasmtime's error, its causes as sources).
    #[error("wasmtime: {0}")]
    Wasmtime(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The engine's memory creator did not map a capsule's memory image (without it the
    /// instance would start from zeros).
    #[error("the engine's memory creator did not map the capsule's memory image")]
    ImageNotMapped,
    /// A lock of the engine was poisoned by a panic.
    #[error("{0} lock poisoned by a panic")]
    Poisoned(&'static str),
    /// The model cannot be built into a capsule.
    #[error("cannot build capsule: {0}")]
    Build(String),
    /// A golden sample did not reproduce.
    #[error("golden sample {sample:?} failed: {reason}")]
    GoldenMismatch {
        /// The sample name.
        sample: String,
        /// What differed.
        reason: String,
    },
    /// File system access failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub(crate) fn wasmtime(e: wasmtime::Error) -> Error {
        Error::Wasmtime(e.into())
    }

    /// Classifies an error from a guest call: traps become [`Error::Trap`].
    pub(crate) fn from_call(e: wasmtime::Error, panic_message: Option<String>) -> Error {
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => {
                let kind = match trap {
                    wasmtime::Trap::Interrupt => TrapKind::Deadline,
                    wasmtime::Trap::UnreachableCodeReached => TrapKind::Unreachable,
                    wasmtime::Trap::MemoryOutOfBounds => TrapKind::MemoryOutOfBounds,
                    _ => TrapKind::Other,
                };
                let mut message = trap.to_string();
                if let Some(p) = panic_message.filter(|p| !p.is_empty()) {
                    message = format!("{message}; guest panicked: {p}");
                }
                Error::Trap { kind, message }
            }
            None => match e.downcast_ref::<crate::host_kernels::Refused>() {
                Some(refused) => Error::Trap {
                    kind: TrapKind::HostKernel,
                    message: refused.to_string(),
                },
                None => Error::wasmtime(e),
            },
        }
    }
}
