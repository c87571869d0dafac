//! Open Inference Protocol V2 over gRPC: `inference.GRPCInferenceService`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_format::{DType, NamedTensor, v2};
use tonic::{Request, Response, Status};

use crate::http::spec_shape;
use crate::models::ModelRegistry;
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::{
    self, InferTensorContents, ModelInferRequest, ModelInferResponse, infer_parameter,
    model_infer_response, model_metadata_response,
};
use crate::{Error, NodeConfig, Result};

/// The gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct GrpcService {
    pub registry: Arc<ModelRegistry>,
    pub config: Arc<NodeConfig>,
}

fn status(e: Error) -> Status {
    Status::new(e.grpc_code(), e.to_string())
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadRequest(msg.into())
}

fn shape_of(name: &str, shape: &[i64]) -> Result<Vec<u64>> {
    shape
        .iter()
        .map(|&d| {
            u64::try_from(d).map_err(|_| {
                bad(format!(
                    "tensor {name:?}: negative dimension {d} in shape {shape:?}"
                ))
            })
        })
        .collect()
}

/// Packs typed `contents` into tensor bytes, checking that each value fits the datatype.
fn pack_contents(name: &str, dtype: DType, c: &InferTensorContents) -> Result<Vec<u8>> {
    fn narrow<T: TryFrom<S>, S: Copy + std::fmt::Display>(
        name: &str,
        dtype: DType,
        v: &[S],
        put: impl Fn(T, &mut Vec<u8>),
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for (i, &x) in v.iter().enumerate() {
            let t = T::try_from(x).map_err(|_| {
                bad(format!(
                    "tensor {name:?}: element {i}: {x} does not fit {dtype}"
                ))
            })?;
            put(t, &mut out);
        }
        Ok(out)
    }
    Ok(match dtype {
        DType::Bool => c.bool_contents.iter().map(|&b| u8::from(b)).collect(),
        DType::I8 => narrow::<i8, _>(name, dtype, &c.int_contents, |t, o| {
            o.extend(t.to_le_bytes())
        })?,
        DType::I16 => narrow::<i16, _>(name, dtype, &c.int_contents, |t, o| {
            o.extend(t.to_le_bytes())
        })?,
        DType::I32 => c
            .int_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => c
            .int64_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => narrow::<u8, _>(name, dtype, &c.uint_contents, |t, o| o.push(t))?,
        DType::U16 => narrow::<u16, _>(name, dtype, &c.uint_contents, |t, o| {
            o.extend(t.to_le_bytes())
        })?,
        DType::U32 => c
            .uint_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U64 => c
            .uint64_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F32 => c
            .fp32_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => c
            .fp64_contents
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => {
            return Err(bad(format!(
                "tensor {name:?}: FP16 has no typed contents field; send it in raw_input_contents"
            )));
        }
        DType::Bytes => {
            let mut out = Vec::new();
            for b in &c.bytes_contents {
                let len = u32::try_from(b.len())
                    .map_err(|_| bad(format!("tensor {name:?}: a BYTES element over 4 GiB")))?;
                out.extend(len.to_le_bytes());
                out.extend_from_slice(b);
            }
            out
        }
    })
}

/// The request's inputs as checked tensors: from `raw_input_contents` (one entry per input,
/// the same layout as the HTTP binary extension; moved out of the request, not copied) or
/// from the typed `contents`.
pub(crate) fn request_tensors(r: &mut ModelInferRequest) -> Result<Vec<NamedTensor>> {
    if !r.raw_input_contents.is_empty() && r.raw_input_contents.len() != r.inputs.len() {
        return Err(bad(format!(
            "{} raw_input_contents for {} inputs",
            r.raw_input_contents.len(),
            r.inputs.len()
        )));
    }
    let mut raw = std::mem::take(&mut r.raw_input_contents).into_iter();
    r.inputs
        .iter()
        .map(|input| {
            let name = &input.name;
            let dtype = DType::from_v2_name(&input.datatype).map_err(|e| bad(e.to_string()))?;
            let shape = shape_of(name, &input.shape)?;
            let data = match raw.next() {
                Some(raw) => {
                    if input.contents.is_some() {
                        return Err(bad(format!(
                            "tensor {name:?} has both contents and raw_input_contents"
                        )));
                    }
                    raw
                }
                None => pack_contents(
                    name,
                    dtype,
                    input
                        .contents
                        .as_ref()
                        .unwrap_or(&InferTensorContents::default()),
                )?,
            };
            v2::named_tensor(name, dtype, shape, data).map_err(|e| bad(e.to_string()))
        })
        .collect()
}

