//! The gRPC codec of the node's service: prost's, after a scan of the raw message that bounds
//! what decoding it will allocate.
//!
//! prost builds every structure a message describes before any handler runs. Protobuf encodes
//! an empty repeated sub-message in two bytes, and prost makes a struct of a few hundred bytes
//! of it: one `ModelInferRequest` of 16 MiB holding 8 Mi empty `inputs` took a node from 42 MiB
//! to 2.8 GiB before its handler refused it. [`BoundedCodec`] walks the wire format of a
//! `ModelInferRequest` first (no allocation), charges what each field will cost once decoded
//! (`size_of` of the struct prost makes, the bytes of strings and byte strings, the decoded
//! width of packed numbers), counts the parameters of each map and the dimensions of each
//! shape, and refuses the message with `RESOURCE_EXHAUSTED` when the total passes
//! [`decoded_budget`] of the message's size. Every other request of the service is a name
//! or two and decodes as prost does.

use std::marker::PhantomData;
use std::mem::size_of;

// The caps of a REST request: most dimensions of a shape, most entries of a `parameters` map.
use capsule_format::v2::{MAX_DIMS, MAX_PARAMETERS};
use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use crate::proto::{self, model_infer_request};

/// Bytes the decoded structures of a message of `wire` bytes may take: twice the message, plus
/// 4 MiB. Twice covers typed contents whose numbers encode shorter than they decode (an
/// `int64` token id below 2^21 is three bytes on the wire and eight in memory) for any request
/// of a few MiB; a bigger request of small integers fits in `raw_input_contents`, which costs
/// its own size.
pub(crate) fn decoded_budget(wire: usize) -> usize {
    wire.saturating_mul(2).saturating_add(4 << 20)
}

/// A request message whose decoded size can be bounded from its wire bytes before decoding.
pub(crate) trait WireBudget {
    /// Checks the raw message; `Err` refuses it before prost allocates anything.
    fn check(_wire: &[u8]) -> Result<(), Status> {
        Ok(())
    }
}

impl WireBudget for proto::ModelInferRequest {
    fn check(wire: &[u8]) -> Result<(), Status> {
        let mut budget = Budget {
            left: decoded_budget(wire.len()),
            wire: wire.len(),
        };
        infer_request(wire, &mut budget)
    }
}

// Requests of a name or two (and the client side's responses, which come from the node
// itself or another server the caller chose).
impl WireBudget for proto::ServerLiveRequest {}
impl WireBudget for proto::ServerReadyRequest {}
impl WireBudget for proto::ModelReadyRequest {}
impl WireBudget for proto::ServerMetadataRequest {}
impl WireBudget for proto::ModelMetadataRequest {}
impl WireBudget for proto::ServerLiveResponse {}
impl WireBudget for proto::ServerReadyResponse {}
impl WireBudget for proto::ModelReadyResponse {}
impl WireBudget for proto::ServerMetadataResponse {}
impl WireBudget for proto::ModelMetadataResponse {}
impl WireBudget for proto::ModelInferResponse {}

/// prost's codec with [`WireBudget::check`] before decoding (the generated service's
/// `codec_path`).
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + WireBudget + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

/// Decodes `U` after its [`WireBudget::check`].
#[derive(Debug)]
pub struct BoundedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + WireBudget> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // tonic hands over one whole message (at most the configured message size), which
        // is one contiguous buffer; a split one is made contiguous first.
        if buf.chunk().len() == buf.remaining() {
            U::check(buf.chunk())?;
            U::decode(buf)
        } else {
            let bytes = buf.copy_to_bytes(buf.remaining());
            U::check(&bytes)?;
            U::decode(bytes)
        }
        .map(Some)
        // As prost's own codec: a message that does not parse is INTERNAL.
        .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// What decoding may still allocate.
struct Budget {
    left: usize,
    wire: usize,
}

impl Budget {
    fn charge(&mut self, bytes: usize) -> Result<(), Status> {
        self.left = self.left.checked_sub(bytes).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "the request's {} bytes would decode into more than {} bytes of structures \
                 (many tensors, parameters or elements for its size); send tensor data in \
                 raw_input_contents",
                self.wire,
                decoded_budget(self.wire)
            ))
        })?;
        Ok(())
    }
}

fn malformed(what: &str) -> Status {
    Status::internal(format!("malformed ModelInferRequest: {what}"))
}

/// The value of one field of a message.
enum Field<'a> {
    Varint,
    Fixed,
    Bytes(&'a [u8]),
}

/// Walks the fields of one message.
struct Fields<'a> {
    rest: &'a [u8],
}

