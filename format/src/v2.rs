//! Open Inference Protocol V2 (KServe / Triton) JSON: request and response bodies.
//!
//! `capsule run` reads and writes these, and the edge node serves them, so the two can never
//! disagree. Tensor `data` may be flat or nested (row-major); its element count must match the
//! shape exactly and every element must fit the datatype.

use std::fmt;
use std::marker::PhantomData;

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::{DType, Error, NamedTensor, Result, Tensor};

/// Most inputs, or requested outputs, of one request.
pub const MAX_TENSORS: usize = 1024;
/// Most dimensions of one tensor's shape.
pub const MAX_DIMS: usize = 64;
/// Most entries of one `parameters` object.
pub const MAX_PARAMETERS: usize = 64;

/// A V2 inference request body.
///
/// Decoding it is bounded by the body: lists are capped ([`MAX_TENSORS`], [`MAX_DIMS`],
/// [`MAX_PARAMETERS`]), parameter values are scalars (booleans, numbers, strings, as the
/// protocol defines them), and each input's elements stay the body's own text
/// ([`TensorData`]) until they are decoded straight into the tensor's bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// Optional request id, echoed in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Optional request parameters.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "parameters"
    )]
    pub parameters: Option<serde_json::Map<String, Value>>,
    /// Input tensors.
    #[serde(deserialize_with = "tensors")]
    pub inputs: Vec<RequestInput>,
    /// Requested outputs (all when absent).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "requested"
    )]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// One input tensor of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestInput {
    /// Input name.
    pub name: String,
    /// Shape.
    #[serde(deserialize_with = "dims")]
    pub shape: Vec<u64>,
    /// Datatype name (`FP32`, ...).
    pub datatype: String,
    /// Optional parameters (`binary_data_size` when the elements follow the JSON part).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "parameters"
    )]
    pub parameters: Option<serde_json::Map<String, Value>>,
    /// Elements, flat or nested (absent when they travel as binary data).
    #[serde(default)]
    pub data: TensorData,
}

/// The elements of a request input as the request's own JSON text (flat or nested arrays,
/// or a scalar), decoded by [`RequestInput::to_named_tensor`] straight into the tensor's
/// bytes once its datatype and shape are known.
///
/// Why not JSON values: `serde_json::Value` takes 32 bytes per element, plus the arrays that
/// hold them, so a 16 MiB body of zeros (`[0,0,...]`, two bytes per element) became more than
/// 500 MiB of values before any check ran. This keeps one copy of the text, and the tensor
/// takes its own size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TensorData(Option<Box<RawValue>>);

impl TensorData {
    /// Elements given as JSON values (nested arrays or a flat list).
    pub fn from_values(values: &[Value]) -> Result<TensorData> {
        serde_json::value::to_raw_value(values)
            .map(|raw| TensorData(Some(raw)))
            .map_err(|e| Error::Encode {
                what: "tensor data",
                reason: e.to_string(),
            })
    }

    /// The JSON text (`null` when absent).
    pub fn json(&self) -> &str {
        self.0.as_deref().map_or("null", RawValue::get)
    }

    /// Absent or `null`: the elements travel as binary data.
    pub fn is_absent(&self) -> bool {
        self.json() == "null"
    }
}

impl PartialEq for TensorData {
    fn eq(&self, other: &TensorData) -> bool {
        self.json() == other.json()
    }
}

/// An output the client asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestedOutput {
    /// Output name.
    pub name: String,
    /// Optional parameters.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "parameters"
    )]
    pub parameters: Option<serde_json::Map<String, Value>>,
}

/// A list of at most `max` items, refused as soon as it has more.
struct Bounded<T> {
    max: usize,
    what: &'static str,
    item: PhantomData<T>,
}

impl<T> Bounded<T> {
    fn new(max: usize, what: &'static str) -> Bounded<T> {
        Bounded {
            max,
            what,
            item: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                return Err(de::Error::custom(format_args!(
                    "more than {} {}",
                    self.max, self.what
                )));
            }
            out.push(item);
        }
        Ok(out)
    }
}

fn dims<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u64>, D::Error> {
    d.deserialize_seq(Bounded::new(MAX_DIMS, "dimensions"))
}

fn tensors<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<RequestInput>, D::Error> {
    d.deserialize_seq(Bounded::new(MAX_TENSORS, "inputs"))
}

fn requested<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<RequestedOutput>>, D::Error> {
    Option::<RequestedOutputs>::deserialize(d).map(|o| o.map(|o| o.0))
}

/// The `outputs` list, bounded as [`tensors`] is.
struct RequestedOutputs(Vec<RequestedOutput>);

impl<'de> Deserialize<'de> for RequestedOutputs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_seq(Bounded::new(MAX_TENSORS, "requested outputs"))
            .map(RequestedOutputs)
    }
}

/// A `parameters` object: at most [`MAX_PARAMETERS`] entries whose values are scalars.
fn parameters<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<serde_json::Map<String, Value>>, D::Error> {
    Option::<Parameters>::deserialize(d).map(|p| p.map(|p| p.0))
}

struct Parameters(serde_json::Map<String, Value>);