fn timeout_param(r: &ModelInferRequest) -> Option<Duration> {
    match r.parameters.get("timeout")?.parameter_choice.as_ref()? {
        infer_parameter::ParameterChoice::Int64Param(us) => u64::try_from(*us).ok(),
        infer_parameter::ParameterChoice::Uint64Param(us) => Some(*us),
        _ => None,
    }
    .filter(|us| *us > 0)
    .map(Duration::from_micros)
}

impl GrpcService {
    async fn model_infer_inner(
        &self,
        mut r: ModelInferRequest,
        labels: &mut (String, String),
    ) -> Result<ModelInferResponse> {
        let version = (!r.model_version.is_empty()).then_some(r.model_version.as_str());
        let served = self.registry.resolve(&r.model_name, version)?;
        labels.1.clone_from(&served.version);
        let inputs = request_tensors(&mut r)?;
        let deadline =
            timeout_param(&r).map_or(self.config.deadline(), |t| t.min(self.config.deadline()));
        let names = served.output_names();
        v2::requested_outputs(&names, r.outputs.iter().map(|o| o.name.as_str()))
            .map_err(|e| bad(e.to_string()))?;
        let request_id = if r.id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            r.id.clone()
        };
        let outcome = self
            .registry
            .infer_recorded(&served, inputs, deadline, &request_id)
            .await?;
        let selected: Vec<&NamedTensor> = if r.outputs.is_empty() {
            outcome.outputs.iter().collect()
        } else {
            r.outputs
                .iter()
                .filter_map(|o| outcome.outputs.iter().find(|t| t.name == o.name))
                .collect()
        };
        Ok(ModelInferResponse {
            model_name: served.name.clone(),
            model_version: served.version.clone(),
            id: request_id,
            parameters: Default::default(),
            outputs: selected
                .iter()
                .map(|t| model_infer_response::InferOutputTensor {
                    name: t.name.clone(),
                    datatype: t.tensor.dtype.v2_name().to_owned(),
                    shape: t
                        .tensor
                        .shape
                        .iter()
                        .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                        .collect(),
                    parameters: Default::default(),
                    contents: None,
                })
                .collect(),
            raw_output_contents: selected.iter().map(|t| t.tensor.data.clone()).collect(),
        })
    }
}