fn varint(rest: &mut &[u8]) -> Result<u64, Status> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, tail) = rest
            .split_first()
            .ok_or_else(|| malformed("truncated varint"))?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("varint longer than 10 bytes"))
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Field<'a>), Status>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some((|| {
            let key = varint(&mut self.rest)?;
            let field = match key & 7 {
                0 => {
                    varint(&mut self.rest)?;
                    Field::Varint
                }
                1 | 5 => {
                    let width = if key & 7 == 1 { 8 } else { 4 };
                    self.rest = self
                        .rest
                        .get(width..)
                        .ok_or_else(|| malformed("truncated fixed-width field"))?;
                    Field::Fixed
                }
                2 => {
                    let len = usize::try_from(varint(&mut self.rest)?)
                        .map_err(|_| malformed("length does not fit"))?;
                    if len > self.rest.len() {
                        return Err(malformed("a field runs past the end"));
                    }
                    let (value, rest) = self.rest.split_at(len);
                    self.rest = rest;
                    Field::Bytes(value)
                }
                other => {
                    return Err(malformed(&format!(
                        "wire type {other} (groups or unassigned) is not part of this protocol"
                    )));
                }
            };
            Ok((key >> 3, field))
        })())
    }
}

fn fields(bytes: &[u8]) -> Fields<'_> {
    Fields { rest: bytes }
}

/// Cost of a `string` or `bytes` value in a repeated field or map: its `Vec` and its bytes.
fn owned(bytes: &[u8]) -> usize {
    size_of::<Vec<u8>>() + bytes.len()
}

fn infer_request(wire: &[u8], budget: &mut Budget) -> Result<(), Status> {
    let mut parameters = 0;
    for field in fields(wire) {
        match field? {
            // model_name, model_version, id (the last of each wins; each may repeat)
            (1..=3, Field::Bytes(b)) => budget.charge(b.len())?,
            (4, Field::Bytes(entry)) => map_entry(entry, &mut parameters, budget)?,
            (5, Field::Bytes(input)) => {
                budget.charge(size_of::<model_infer_request::InferInputTensor>())?;
                input_tensor(input, budget)?;
            }
            (6, Field::Bytes(output)) => {
                budget.charge(size_of::<model_infer_request::InferRequestedOutputTensor>())?;
                let mut parameters = 0;
                for field in fields(output) {
                    match field? {
                        (1, Field::Bytes(b)) => budget.charge(b.len())?,
                        (2, Field::Bytes(entry)) => map_entry(entry, &mut parameters, budget)?,
                        _ => {}
                    }
                }
            }
            (7, Field::Bytes(raw)) => budget.charge(owned(raw))?,
            // Unknown fields and wrong wire types: prost skips the one and refuses the other.
            _ => {}
        }
    }
    Ok(())
}

/// One entry of a `map<string, InferParameter>`.
fn map_entry(entry: &[u8], count: &mut usize, budget: &mut Budget) -> Result<(), Status> {
    *count += 1;
    if *count > MAX_PARAMETERS {
        return Err(Status::resource_exhausted(format!(
            "more than {MAX_PARAMETERS} parameters in one map"
        )));
    }
    // A hash map entry: the key, the value, and the table's own slot.
    budget.charge(2 * size_of::<(String, proto::InferParameter)>())?;
    for field in fields(entry) {
        if let (1 | 2, Field::Bytes(b)) = field? {
            budget.charge(b.len())?;
        }
    }
    Ok(())
}

