use serde::{Deserialize, Serialize};

use crate::{DType, Error, Result};

/// A dense tensor: datatype, shape and little-endian packed element bytes.
///
/// `data` holds `product(shape) * dtype.size()` bytes for fixed-size types; for
/// [`DType::Bytes`] it holds `product(shape)` length-prefixed byte strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first. An empty shape is a scalar.
    pub shape: Vec<u64>,
    /// Packed little-endian elements.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A borrowed [`Tensor`] with the same wire layout: decoding a request into views copies no
/// tensor data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Packed little-endian elements.
    #[serde(with = "serde_bytes")]
    pub data: &'a [u8],
}

/// A tensor with the name of the model input or output it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    /// Input or output name.
    pub name: String,
    /// The tensor.
    pub tensor: Tensor,
}

/// Number of elements of `shape`, with overflow checked.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidTensor {
        name: String::new(),
        reason: reason.into(),
    }
}

/// Checks that `data` holds exactly the elements `shape` and `dtype` call for.
pub(crate) fn check_layout(dtype: DType, shape: &[u64], data: &[u8]) -> Result<()> {
    let count =
        element_count(shape).ok_or_else(|| invalid(format!("shape {shape:?} overflows")))?;
    match dtype.size() {
        Some(size) => {
            let expected = count
                .checked_mul(size as u64)
                .ok_or_else(|| invalid(format!("shape {shape:?} of {dtype} overflows")))?;
            if data.len() as u64 != expected {
                return Err(invalid(format!(
                    "shape {shape:?} of {dtype} needs {expected} bytes, got {}",
                    data.len()
                )));
            }
        }
        None => {
            let mut rest = data;
            for i in 0..count {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err(invalid(format!(
                        "BYTES element {i} of {count} is missing its length"
                    )));
                };
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(invalid(format!("BYTES element {i} is truncated")));
                }
                rest = &tail[len..];
            }
            if !rest.is_empty() {
                return Err(invalid(format!(
                    "{} bytes after the last BYTES element",
                    rest.len()
                )));
            }
        }
    }
    Ok(())
}