fn tensor_metadata(
    specs: &[capsule_format::TensorSpec],
) -> Vec<model_metadata_response::TensorMetadata> {
    specs
        .iter()
        .map(|s| model_metadata_response::TensorMetadata {
            name: s.name.clone(),
            datatype: s.dtype.v2_name().to_owned(),
            shape: spec_shape(s),
        })
        .collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcService {
    async fn server_live(
        &self,
        _: Request<proto::ServerLiveRequest>,
    ) -> Result<Response<proto::ServerLiveResponse>, Status> {
        Ok(Response::new(proto::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<proto::ServerReadyRequest>,
    ) -> Result<Response<proto::ServerReadyResponse>, Status> {
        Ok(Response::new(proto::ServerReadyResponse {
            ready: self.registry.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<proto::ModelReadyRequest>,
    ) -> Result<Response<proto::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let version = (!r.version.is_empty()).then_some(r.version.as_str());
        match self.registry.resolve(&r.name, version) {
            Ok(_) => Ok(Response::new(proto::ModelReadyResponse { ready: true })),
            Err(Error::NotReady { .. }) => {
                Ok(Response::new(proto::ModelReadyResponse { ready: false }))
            }
            Err(e) => Err(status(e)),
        }
    }

    async fn server_metadata(
        &self,
        _: Request<proto::ServerMetadataRequest>,
    ) -> Result<Response<proto::ServerMetadataResponse>, Status> {
        Ok(Response::new(proto::ServerMetadataResponse {
            name: "capsule".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["binary_tensor_data".into()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<proto::ModelMetadataRequest>,
    ) -> Result<Response<proto::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let version = (!r.version.is_empty()).then_some(r.version.as_str());
        let served = self.registry.resolve(&r.name, version).map_err(status)?;
        let versions = self.registry.versions(&r.name).map_err(status)?;
        let manifest = served.manifest();
        Ok(Response::new(proto::ModelMetadataResponse {
            name: r.name,
            versions: versions.iter().map(|m| m.version.clone()).collect(),
            platform: "capsule".into(),
            inputs: tensor_metadata(&manifest.inputs),
            outputs: tensor_metadata(&manifest.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let request_id = crate::http::request_id_or_new(
            request
                .metadata()
                .get(crate::http::REQUEST_ID)
                .map(|v| v.as_bytes()),
        );
        let span = tracing::info_span!("grpc_infer", request_id = %request_id);
        let r = request.into_inner();
        let mut labels = (r.model_name.clone(), r.model_version.clone());
        let result =
            tracing::Instrument::instrument(self.model_infer_inner(r, &mut labels), span.clone())
                .await;
        if let Err(e) = &result {
            span.in_scope(|| tracing::info!(model = ?labels.0, error = %e, code = ?e.grpc_code(), "inference refused"));
        }
        self.registry
            .metrics
            .observe_request(&labels, "grpc", &result, started);
        result.map(Response::new).map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::model_infer_request;

    fn input(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: InferTensorContents,
    ) -> model_infer_request::InferInputTensor {
        model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents: Some(contents),
        }
    }

    #[test]
    fn typed_contents_and_raw_contents_agree() {
        let mut typed = ModelInferRequest {
            inputs: vec![input(
                "x",
                "FP32",
                vec![2],
                InferTensorContents {
                    fp32_contents: vec![1.0, -2.5],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let mut raw = ModelInferRequest {
            inputs: vec![input("x", "FP32", vec![2], InferTensorContents::default())],
            raw_input_contents: vec![[1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()],
            ..Default::default()
        };
        raw.inputs[0].contents = None;
        assert_eq!(
            request_tensors(&mut typed).unwrap(),
            request_tensors(&mut raw).unwrap()
        );
    }

    #[test]
    fn exact_errors() {
        let mut r = ModelInferRequest {
            inputs: vec![input(
                "x",
                "INT8",
                vec![1],
                InferTensorContents {
                    int_contents: vec![300],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        assert_eq!(
            request_tensors(&mut r).unwrap_err().to_string(),
            "tensor \"x\": element 0: 300 does not fit INT8"
        );
        let mut r = ModelInferRequest {
            inputs: vec![input(
                "x",
                "FP32",
                vec![3],
                InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        assert_eq!(
            request_tensors(&mut r).unwrap_err().to_string(),
            "tensor \"x\": shape [3] of FP32 needs 12 bytes, got 4"
        );
        let mut r = ModelInferRequest {
            inputs: vec![input("x", "FP32", vec![-1], InferTensorContents::default())],
            ..Default::default()
        };
        assert_eq!(
            request_tensors(&mut r).unwrap_err().to_string(),
            "tensor \"x\": negative dimension -1 in shape [-1]"
        );
        let mut r = ModelInferRequest {
            inputs: vec![input("x", "FP32", vec![1], InferTensorContents::default())],
            raw_input_contents: vec![vec![0; 4], vec![0; 4]],
            ..Default::default()
        };
        assert_eq!(
            request_tensors(&mut r).unwrap_err().to_string(),
            "2 raw_input_contents for 1 inputs"
        );
    }
}