fn input_tensor(input: &[u8], budget: &mut Budget) -> Result<(), Status> {
    let (mut dims, mut parameters) = (0usize, 0);
    for field in fields(input) {
        match field? {
            (1 | 2, Field::Bytes(b)) => budget.charge(b.len())?,
            (3, shape) => {
                let more = match shape {
                    Field::Bytes(packed) => varints(packed),
                    _ => 1,
                };
                dims += more;
                if dims > MAX_DIMS {
                    return Err(Status::invalid_argument(format!(
                        "a shape of more than {MAX_DIMS} dimensions"
                    )));
                }
                budget.charge(more * size_of::<i64>())?;
            }
            (4, Field::Bytes(entry)) => map_entry(entry, &mut parameters, budget)?,
            (5, Field::Bytes(contents)) => {
                budget.charge(size_of::<proto::InferTensorContents>())?;
                tensor_contents(contents, budget)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Number of varints in a packed field: the bytes that end one.
fn varints(packed: &[u8]) -> usize {
    packed.iter().filter(|b| **b & 0x80 == 0).count()
}

fn tensor_contents(contents: &[u8], budget: &mut Budget) -> Result<(), Status> {
    for field in fields(contents) {
        let (number, field) = field?;
        // The width of one decoded element of each typed field.
        let width = match number {
            1 => size_of::<bool>(),
            2 => size_of::<i32>(),
            3 => size_of::<i64>(),
            4 => size_of::<u32>(),
            5 => size_of::<u64>(),
            6 => size_of::<f32>(),
            7 => size_of::<f64>(),
            8 => {
                if let Field::Bytes(b) = field {
                    budget.charge(owned(b))?;
                }
                continue;
            }
            _ => continue,
        };
        let elements = match field {
            // Packed: varints (bool, int and uint types) or fixed-width floats.
            Field::Bytes(packed) if number <= 5 => varints(packed),
            Field::Bytes(packed) => packed.len() / width,
            _ => 1,
        };
        budget.charge(elements.saturating_mul(width))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{InferTensorContents, ModelInferRequest};

    fn encode(r: &ModelInferRequest) -> Vec<u8> {
        r.encode_to_vec()
    }

    fn input(
        name: &str,
        shape: Vec<i64>,
        contents: InferTensorContents,
    ) -> model_infer_request::InferInputTensor {
        model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape,
            parameters: Default::default(),
            contents: Some(contents),
        }
    }

    #[test]
    fn ordinary_requests_pass() {
        let r = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input(
                "x",
                vec![1, 64],
                InferTensorContents {
                    fp32_contents: vec![0.5; 64],
                    ..Default::default()
                },
            )],
            raw_input_contents: vec![],
            ..Default::default()
        };
        assert!(ModelInferRequest::check(&encode(&r)).is_ok());
        // A million int64 token ids of three bytes each: 3 MiB on the wire, 8 MiB decoded.
        let r = ModelInferRequest {
            inputs: vec![input(
                "ids",
                vec![1, 1 << 20],
                InferTensorContents {
                    int64_contents: vec![30_000; 1 << 20],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        assert!(ModelInferRequest::check(&encode(&r)).is_ok());
    }

    /// The probe of issue 16: empty `inputs` entries, two bytes each on the wire. Built as
    /// bytes, so the test does not allocate what it proves the node no longer does.
    #[test]
    fn millions_of_empty_inputs_are_refused_before_decoding() {
        let wire: Vec<u8> = std::iter::repeat_n([5 << 3 | 2, 0], 1 << 20)
            .flatten()
            .collect();
        let e = ModelInferRequest::check(&wire).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        // A thousand empty inputs are fine for the codec (the handler refuses them against
        // the model's signature).
        let wire: Vec<u8> = std::iter::repeat_n([5 << 3 | 2, 0], 1000)
            .flatten()
            .collect();
        assert!(ModelInferRequest::check(&wire).is_ok());
    }

    #[test]
    fn small_integers_decoding_eightfold_are_bounded() {
        // 4 Mi packed int64 zeros: 4 MiB on the wire, 32 MiB decoded.
        let r = ModelInferRequest {
            inputs: vec![input(
                "x",
                vec![1 << 22],
                InferTensorContents {
                    int64_contents: vec![0; 1 << 22],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let e = ModelInferRequest::check(&encode(&r)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("raw_input_contents"), "{e}");
    }

    #[test]
    fn maps_and_shapes_are_counted() {
        let mut parameters = std::collections::HashMap::new();
        for i in 0..=MAX_PARAMETERS {
            parameters.insert(format!("p{i}"), proto::InferParameter::default());
        }
        let r = ModelInferRequest {
            parameters,
            ..Default::default()
        };
        assert_eq!(
            ModelInferRequest::check(&encode(&r)).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        let r = ModelInferRequest {
            inputs: vec![input(
                "x",
                vec![1; MAX_DIMS + 1],
                InferTensorContents::default(),
            )],
            ..Default::default()
        };
        assert_eq!(
            ModelInferRequest::check(&encode(&r)).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn truncated_and_grouped_messages_are_malformed() {
        for wire in [
            &[5 << 3 | 2, 10, 1][..],
            &[0x80],
            &[5 << 3 | 3],
            &[0x08, 0xff],
        ] {
            assert_eq!(
                ModelInferRequest::check(wire).unwrap_err().code(),
                tonic::Code::Internal,
                "{wire:?}"
            );
        }
    }
}

/// The node's gRPC service with every request message charged to the node's
/// [`BodyBudget`](crate::http::BodyBudget) as its bytes arrive, as REST bodies are: a message
/// that would pass the budget fails at once with `RESOURCE_EXHAUSTED`, a stalled upload holds
/// only what it sent, and the charge is given back when tonic drops the body (once the
/// message is decoded). Without it, every gRPC stream could hold a message of
/// `max_body_bytes` at the same time, whatever the REST budget.
#[derive(Debug, Clone)]
pub(crate) struct Budgeted<S> {
    inner: S,
    budget: std::sync::Arc<crate::http::BodyBudget>,
}

impl<S> Budgeted<S> {
    pub(crate) fn new(inner: S, budget: std::sync::Arc<crate::http::BodyBudget>) -> Budgeted<S> {
        Budgeted { inner, budget }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

type GrpcRequest = tonic::codegen::http::Request<tonic::body::Body>;

impl<S: tonic::codegen::Service<GrpcRequest>> tonic::codegen::Service<GrpcRequest> for Budgeted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        let charge = self.budget.charge();
        self.inner
            .call(request.map(|body| tonic::body::Body::new(ChargedBody { body, charge })))
    }
}

/// A request body that charges its data frames to the node's body budget.
struct ChargedBody {
    body: tonic::body::Body,
    charge: crate::http::BodyCharge,
}

impl http_body::Body for ChargedBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.charge.add(data.len() as u64)
                {
                    return Poll::Ready(Some(Err(Status::resource_exhausted(e.to_string()))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
