use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Element type of a tensor, with the names of the Open Inference Protocol V2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// `BOOL`, one byte per element (0 or 1).
    Bool,
    /// `UINT8`
    U8,
    /// `UINT16`
    U16,
    /// `UINT32`
    U32,
    /// `UINT64`
    U64,
    /// `INT8`
    I8,
    /// `INT16`
    I16,
    /// `INT32`
    I32,
    /// `INT64`
    I64,
    /// `FP16`, IEEE half precision, little-endian bits.
    F16,
    /// `FP32`
    F32,
    /// `FP64`
    F64,
    /// `BYTES`: each element is a byte string, encoded as a little-endian `u32` length
    /// followed by the bytes (the layout of the V2 binary tensor extension).
    Bytes,
}

impl DType {
    /// All datatypes, in protocol order.
    pub const ALL: [DType; 13] = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::Bytes,
    ];

    /// Size in bytes of one element, or `None` for variable-size `BYTES`.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 | DType::F16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
            DType::Bytes => return None,
        })
    }

    /// The protocol name (`"FP32"`, `"INT64"`, ...).
    pub fn v2_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "UINT8",
            DType::U16 => "UINT16",
            DType::U32 => "UINT32",
            DType::U64 => "UINT64",
            DType::I8 => "INT8",
            DType::I16 => "INT16",
            DType::I32 => "INT32",
            DType::I64 => "INT64",
            DType::F16 => "FP16",
            DType::F32 => "FP32",
            DType::F64 => "FP64",
            DType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name.
    pub fn from_v2_name(name: &str) -> Result<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.v2_name() == name)
            .ok_or_else(|| Error::UnknownDType(name.to_owned()))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.v2_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_v2_name(d.v2_name()).unwrap(), d);
        }
        assert!(
            matches!(DType::from_v2_name("FLOAT"), Err(Error::UnknownDType(n)) if n == "FLOAT")
        );
    }
}