/// The elements of a `BYTES` tensor's data, in order.
pub fn byte_elements(data: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(invalid(format!(
                "BYTES element {} is missing its length",
                out.len()
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(invalid(format!("BYTES element {} is truncated", out.len())));
        }
        let (item, tail) = tail.split_at(len);
        out.push(item);
        rest = tail;
    }
    Ok(out)
}

impl Tensor {
    /// A `BYTES` tensor of these elements.
    pub fn from_byte_strings<T: AsRef<[u8]>>(shape: Vec<u64>, items: &[T]) -> Result<Tensor> {
        let mut data = Vec::new();
        for item in items {
            let item = item.as_ref();
            let len =
                u32::try_from(item.len()).map_err(|_| invalid("a BYTES element is over 4 GiB"))?;
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(item);
        }
        Tensor::new(DType::Bytes, shape, data)
    }

    /// Builds a tensor after checking that `data` fits `shape` and `dtype`.
    pub fn new(dtype: DType, shape: Vec<u64>, data: Vec<u8>) -> Result<Tensor> {
        check_layout(dtype, &shape, &data)?;
        Ok(Tensor { dtype, shape, data })
    }

    /// An `FP32` tensor from values.
    pub fn from_f32(shape: Vec<u64>, values: &[f32]) -> Result<Tensor> {
        Tensor::new(
            DType::F32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// An `INT64` tensor from values.
    pub fn from_i64(shape: Vec<u64>, values: &[i64]) -> Result<Tensor> {
        Tensor::new(
            DType::I64,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// Number of elements, with overflow checked.
    pub fn element_count(&self) -> Result<u64> {
        element_count(&self.shape)
            .ok_or_else(|| invalid(format!("shape {:?} overflows", self.shape)))
    }

    /// Checks that data, shape and datatype agree.
    pub fn validate(&self) -> Result<()> {
        check_layout(self.dtype, &self.shape, &self.data)
    }

    /// Borrows this tensor as a [`TensorView`].
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            dtype: self.dtype,
            shape: self.shape.clone(),
            data: &self.data,
        }
    }

    /// Every element as `f64` (numeric and boolean types), for comparisons and JSON output.
    /// `BYTES` tensors have no numeric value and give an error.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        self.view().to_f64_vec()
    }
}

macro_rules! decode_le {
    ($data:expr, $ty:ty, $f:expr) => {
        $data
            .chunks_exact(std::mem::size_of::<$ty>())
            .map(|c| {
                let mut b = [0u8; std::mem::size_of::<$ty>()];
                b.copy_from_slice(c);
                #[allow(clippy::redundant_closure_call)]
                $f(<$ty>::from_le_bytes(b))
            })
            .collect()
    };
}

impl TensorView<'_> {
    /// Copies this view into an owned [`Tensor`].
    pub fn to_owned(&self) -> Tensor {
        Tensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            data: self.data.to_vec(),
        }
    }

    /// Checks that data, shape and datatype agree.
    pub fn validate(&self) -> Result<()> {
        check_layout(self.dtype, &self.shape, self.data)
    }

    /// Every element as `f64`; see [`Tensor::to_f64_vec`].
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        self.validate()?;
        let d = self.data;
        Ok(match self.dtype {
            DType::Bool => d.iter().map(|&b| if b != 0 { 1.0 } else { 0.0 }).collect(),
            DType::U8 => d.iter().map(|&b| f64::from(b)).collect(),
            DType::I8 => d.iter().map(|&b| f64::from(b as i8)).collect(),
            DType::U16 => decode_le!(d, u16, f64::from),
            DType::I16 => decode_le!(d, i16, f64::from),
            DType::U32 => decode_le!(d, u32, f64::from),
            DType::I32 => decode_le!(d, i32, f64::from),
            DType::U64 => decode_le!(d, u64, |v: u64| v as f64),
            DType::I64 => decode_le!(d, i64, |v: i64| v as f64),
            DType::F16 => decode_le!(d, u16, f16_to_f64),
            DType::F32 => decode_le!(d, f32, f64::from),
            DType::F64 => decode_le!(d, f64, |v| v),
            DType::Bytes => return Err(invalid("BYTES elements have no numeric value")),
        })
    }
}

/// IEEE 754 half-precision bits to `f64`.
pub(crate) fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_checked() {
        let err = Tensor::new(DType::F32, vec![2, 3], vec![0; 20]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor \"\": shape [2, 3] of FP32 needs 24 bytes, got 20"
        );
        let err = Tensor::new(DType::F32, vec![u64::MAX, 2], vec![]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor \"\": shape [18446744073709551615, 2] overflows"
        );
        assert!(Tensor::new(DType::F64, vec![], vec![0; 8]).is_ok());
    }

    #[test]
    fn bytes_layout_is_checked() {
        let mut data = 3u32.to_le_bytes().to_vec();
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&0u32.to_le_bytes());
        assert!(Tensor::new(DType::Bytes, vec![2], data.clone()).is_ok());
        let err = Tensor::new(DType::Bytes, vec![3], data.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor \"\": BYTES element 2 of 3 is missing its length"
        );
        data.truncate(5);
        let err = Tensor::new(DType::Bytes, vec![1], data).unwrap_err();
        assert_eq!(err.to_string(), "tensor \"\": BYTES element 0 is truncated");
    }

    #[test]
    fn numeric_values() {
        let t = Tensor::from_i64(vec![3], &[-1, 0, 7]).unwrap();
        assert_eq!(t.to_f64_vec().unwrap(), vec![-1.0, 0.0, 7.0]);
        let h = Tensor::new(
            DType::F16,
            vec![3],
            [0x3c00u16, 0xc000, 0x3555]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        )
        .unwrap();
        let v = h.to_f64_vec().unwrap();
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], -2.0);
        assert!((v[2] - 0.333).abs() < 1e-3);
    }
}
