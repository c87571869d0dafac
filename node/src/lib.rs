//! The Capsule edge node: `capsule serve`.
//!
//! Serves every capsule of a model repository over the Open Inference Protocol V2 (REST with
//! the binary tensor data extension, and gRPC), with a pool of warm instances and a bounded
//! wait queue per model version, per-request deadlines, Prometheus metrics, structured logs
//! and hot swap of capsules dropped into (or removed from) the repository.
//!
//! ```no_run
//! # async fn serve() -> Result<(), capsule_node::Error> {
//! let config = capsule_node::NodeConfig::default();
//! let node = capsule_node::Node::start(config).await?;
//! node.wait_for_shutdown_signal().await;
//! node.shutdown().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod agent;
mod config;
mod durable;
mod error;
mod grpc;
mod grpc_budget;
mod http;
mod hub_client;
mod loader;
mod metrics;
mod models;
mod node;
mod repository;
mod settings;
mod telemetry;

pub use agent::HubSync;
pub use config::{NodeConfig, VersionPolicy};
pub use error::{Error, Result};
pub use hub_client::{HubClient, HubError};
pub use models::{InferOutcome, ModelRegistry, ServedModel};
pub use node::Node;
pub use repository::{CODE_DIR, CapsuleFile, Scan, code_path, scan};
pub use settings::NodeSettings;

/// The generated gRPC types and client/server of `inference.GRPCInferenceService`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// Entry points for the fuzz targets of `capsule-fuzz`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// What the gRPC service does with a `ModelInfer` message's bytes before a model runs:
    /// the decode budget's scan, prost's decoding, the conversion to tensors.
    pub fn grpc_model_infer(bytes: &[u8]) {
        use crate::grpc_budget::WireBudget;
        use prost::Message;
        if <crate::proto::ModelInferRequest as WireBudget>::check(bytes).is_err() {
            return;
        }
        let Ok(mut request) = crate::proto::ModelInferRequest::decode(bytes) else {
            return;
        };
        let _ = crate::grpc::request_tensors(&mut request);
    }
}