impl<'de> Deserialize<'de> for Parameters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Parameters;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an object of at most {MAX_PARAMETERS} parameters")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Parameters, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((key, ParameterValue(value))) = map.next_entry::<String, _>()? {
                    if out.len() == MAX_PARAMETERS {
                        return Err(de::Error::custom(format_args!(
                            "more than {MAX_PARAMETERS} parameters"
                        )));
                    }
                    out.insert(key, value);
                }
                Ok(Parameters(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// A parameter's value: a boolean, a number or a string (the protocol's
/// `$parameter_value`), or null. Lists and objects are refused before they are built.
struct ParameterValue(Value);

impl<'de> Deserialize<'de> for ParameterValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Scalar;
        impl Visitor<'_> for Scalar {
            type Value = ParameterValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean, a number, a string or null")
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<ParameterValue, E> {
                Ok(ParameterValue(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<ParameterValue, E> {
                Ok(ParameterValue(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<ParameterValue, E> {
                Ok(ParameterValue(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<ParameterValue, E> {
                Ok(ParameterValue(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<ParameterValue, E> {
                Ok(ParameterValue(Value::String(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<ParameterValue, E> {
                Ok(ParameterValue(Value::String(v)))
            }
            fn visit_unit<E>(self) -> std::result::Result<ParameterValue, E> {
                Ok(ParameterValue(Value::Null))
            }
        }
        d.deserialize_any(Scalar)
    }
}

/// Most fields of one record given as a JSON object in a BYTES input's data.
const MAX_RECORD_FIELDS: usize = 4096;

/// A record (`{"b64": ...}`, or a tabular row): at most [`MAX_RECORD_FIELDS`] fields whose
/// values are scalars or null (what a tabular pipeline reads; nested values are refused
/// before they are built).
fn record<'de, A: MapAccess<'de>>(
    mut map: A,
) -> std::result::Result<serde_json::Map<String, Value>, A::Error> {
    let mut out = serde_json::Map::new();
    while let Some((key, ParameterValue(value))) = map.next_entry::<String, _>()? {
        if out.len() == MAX_RECORD_FIELDS {
            return Err(de::Error::custom(format_args!(
                "a record has more than {MAX_RECORD_FIELDS} fields"
            )));
        }
        out.insert(key, value);
    }
    Ok(out)
}

/// A V2 inference response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResponse {
    /// Model name.
    pub model_name: String,
    /// Model version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Output tensors.
    pub outputs: Vec<ResponseOutput>,
}

/// One output tensor of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseOutput {
    /// Output name.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Datatype name.
    pub datatype: String,
    /// Elements, flat, row-major.
    pub data: Vec<Value>,
}

impl InferenceRequest {
    /// Parses a request body.
    pub fn from_json(body: &[u8]) -> Result<InferenceRequest> {
        serde_json::from_slice(body).map_err(|e| Error::InvalidRequest(e.to_string()))
    }

    /// Converts every input to a checked [`NamedTensor`].
    pub fn to_tensors(&self) -> Result<Vec<NamedTensor>> {
        self.inputs
            .iter()
            .map(RequestInput::to_named_tensor)
            .collect()
    }

    /// A request carrying these tensors.
    pub fn from_tensors(tensors: &[NamedTensor]) -> Result<InferenceRequest> {
        let inputs = tensors
            .iter()
            .map(|t| {
                Ok(RequestInput {
                    name: t.name.clone(),
                    shape: t.tensor.shape.clone(),
                    datatype: t.tensor.dtype.v2_name().to_owned(),
                    parameters: None,
                    data: TensorData::from_values(&tensor_values(&t.name, &t.tensor)?)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(InferenceRequest {
            id: None,
            parameters: None,
            inputs,
            outputs: None,
        })
    }
}

fn tensor_error(name: &str, reason: impl Into<String>) -> Error {
    Error::InvalidTensor {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

impl RequestInput {
    /// Converts this input to a tensor, checking count and element types.
    pub fn to_named_tensor(&self) -> Result<NamedTensor> {
        let name = &self.name;
        let dtype = DType::from_v2_name(&self.datatype)?;
        let count = crate::tensor::element_count(&self.shape)
            .ok_or_else(|| tensor_error(name, format!("shape {:?} overflows", self.shape)))?;
        let data = decode_elements(self.data.json(), dtype, &self.shape, count)
            .map_err(|r| tensor_error(name, r))?;
        let tensor = Tensor::new(dtype, self.shape.clone(), data)
            .map_err(|e| tensor_error(name, e.to_string()))?;
        Ok(NamedTensor {
            name: name.clone(),
            tensor,
        })
    }
}

/// Nesting deeper than any real tensor is refused (it would only exhaust the stack).
const MAX_NESTING: usize = 64;

/// The elements of `json` (nested arrays flattened in row-major order, or one scalar) encoded
/// as `count` elements of `dtype`, with nothing built per element but the bytes it encodes to
/// (and a string's copy for BYTES). Errors, in the order a reader checks them: nesting, the
/// element count, then the first element that does not fit.
fn decode_elements(
    json: &str,
    dtype: DType,
    shape: &[u64],
    count: u64,
) -> std::result::Result<Vec<u8>, String> {
    // Every element takes at least two characters of text (a digit and a separator), so a
    // shape that claims more cannot be filled and reserves nothing beyond the text's worth.
    let most = (json.len() / 2 + 1) as u64;
    let reserve = count
        .min(most)
        .saturating_mul(dtype.size().unwrap_or(4) as u64);
    let mut sink = Elements {
        dtype,
        want: count,
        seen: 0,
        out: Vec::with_capacity(usize::try_from(reserve).unwrap_or(0)),
        nesting: false,
        error: None,
    };
    let mut de = serde_json::Deserializer::from_str(json);
    let parsed = Element {
        sink: &mut sink,
        depth: 0,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    if sink.nesting {
        return Err(format!("data is nested deeper than {MAX_NESTING} levels"));
    }
    parsed.map_err(|e| format!("data: {e}"))?;
    if sink.seen != count {
        return Err(format!(
            "shape {shape:?} has {count} elements but data has {}",
            sink.seen
        ));
    }
    match sink.error {
        Some(e) => Err(e),
        None => Ok(sink.out),
    }
}

/// Where [`decode_elements`] puts what it reads.
struct Elements {
    dtype: DType,
    /// Elements the shape holds: later ones are counted, not encoded.
    want: u64,
    seen: u64,
    out: Vec<u8>,
    nesting: bool,
    /// The first element that does not fit; later ones are counted, not encoded.
    error: Option<String>,
}

impl Elements {
    /// Whether the next element is encoded (else only counted).
    fn takes(&mut self) -> bool {
        let take = self.seen < self.want && self.error.is_none();
        self.seen += 1;
        take
    }

    fn leaf(&mut self, value: impl FnOnce() -> Value) {
        let index = self.seen;
        if self.takes()
            && let Err(reason) = encode_element(self.dtype, &value(), &mut self.out)
        {
            self.error = Some(format!("element {index}: {reason}"));
        }
    }
}

/// One value of the data at some depth: a list (whose items are elements one level down) or
/// an element.
struct Element<'a> {
    sink: &'a mut Elements,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Element<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        if self.depth > MAX_NESTING {
            self.sink.nesting = true;
            return Err(de::Error::custom("nested too deep"));
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("tensor elements, flat or nested")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while seq
            .next_element_seed(Element {
                sink: &mut *self.sink,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        // A BYTES element (`{"b64": ...}` or a record), or an error for any other type.
        let index = self.sink.seen;
        if self.sink.takes() {
            let value = Value::Object(record(map)?);
            if let Err(reason) = encode_element(self.sink.dtype, &value, &mut self.sink.out) {
                self.sink.error = Some(format!("element {index}: {reason}"));
            }
        } else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        }
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<(), E> {
        self.sink.leaf(|| Value::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<(), E> {
        self.sink.leaf(|| Value::from(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<(), E> {
        self.sink.leaf(|| Value::from(v));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> std::result::Result<(), E> {
        self.sink.leaf(|| Value::from(v));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<(), E> {
        self.sink.leaf(|| Value::String(v.to_owned()));
        Ok(())
    }

    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        self.sink.leaf(|| Value::Null);
        Ok(())
    }
}

fn encode_element(dtype: DType, v: &Value, out: &mut Vec<u8>) -> std::result::Result<(), String> {
    fn int<T: TryFrom<i64> + TryFrom<u64>>(
        v: &Value,
        dtype: DType,
    ) -> std::result::Result<T, String> {
        let out_of_range = || format!("{v} does not fit {dtype}");
        if let Some(i) = v.as_i64() {
            T::try_from(i).map_err(|_| out_of_range())
        } else if let Some(u) = v.as_u64() {
            T::try_from(u).map_err(|_| out_of_range())
        } else {
            Err(format!("expected an integer for {dtype}, got {v}"))
        }
    }
    let float = |v: &Value| {
        v.as_f64()
            .ok_or_else(|| format!("expected a number for {dtype}, got {v}"))
    };
    match dtype {
        DType::Bool => match v {
            Value::Bool(b) => out.push(u8::from(*b)),
            other => return Err(format!("expected true or false for BOOL, got {other}")),
        },
        DType::U8 => out.push(int::<u8>(v, dtype)?),
        DType::I8 => out.extend_from_slice(&int::<i8>(v, dtype)?.to_le_bytes()),
        DType::U16 => out.extend_from_slice(&int::<u16>(v, dtype)?.to_le_bytes()),
        DType::I16 => out.extend_from_slice(&int::<i16>(v, dtype)?.to_le_bytes()),
        DType::U32 => out.extend_from_slice(&int::<u32>(v, dtype)?.to_le_bytes()),
        DType::I32 => out.extend_from_slice(&int::<i32>(v, dtype)?.to_le_bytes()),
        DType::U64 => out.extend_from_slice(&int::<u64>(v, dtype)?.to_le_bytes()),
        DType::I64 => out.extend_from_slice(&int::<i64>(v, dtype)?.to_le_bytes()),
        // JSON numbers are finite; one past the type's range would silently become infinity.
        DType::F16 => {
            let h = f64_to_f16(float(v)?);
            if h & 0x7fff == 0x7c00 {
                return Err(format!("{v} is out of range for FP16"));
            }
            out.extend_from_slice(&h.to_le_bytes())
        }
        DType::F32 => {
            let x = float(v)? as f32;
            if x.is_infinite() {
                return Err(format!("{v} is out of range for FP32"));
            }
            out.extend_from_slice(&x.to_le_bytes())
        }
        DType::F64 => out.extend_from_slice(&float(v)?.to_le_bytes()),
        DType::Bytes => {
            let owned;
            let bytes: &[u8] = match v {
                Value::String(s) => s.as_bytes(),
                // TensorFlow Serving's convention for binary data in JSON.
                Value::Object(o) if o.len() == 1 && o.contains_key("b64") => {
                    let Some(Value::String(b64)) = o.get("b64") else {
                        return Err("\"b64\" must be a base64 string".into());
                    };
                    owned = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| format!("\"b64\" is not valid base64: {e}"))?;
                    &owned
                }
                // A record for a tabular input: kept as its JSON text.
                Value::Object(_) => {
                    owned = serde_json::to_vec(v).map_err(|e| e.to_string())?;
                    &owned
                }
                other => {
                    return Err(format!(
                        "expected a string, {{\"b64\": ...}} or a JSON object for BYTES, got {other}"
                    ));
                }
            };
            let len =
                u32::try_from(bytes.len()).map_err(|_| "element longer than 4 GiB".to_owned())?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
    Ok(())
}

/// `f64` to IEEE half-precision bits (round to nearest even).
fn f64_to_f16(v: f64) -> u16 {
    let x = v as f32;
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rounded = (m + half - 1 + ((m >> shift) & 1)) >> shift;
        return sign | rounded as u16;
    }
    let rounded = mant + 0xfff + ((mant >> 13) & 1);
    if rounded & 0x80_0000 != 0 {
        return sign | (((e + 1) as u16) << 10);
    }
    sign | ((e as u16) << 10) | (rounded >> 13) as u16
}

/// The elements of a tensor as JSON values.
fn tensor_values(name: &str, t: &Tensor) -> Result<Vec<Value>> {
    if t.dtype == DType::Bytes {
        let mut out = Vec::new();
        let mut rest = t.data.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let bytes = tail
                .get(..len)
                .ok_or_else(|| tensor_error(name, "BYTES element is truncated"))?;
            out.push(Value::String(String::from_utf8_lossy(bytes).into_owned()));
            rest = &tail[len..];
        }
        return Ok(out);
    }
    let values = t
        .to_f64_vec()
        .map_err(|e| tensor_error(name, e.to_string()))?;
    Ok(match t.dtype {
        DType::Bool => values.into_iter().map(|v| Value::Bool(v != 0.0)).collect(),
        DType::F16 | DType::F32 | DType::F64 => {
            values.into_iter().map(|v| json_float(t.dtype, v)).collect()
        }
        DType::U64 => t
            .data
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                Value::from(u64::from_le_bytes(b))
            })
            .collect(),
        DType::I64 => t
            .data
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                Value::from(i64::from_le_bytes(b))
            })
            .collect(),
        _ => values.into_iter().map(|v| Value::from(v as i64)).collect(),
    })
}

fn json_float(dtype: DType, v: f64) -> Value {
    // FP32 values are printed from their f32 value, so they round-trip exactly.
    let number = if dtype == DType::F32 {
        serde_json::Number::from_f64(f64::from(v as f32))
    } else {
        serde_json::Number::from_f64(v)
    };
    number.map(Value::Number).unwrap_or(Value::Null)
}

impl ResponseOutput {
    /// The JSON form of one output tensor.
    pub fn from_tensor(t: &NamedTensor) -> Result<ResponseOutput> {
        Ok(ResponseOutput {
            name: t.name.clone(),
            shape: t.tensor.shape.clone(),
            datatype: t.tensor.dtype.v2_name().to_owned(),
            data: tensor_values(&t.name, &t.tensor)?,
        })
    }
}

impl InferenceResponse {
    /// A response carrying these output tensors.
    pub fn from_tensors(
        model_name: &str,
        model_version: Option<String>,
        id: Option<String>,
        outputs: &[NamedTensor],
    ) -> Result<InferenceResponse> {
        let outputs = outputs
            .iter()
            .map(ResponseOutput::from_tensor)
            .collect::<Result<_>>()?;
        Ok(InferenceResponse {
            model_name: model_name.to_owned(),
            model_version,
            id,
            outputs,
        })
    }

    /// Converts the outputs back to tensors.
    pub fn to_tensors(&self) -> Result<Vec<NamedTensor>> {
        self.outputs
            .iter()
            .map(|o| {
                RequestInput {
                    name: o.name.clone(),
                    shape: o.shape.clone(),
                    datatype: o.datatype.clone(),
                    parameters: None,
                    data: TensorData::from_values(&o.data)?,
                }
                .to_named_tensor()
            })
            .collect()
    }
}

/// HTTP header that gives the length of the JSON part of a body carrying binary tensor data
/// (the binary tensor data extension that Triton's clients use).
pub const INFERENCE_HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

fn parameter<'a>(
    parameters: &'a Option<serde_json::Map<String, Value>>,
    key: &str,
) -> Option<&'a Value> {
    parameters.as_ref().and_then(|p| p.get(key))
}

/// A decoded inference request: the JSON part and its inputs as checked tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRequest {
    /// The JSON part (inputs keep their metadata; binary elements are not repeated here).
    pub request: InferenceRequest,
    /// The inputs, in request order.
    pub inputs: Vec<NamedTensor>,
}

/// Decodes a request body. `json_len` is the value of the
/// [`INFERENCE_HEADER_CONTENT_LENGTH`] header: the body is then that many bytes of JSON
/// followed by the binary elements of every input whose parameters carry
/// `binary_data_size`, in input order (BYTES elements each prefixed by a little-endian u32
/// length, as in the extension).
pub fn decode_request(body: &[u8], json_len: Option<usize>) -> Result<DecodedRequest> {
    let (request, binary) = parse_request(body, json_len)?;
    let inputs = decode_inputs(&request, binary)?;
    Ok(DecodedRequest { request, inputs })
}

/// The first half of [`decode_request`]: the JSON part, whose inputs declare their names,
/// datatypes and shapes but whose elements are not decoded yet, and the binary part after
/// it. A server checks the declarations against the model's signature in between, so that
/// a request for the wrong shape never has its elements decoded.
pub fn parse_request(body: &[u8], json_len: Option<usize>) -> Result<(InferenceRequest, &[u8])> {
    let (json, binary) = split_body(body, json_len)?;
    Ok((InferenceRequest::from_json(json)?, binary))
}

/// The second half of [`decode_request`]: every input as a checked tensor, its elements
/// from its JSON `data` or, with `binary_data_size`, from `binary` in input order.
pub fn decode_inputs(request: &InferenceRequest, binary: &[u8]) -> Result<Vec<NamedTensor>> {
    decode_tensors(&request.inputs, binary)
}

/// Splits a body into its JSON part and the binary data after it.
fn split_body(body: &[u8], json_len: Option<usize>) -> Result<(&[u8], &[u8])> {
    let json_len = json_len.unwrap_or(body.len());
    body.split_at_checked(json_len).ok_or_else(|| {
        Error::InvalidRequest(format!(
            "{INFERENCE_HEADER_CONTENT_LENGTH} is {json_len} but the body has only {} bytes",
            body.len()
        ))
    })
}

/// Checked tensors of request inputs (or of response outputs, which have the same JSON
/// shape), taking the elements of those with `binary_data_size` from `binary`, in order.
/// Every binary byte must be claimed.
fn decode_tensors(tensors: &[RequestInput], mut binary: &[u8]) -> Result<Vec<NamedTensor>> {
    let mut out = Vec::with_capacity(tensors.len());
    for input in tensors {
        match parameter(&input.parameters, "binary_data_size") {
            None => out.push(input.to_named_tensor()?),
            Some(size) => {
                let name = &input.name;
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| {
                        tensor_error(name, format!("binary_data_size {size} is not a size"))
                    })?;
                if !input.data.is_absent() {
                    return Err(tensor_error(name, "has both binary_data_size and data"));
                }
                let (bytes, rest) = binary.split_at_checked(size).ok_or_else(|| {
                    tensor_error(
                        name,
                        format!(
                            "binary_data_size {size} but only {} binary bytes remain",
                            binary.len()
                        ),
                    )
                })?;
                binary = rest;
                let dtype = DType::from_v2_name(&input.datatype)?;
                out.push(named_tensor(
                    name,
                    dtype,
                    input.shape.clone(),
                    bytes.to_vec(),
                )?);
            }
        }
    }
    if !binary.is_empty() {
        return Err(Error::InvalidRequest(format!(
            "{} bytes of binary data that no input claims",
            binary.len()
        )));
    }
    Ok(out)
}

/// A named tensor from raw element bytes (the layout of the binary extension and of gRPC's
/// raw contents); a layout error names the tensor.
pub fn named_tensor(
    name: &str,
    dtype: DType,
    shape: Vec<u64>,
    data: Vec<u8>,
) -> Result<NamedTensor> {
    let tensor = Tensor::new(dtype, shape, data).map_err(|e| match e {
        Error::InvalidTensor { reason, .. } => tensor_error(name, reason),
        other => other,
    })?;
    Ok(NamedTensor {
        name: name.to_owned(),
        tensor,
    })
}

/// Encodes a request with every input as binary data and the given outputs asked for as
/// binary data (what Triton's clients send for arrays). Returns the body and the length of
/// its JSON part (the [`INFERENCE_HEADER_CONTENT_LENGTH`] header).
pub fn encode_binary_request(inputs: &[NamedTensor], outputs: &[&str]) -> Result<(Vec<u8>, usize)> {
    let parameters = |key: &str, value: Value| {
        let mut p = serde_json::Map::new();
        p.insert(key.to_owned(), value);
        Some(p)
    };
    let request = InferenceRequest {
        id: None,
        parameters: None,
        inputs: inputs
            .iter()
            .map(|t| RequestInput {
                name: t.name.clone(),
                shape: t.tensor.shape.clone(),
                datatype: t.tensor.dtype.v2_name().to_owned(),
                parameters: parameters("binary_data_size", Value::from(t.tensor.data.len())),
                data: TensorData::default(),
            })
            .collect(),
        outputs: Some(
            outputs
                .iter()
                .map(|n| RequestedOutput {
                    name: (*n).to_owned(),
                    parameters: parameters("binary_data", Value::Bool(true)),
                })
                .collect(),
        ),
    };
    let mut body = serde_json::to_vec(&request).map_err(|e| Error::Encode {
        what: "inference request",
        reason: e.to_string(),
    })?;
    let json_len = body.len();
    for t in inputs {
        body.extend_from_slice(&t.tensor.data);
    }
    Ok((body, json_len))
}

/// The index of output `name` among `output_names` (an unknown name is an error that lists
/// the model's outputs).
pub fn output_index(output_names: &[&str], name: &str) -> Result<usize> {
    output_names.iter().position(|n| *n == name).ok_or_else(|| {
        Error::InvalidRequest(format!(
            "unknown output {name:?} (the model has {output_names:?})"
        ))
    })
}

/// The indices of requested outputs: each a known output, none requested twice (a response
/// carries each output once; one request naming an output 200,000 times made a 53 MB body).
pub fn requested_outputs<'a>(
    output_names: &[&str],
    requested: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<usize>> {
    let mut seen = vec![false; output_names.len()];
    requested
        .into_iter()
        .map(|name| {
            let index = output_index(output_names, name)?;
            if std::mem::replace(&mut seen[index], true) {
                return Err(Error::InvalidRequest(format!(
                    "output {name:?} is requested more than once"
                )));
            }
            Ok(index)
        })
        .collect()
}

/// Which outputs a response carries, and whether each travels as binary data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSelection {
    /// Indices into the model's outputs, in response order, with the binary flag.
    pub outputs: Vec<(usize, bool)>,
}

impl InferenceRequest {
    /// Selects the outputs to return from the model's `output_names`: the requested ones in
    /// request order (an unknown name is an error), or all of them. An output travels as
    /// binary data when its `binary_data` parameter is true, or when the request's
    /// `binary_data_output` parameter is true and the output does not say otherwise.
    pub fn select_outputs(&self, output_names: &[&str]) -> Result<OutputSelection> {
        let all_binary = parameter(&self.parameters, "binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let outputs = match &self.outputs {
            None => (0..output_names.len()).map(|i| (i, all_binary)).collect(),
            Some(requested) => {
                let indices =
                    requested_outputs(output_names, requested.iter().map(|r| r.name.as_str()))?;
                requested
                    .iter()
                    .zip(indices)
                    .map(|(r, index)| {
                        let binary = parameter(&r.parameters, "binary_data")
                            .and_then(Value::as_bool)
                            .unwrap_or(all_binary);
                        (index, binary)
                    })
                    .collect()
            }
        };
        Ok(OutputSelection { outputs })
    }
}

/// An encoded response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedResponse {
    /// The body.
    pub body: Vec<u8>,
    /// Length of its JSON part when binary data follows (the value of the
    /// [`INFERENCE_HEADER_CONTENT_LENGTH`] response header).
    pub json_len: Option<usize>,
}

/// Encodes a response with the selected outputs; binary ones carry `binary_data_size` and
/// their elements follow the JSON part.
pub fn encode_response(
    model_name: &str,
    model_version: Option<String>,
    id: Option<String>,
    outputs: &[NamedTensor],
    selection: &OutputSelection,
) -> Result<EncodedResponse> {
    let mut json_outputs = Vec::with_capacity(selection.outputs.len());
    let mut binary = Vec::new();
    for &(index, as_binary) in &selection.outputs {
        let t = outputs.get(index).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "output {index} is missing from the model's outputs"
            ))
        })?;
        let mut o = serde_json::Map::new();
        o.insert("name".into(), Value::from(t.name.clone()));
        o.insert("datatype".into(), Value::from(t.tensor.dtype.v2_name()));
        o.insert("shape".into(), Value::from(t.tensor.shape.clone()));
        if as_binary {
            let mut p = serde_json::Map::new();
            p.insert("binary_data_size".into(), Value::from(t.tensor.data.len()));
            o.insert("parameters".into(), Value::Object(p));
            binary.extend_from_slice(&t.tensor.data);
        } else {
            o.insert(
                "data".into(),
                Value::Array(tensor_values(&t.name, &t.tensor)?),
            );
        }
        json_outputs.push(Value::Object(o));
    }
    let mut r = serde_json::Map::new();
    r.insert("model_name".into(), Value::from(model_name));
    if let Some(v) = model_version {
        r.insert("model_version".into(), Value::from(v));
    }
    if let Some(id) = id {
        r.insert("id".into(), Value::from(id));
    }
    r.insert("outputs".into(), Value::Array(json_outputs));
    let mut body = serde_json::to_vec(&Value::Object(r)).map_err(|e| Error::Encode {
        what: "inference response",
        reason: e.to_string(),
    })?;
    let json_len =
        (!binary.is_empty() || selection.outputs.iter().any(|o| o.1)).then_some(body.len());
    body.extend_from_slice(&binary);
    Ok(EncodedResponse { body, json_len })
}

/// Decodes a response body (the client side of [`encode_response`]): outputs with
/// `binary_data_size` take their elements from the bytes after the JSON part.
pub fn decode_response(
    body: &[u8],
    json_len: Option<usize>,
) -> Result<(InferenceResponse, Vec<NamedTensor>)> {
    /// A response; its outputs have the JSON shape of request inputs.
    #[derive(Deserialize)]
    struct Raw {
        model_name: String,
        #[serde(default)]
        model_version: Option<String>,
        #[serde(default)]
        id: Option<String>,
        outputs: Vec<RequestInput>,
    }
    let (json, binary) = split_body(body, json_len)?;
    let raw: Raw =
        serde_json::from_slice(json).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    let tensors = decode_tensors(&raw.outputs, binary)?;
    let response = InferenceResponse {
        model_name: raw.model_name,
        model_version: raw.model_version,
        id: raw.id,
        outputs: tensors
            .iter()
            .map(ResponseOutput::from_tensor)
            .collect::<Result<_>>()?,
    };
    Ok((response, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Vec<NamedTensor>> {
        InferenceRequest::from_json(json.as_bytes())?.to_tensors()
    }

    /// The decoder's bounds: each list, object and nesting has a cap, and data is counted
    /// past its shape without being encoded.
    #[test]
    fn decoding_is_bounded() {
        let input = |shape: &str, data: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"FP32","data":{data}}}]}}"#
            )
        };
        let too_many_dims = format!("[{}1]", "1,".repeat(MAX_DIMS));
        let e = InferenceRequest::from_json(input(&too_many_dims, "[1]").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("more than 64 dimensions"), "{e}");
        let ok_dims = format!("[{}1]", "1,".repeat(MAX_DIMS - 1));
        assert_eq!(
            parse(&input(&ok_dims, "[2]")).unwrap()[0]
                .tensor
                .shape
                .len(),
            64
        );

        let params = (0..=MAX_PARAMETERS)
            .map(|i| format!(r#""p{i}":{i}"#))
            .collect::<Vec<_>>()
            .join(",");
        let e = InferenceRequest::from_json(
            format!(r#"{{"parameters":{{{params}}},"inputs":[]}}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("more than 64 parameters"), "{e}");
        // Parameter values are scalars: a list is refused before it is built.
        let e = InferenceRequest::from_json(br#"{"parameters":{"p":[0,0,0]},"inputs":[]}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("a boolean, a number, a string or null"),
            "{e}"
        );
        let ok = InferenceRequest::from_json(
            br#"{"parameters":{"timeout":5,"b":true,"s":"x","f":0.5,"n":null},"inputs":[]}"#,
        )
        .unwrap();
        assert_eq!(ok.parameters.unwrap().len(), 5);

        let inputs = vec![r#"{"name":"x","shape":[],"datatype":"FP32","data":1}"#; MAX_TENSORS + 1];
        let e = InferenceRequest::from_json(
            format!(r#"{{"inputs":[{}]}}"#, inputs.join(",")).as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("more than 1024 inputs"), "{e}");
        let outputs = vec![r#"{"name":"y"}"#; MAX_TENSORS + 1];
        let e = InferenceRequest::from_json(
            format!(r#"{{"inputs":[],"outputs":[{}]}}"#, outputs.join(",")).as_bytes(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("more than 1024 requested outputs"),
            "{e}"
        );

        // More elements than the shape: all counted, none encoded past the shape.
        let e = parse(&input("[2]", "[1,2,3,[4,5]]")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": shape [2] has 2 elements but data has 5"
        );
        // A shape that claims far more than the text holds reserves nothing for it.
        let e = parse(&input("[1,1000000000000]", "[1]")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": shape [1, 1000000000000] has 1000000000000 elements but data has 1"
        );
        // The count is checked before the elements, as before.
        let e = parse(&input("[3]", r#"[1,"a"]"#)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": shape [3] has 3 elements but data has 2"
        );

        // A record in BYTES data holds scalars; a nested value is refused before it is built.
        let bytes = |data: &str| {
            parse(&format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"BYTES","data":{data}}}]}}"#
            ))
        };
        assert!(bytes(r#"[{"a":1,"b":"x","c":null,"d":true}]"#).is_ok());
        let e = bytes(r#"[{"a":[0,0,0]}]"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("a boolean, a number, a string or null"),
            "{e}"
        );
    }

    #[test]
    fn tensor_data_round_trips_and_compares_by_text() {
        let values = vec![Value::from(1), Value::from(2.5)];
        let data = TensorData::from_values(&values).unwrap();
        assert_eq!(data.json(), "[1,2.5]");
        assert!(!data.is_absent());
        assert!(TensorData::default().is_absent());
        let request = InferenceRequest::from_tensors(
            &parse(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2.5]}]}"#)
                .unwrap(),
        )
        .unwrap();
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            InferenceRequest::from_json(text.as_bytes()).unwrap(),
            request
        );
        // From a JSON value too (the golden sample files' readers).
        let input: RequestInput = serde_json::from_value(serde_json::json!(
            {"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2.5]}
        ))
        .unwrap();
        assert_eq!(input.data.json(), "[1,2.5]");
    }

    #[test]
    fn nested_and_flat_data_agree() {
        let a = parse(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}]}"#,
        )
        .unwrap();
        let b = parse(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4.5]}]}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].tensor.to_f64_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.5]);
    }

    #[test]
    fn bytes_take_strings_base64_and_json_records() {
        let t = parse(
            r#"{"inputs":[{"name":"x","shape":[3],"datatype":"BYTES",
                "data":["hi",{"b64":"iVBO"},{"age":41,"city":null}]}]}"#,
        )
        .unwrap();
        let items = crate::byte_elements(&t[0].tensor.data).unwrap();
        assert_eq!(items[0], b"hi");
        assert_eq!(items[1], [0x89, 0x50, 0x4e]);
        assert_eq!(items[2], br#"{"age":41,"city":null}"#);
        let e = parse(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[{"b64":"%%"}]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"b64\" is not valid base64"), "{e}");
        let e = parse(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[3]}]}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("expected a string, {\"b64\": ...} or a JSON object for BYTES, got 3"),
            "{e}"
        );
    }

    /// A float past its type's range is an error, not a silent infinity; the largest finite
    /// values pass.
    #[test]
    fn an_output_is_requested_at_most_once() {
        let names = ["label", "probabilities"];
        assert_eq!(
            requested_outputs(&names, ["probabilities", "label"]).unwrap(),
            [1, 0]
        );
        assert_eq!(
            requested_outputs(&names, ["label", "probabilities", "label"])
                .unwrap_err()
                .to_string(),
            "invalid inference request: output \"label\" is requested more than once"
        );
        assert!(requested_outputs(&names, ["nope"]).is_err());
    }

    #[test]
    fn floats_past_their_range_are_refused() {
        let one = |dtype: &str, x: &str| {
            parse(&format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{dtype}","data":[{x}]}}]}}"#
            ))
        };
        for (dtype, x, shown) in [
            ("FP32", "1e39", "1e+39"),
            ("FP32", "-1e39", "-1e+39"),
            ("FP16", "70000", "70000"),
        ] {
            assert_eq!(
                one(dtype, x).unwrap_err().to_string(),
                format!("tensor \"x\": element 0: {shown} is out of range for {dtype}"),
            );
        }
        let max = one("FP32", "3.4028234663852886e38").unwrap();
        assert_eq!(max[0].tensor.data, f32::MAX.to_le_bytes());
        let max = one("FP16", "65504").unwrap();
        assert_eq!(max[0].tensor.data, 0x7bffu16.to_le_bytes());
    }

    #[test]
    fn exact_errors() {
        let e = parse(r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": shape [3] has 3 elements but data has 2"
        );
        let e = parse(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[300]}]}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": element 0: 300 does not fit INT8"
        );
        let e = parse(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FLOAT","data":[1]}]}"#)
            .unwrap_err();
        assert!(matches!(e, Error::UnknownDType(_)));
        let e = parse(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","data":[1]}]}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": element 0: expected true or false for BOOL, got 1"
        );
        let e = parse(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT32","data":["a"]}]}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": element 0: expected an integer for INT32, got \"a\""
        );
        assert!(matches!(parse("{not json"), Err(Error::InvalidRequest(_))));
        assert!(matches!(
            parse(r#"{"inputs":[],"bogus":1}"#),
            Err(Error::InvalidRequest(_))
        ));
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let e = parse(&format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{deep}}}]}}"#
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": data is nested deeper than 64 levels"
        );
    }

    #[test]
    fn all_dtypes_round_trip_through_json() {
        let json = r#"{"inputs":[
            {"name":"b","shape":[2],"datatype":"BOOL","data":[true,false]},
            {"name":"u8","shape":[1],"datatype":"UINT8","data":[255]},
            {"name":"i64","shape":[2],"datatype":"INT64","data":[-9007199254740993, 5]},
            {"name":"u64","shape":[1],"datatype":"UINT64","data":[18446744073709551615]},
            {"name":"h","shape":[2],"datatype":"FP16","data":[1.5, -0.25]},
            {"name":"f","shape":[1],"datatype":"FP32","data":[0.1]},
            {"name":"d","shape":[1],"datatype":"FP64","data":[0.1]},
            {"name":"s","shape":[2],"datatype":"BYTES","data":["héllo", ""]}
        ]}"#;
        let tensors = parse(json).unwrap();
        let resp = InferenceResponse::from_tensors("m", Some("1".into()), None, &tensors).unwrap();
        assert_eq!(resp.to_tensors().unwrap(), tensors);
        let text = serde_json::to_string(&resp.outputs[5].data).unwrap();
        assert_eq!(text, "[0.10000000149011612]");
    }

    #[test]
    fn f16_rounding() {
        assert_eq!(f64_to_f16(1.0), 0x3c00);
        assert_eq!(f64_to_f16(-2.0), 0xc000);
        assert_eq!(f64_to_f16(65504.0), 0x7bff);
        assert_eq!(f64_to_f16(1e6), 0x7c00);
        assert_eq!(f64_to_f16(5.960464477539063e-8), 0x0001);
        assert_eq!(f64_to_f16(0.0), 0);
    }

    #[test]
    fn binary_tensor_data_round_trips() {
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"s","shape":[1],"datatype":"BYTES","data":["a"]},{"name":"b","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}],"outputs":[{"name":"b","parameters":{"binary_data":true}},{"name":"x"}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2f32).to_le_bytes());
        body.extend_from_slice(&[2, 0, 0, 0, b'h', b'i']);
        let decoded = decode_request(&body, Some(json.len())).unwrap();
        assert_eq!(
            decoded.inputs[0].tensor.to_f64_vec().unwrap(),
            vec![1.5, -2.0]
        );
        assert_eq!(decoded.inputs[2].tensor.data, vec![2, 0, 0, 0, b'h', b'i']);
        let selection = decoded.request.select_outputs(&["x", "s", "b"]).unwrap();
        assert_eq!(selection.outputs, vec![(2, true), (0, false)]);
        let encoded = encode_response(
            "m",
            Some("1".into()),
            Some("r".into()),
            &decoded.inputs,
            &selection,
        )
        .unwrap();
        let json_len = encoded.json_len.unwrap();
        assert_eq!(&encoded.body[json_len..], &[2, 0, 0, 0, b'h', b'i']);
        let (response, tensors) = decode_response(&encoded.body, Some(json_len)).unwrap();
        assert_eq!(response.id.as_deref(), Some("r"));
        assert_eq!(
            tensors,
            vec![decoded.inputs[2].clone(), decoded.inputs[0].clone()]
        );
    }

    #[test]
    fn binary_tensor_data_errors() {
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0; 4]);
        let e = decode_request(&body, Some(json.len())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": binary_data_size 8 but only 4 binary bytes remain"
        );
        body.extend_from_slice(&[0; 8]);
        let e = decode_request(&body, Some(json.len())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid inference request: 4 bytes of binary data that no input claims"
        );
        let e = decode_request(&body, Some(10_000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid inference request: inference-header-content-length is 10000 but the body has only 103 bytes"
        );
        let json = br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0; 8]);
        let e = decode_request(&body, Some(json.len())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor \"x\": shape [3] of FP32 needs 12 bytes, got 8"
        );
        let r =
            InferenceRequest::from_json(br#"{"inputs":[],"outputs":[{"name":"nope"}]}"#).unwrap();
        assert_eq!(
            r.select_outputs(&["y"]).unwrap_err().to_string(),
            "invalid inference request: unknown output \"nope\" (the model has [\"y\"])"
        );
    }
}
