//! The guest ABI messages and their one encoding.
//!
//! Every byte string that crosses the host/guest boundary is one of the types here, encoded by
//! [`encode`] and decoded by [`decode`] (bincode 2, standard configuration, decode size limit).
//! Keeping the encoding behind this module pins the wire format: the golden-bytes tests below
//! fail if a dependency update changes a single byte.

use serde::{Deserialize, Serialize};

use crate::manifest::{Dim, TensorSpec};
use crate::{Error, NamedTensor, Result, TensorView};

/// Largest message either side decodes (bincode refuses to allocate past it).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Encodes a message.
///
/// The message is measured first and then written into a buffer of exactly its size: a
/// growing buffer would reallocate and copy its bytes about twice over, and hold up to twice
/// the message for a moment (an inference's response is most of its outputs' bytes), then
/// reallocate once more when the guest hands it over as a boxed slice.
pub fn encode<T: Serialize + ?Sized>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    let failed = |e: bincode::error::EncodeError| Error::Encode {
        what,
        reason: e.to_string(),
    };
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config()).map_err(failed)?;
    let mut bytes = vec![0; size.bytes_written];
    let written = bincode::serde::encode_into_slice(value, &mut bytes, config()).map_err(failed)?;
    // The same value encodes to the same bytes both times; `truncate` only guards the
    // length if a `Serialize` impl ever told the two passes apart.
    bytes.truncate(written);
    Ok(bytes)
}

/// Decodes a message, refusing trailing bytes.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T> {
    decode_limited::<MAX_MESSAGE_BYTES, T>(bytes, what)
}

/// [`decode`] with a smaller limit on what decoding may claim (`LIMIT` bytes: every string,
/// byte string and sequence counts its length times its element's size), for messages that
/// are small by nature.
pub fn decode_limited<const LIMIT: usize, T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| Error::Decode {
            what,
            reason: e.to_string(),
        })?;
    trailing(bytes, used, what)?;
    Ok(value)
}

/// Decodes a message that borrows from `bytes` (tensor data is not copied).
pub fn decode_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T> {
    let (value, used) =
        bincode::serde::borrow_decode_from_slice(bytes, config()).map_err(|e| Error::Decode {
            what,
            reason: e.to_string(),
        })?;
    trailing(bytes, used, what)?;
    Ok(value)
}

fn trailing(bytes: &[u8], used: usize, what: &'static str) -> Result<()> {
    if used != bytes.len() {
        return Err(Error::Decode {
            what,
            reason: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(())
}

/// An inference request as the host sends it to `capsule_infer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    /// Named inputs.
    pub inputs: Vec<NamedTensor>,
}

/// The guest's borrowed view of an [`InferRequest`] (same encoding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequestView<'a> {
    /// Named inputs.
    #[serde(borrow)]
    pub inputs: Vec<NamedTensorView<'a>>,
}

/// Borrowed views of named tensors (no tensor data copied).
pub fn views(tensors: &[NamedTensor]) -> Vec<NamedTensorView<'_>> {
    tensors
        .iter()
        .map(|t| NamedTensorView {
            name: &t.name,
            tensor: t.tensor.view(),
        })
        .collect()
}

/// Encodes an [`InferRequest`] for these inputs without copying their data first.
pub fn encode_request(inputs: &[NamedTensor]) -> Result<Vec<u8>> {
    encode(
        &InferRequestView {
            inputs: views(inputs),
        },
        "inference request",
    )
}

/// A borrowed [`NamedTensor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTensorView<'a> {
    /// Input name.
    pub name: &'a str,
    /// The tensor.
    #[serde(borrow)]
    pub tensor: TensorView<'a>,
}

/// What kind of failure a guest reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestErrorKind {
    /// The request is malformed or names unknown inputs.
    BadInput,
    /// An input's shape does not fit the model.
    ShapeMismatch,
    /// The model cannot be loaded (unsupported operator, invalid file).
    ModelLoad,
    /// No model is loaded in this instance.
    NotInitialized,
    /// Anything else that went wrong inside the model.
    Internal,
}

/// A typed error reported by the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestError {
    /// Failure class.
    pub kind: GuestErrorKind,
    /// Human-readable cause (tract's error chain for model failures).
    pub message: String,
}

impl std::fmt::Display for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// What `capsule_infer` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InferResponse {
    /// The model's outputs, in manifest order.
    Outputs(Vec<NamedTensor>),
    /// A typed failure.
    Error(GuestError),
}

/// An [`InferResponse`] over borrowed outputs (same encoding): the guest encodes a model's
/// outputs straight from the runtime's tensors, with no owned copy of each first.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum InferResponseView<'a> {
    /// [`InferResponse::Outputs`].
    Outputs(&'a [NamedTensorView<'a>]),
    /// [`InferResponse::Error`].
    Error(&'a GuestError),
}

