//! `--input name=file.npy`: NumPy arrays as capsule tensors.

use std::path::Path;

use anyhow::{Context, Result, bail};
use capsule_format::{DType, Tensor};
use npyz::{DType as NpyDType, NpyFile, TypeChar};

/// Largest `.npy` file read.
const MAX_NPY_BYTES: u64 = 1 << 30;

fn le_bytes<T: npyz::Deserialize, const N: usize>(
    file: NpyFile<&[u8]>,
    to: fn(T) -> [u8; N],
) -> Result<Vec<u8>> {
    let values: Vec<T> = file.into_vec().context("reading array data")?;
    Ok(values.into_iter().flat_map(to).collect())
}

/// Reads a `.npy` file (C order; numeric and boolean dtypes) into a tensor.
pub fn read(path: &Path) -> Result<Tensor> {
    let bytes = crate::read_limited(path, MAX_NPY_BYTES, "array")?;
    let file = NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    if file.order() != npyz::Order::C {
        bail!(
            "{}: Fortran-order arrays are not supported; save with np.ascontiguousarray",
            path.display()
        );
    }
    let shape = file.shape().to_vec();
    let NpyDType::Plain(ty) = file.dtype() else {
        bail!("{}: structured dtypes are not supported", path.display());
    };
    let (dtype, data) = match (ty.type_char(), ty.size_field()) {
        (TypeChar::Bool, 1) => (DType::Bool, le_bytes::<bool, 1>(file, |v| [u8::from(v)])?),
        (TypeChar::Uint, 1) => (DType::U8, le_bytes::<u8, 1>(file, u8::to_le_bytes)?),
        (TypeChar::Uint, 2) => (DType::U16, le_bytes::<u16, 2>(file, u16::to_le_bytes)?),
        (TypeChar::Uint, 4) => (DType::U32, le_bytes::<u32, 4>(file, u32::to_le_bytes)?),
        (TypeChar::Uint, 8) => (DType::U64, le_bytes::<u64, 8>(file, u64::to_le_bytes)?),
        (TypeChar::Int, 1) => (DType::I8, le_bytes::<i8, 1>(file, i8::to_le_bytes)?),
        (TypeChar::Int, 2) => (DType::I16, le_bytes::<i16, 2>(file, i16::to_le_bytes)?),
        (TypeChar::Int, 4) => (DType::I32, le_bytes::<i32, 4>(file, i32::to_le_bytes)?),
        (TypeChar::Int, 8) => (DType::I64, le_bytes::<i64, 8>(file, i64::to_le_bytes)?),
        (TypeChar::Float, 2) => (
            DType::F16,
            le_bytes::<half::f16, 2>(file, half::f16::to_le_bytes)?,
        ),
        (TypeChar::Float, 4) => (DType::F32, le_bytes::<f32, 4>(file, f32::to_le_bytes)?),
        (TypeChar::Float, 8) => (DType::F64, le_bytes::<f64, 8>(file, f64::to_le_bytes)?),
        (c, s) => bail!(
            "{}: dtype {c:?} of {s} bytes is not supported",
            path.display()
        ),
    };
    Tensor::new(dtype, shape, data).with_context(|| format!("{}", path.display()))
}