/// Whether a model gets a second plan for batches of one (its batch dimension concrete):
/// faster for a batch of one, at the cost of the plan's own geometry in the memory image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OneRowPlan {
    /// When what the plan holds on its own (the constants and packed weights it does not
    /// share with the general plan) is at most a quarter of the model's weights, or 1 MiB,
    /// and the weights are at most 256 MiB.
    #[default]
    Auto,
    /// Whenever the model allows it (one symbolic leading dimension shared by its inputs of
    /// symbolic shape).
    Always,
    /// Never: every batch runs the general plan.
    Never,
}

impl std::str::FromStr for OneRowPlan {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<OneRowPlan, String> {
        match s {
            "auto" => Ok(OneRowPlan::Auto),
            "always" => Ok(OneRowPlan::Always),
            "never" => Ok(OneRowPlan::Never),
            other => Err(format!("{other:?}: auto, always or never")),
        }
    }
}

/// What the builder hands to `capsule_build`: the model and how to load it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// The ONNX model bytes.
    #[serde(with = "serde_bytes")]
    pub model: Vec<u8>,
    /// Shapes fixed by the user (`--input-shape`), overriding the model's declarations.
    pub input_shapes: Vec<InputShape>,
    /// Preprocessing and postprocessing to run around the model.
    pub pipeline: Option<crate::Pipeline>,
    /// Class labels (for the `labels` postprocessing step).
    pub labels: Vec<String>,
    /// Whether to make the one-row plan.
    pub one_row_plan: OneRowPlan,
}

/// A user-fixed input shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputShape {
    /// Input name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<Dim>,
}

/// What the model looks like once loaded and optimized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildReport {
    /// Inputs, in order.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in order.
    pub outputs: Vec<TensorSpec>,
    /// Number of nodes in the optimized plan.
    pub node_count: u32,
    /// Whether a second plan serves batches of one ([`OneRowPlan`]).
    pub one_row_plan: bool,
    /// When a one-row plan was made: the bytes of constants and packed weights it holds that
    /// the general plan does not share (kept or not).
    pub one_row_plan_own_bytes: Option<u64>,
    /// `auto`'s limit on those bytes, when the plan was made under `auto`.
    pub one_row_plan_budget: Option<u64>,
}

/// What `capsule_build` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BuildResponse {
    /// The model is loaded.
    Ready(BuildReport),
    /// Loading failed.
    Error(GuestError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Tensor};

    fn request() -> InferRequest {
        InferRequest {
            inputs: vec![NamedTensor {
                name: "x".into(),
                tensor: Tensor::from_f32(vec![1, 2], &[1.0, -2.0]).unwrap(),
            }],
        }
    }

    /// Golden bytes: re-bless only on purpose, with a format version bump.
    #[test]
    fn infer_request_golden_bytes() {
        let bytes = encode(&request(), "request").unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "0101780a020102080000803f000000c0");
    }

    #[test]
    fn borrowed_encoding_is_the_owned_encoding() {
        let r = request();
        assert_eq!(
            encode_request(&r.inputs).unwrap(),
            encode(&r, "request").unwrap()
        );
    }

    #[test]
    fn a_borrowed_response_encodes_as_the_owned_one() {
        let outputs = vec![
            NamedTensor {
                name: "probabilities".into(),
                tensor: Tensor::from_f32(vec![1, 2], &[0.25, 0.75]).unwrap(),
            },
            NamedTensor {
                name: "label".into(),
                tensor: Tensor::from_byte_strings(vec![1], &["seven"]).unwrap(),
            },
        ];
        assert_eq!(
            encode(&InferResponseView::Outputs(&views(&outputs)), "response").unwrap(),
            encode(&InferResponse::Outputs(outputs), "response").unwrap()
        );
        let error = GuestError {
            kind: GuestErrorKind::BadInput,
            message: "no".into(),
        };
        assert_eq!(
            encode(&InferResponseView::Error(&error), "response").unwrap(),
            encode(&InferResponse::Error(error), "response").unwrap()
        );
    }

    #[test]
    fn owned_and_borrowed_decode_agree() {
        let bytes = encode(&request(), "request").unwrap();
        let view: InferRequestView<'_> = decode_borrowed(&bytes, "request").unwrap();
        assert_eq!(view.inputs[0].name, "x");
        assert_eq!(view.inputs[0].tensor.dtype, DType::F32);
        assert_eq!(view.inputs[0].tensor.to_owned(), request().inputs[0].tensor);
        let owned: InferRequest = decode(&bytes, "request").unwrap();
        assert_eq!(owned, request());
    }

    #[test]
    fn refuses_garbage_truncation_and_trailing_bytes() {
        let bytes = encode(&request(), "request").unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode::<InferRequest>(&bytes[..cut], "request").is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let err = decode::<InferRequest>(&longer, "request").unwrap_err();
        assert_eq!(err.to_string(), "cannot decode request: 1 trailing bytes");
        // A length prefix claiming 2^40 elements must fail without allocating them.
        let huge = [1u8, 1, b'x', 10, 1, 0xfd, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(decode::<InferRequest>(&huge, "request").is_err());
    }
}
