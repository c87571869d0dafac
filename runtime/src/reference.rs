//! Reference statistics for drift detection, computed at build time from training data.
//!
//! The data is a table: named columns of text cells (a CSV file), or an unnamed numeric
//! matrix (a `.npy` file). Columns are matched to the capsule's inputs:
//! - with a tabular pipeline input, each column named after one of its fields describes that
//!   field (numbers and booleans in quantile bins, categories by value);
//! - otherwise a numeric input of shape `[N, F]` takes the table's `F` columns in order.

use capsule_format::pipeline::{FieldKind, Pipeline};
use capsule_format::telemetry::{FeatureReference, FeatureSource, ReferenceStats};
use capsule_format::{DType, Dim, TensorSpec};

use crate::{Error, Result};

/// Bins of a numeric feature (deciles).
pub const DEFAULT_BINS: usize = 10;

/// Training data for the reference statistics.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferenceData {
    /// Named columns of text cells (a CSV file with a header). An empty cell, `NA` or `NaN`
    /// is missing.
    Table {
        /// Column names.
        columns: Vec<String>,
        /// Rows, one cell per column.
        rows: Vec<Vec<String>>,
    },
    /// A row-major numeric matrix (a 2-D `.npy` file), `width` columns.
    Matrix {
        /// Columns per row.
        width: usize,
        /// The values.
        values: Vec<f64>,
    },
}

fn missing(cell: &str) -> bool {
    let c = cell.trim();
    c.is_empty()
        || c.eq_ignore_ascii_case("na")
        || c.eq_ignore_ascii_case("nan")
        || c.eq_ignore_ascii_case("null")
}

fn number(cell: &str, column: &str, row: usize) -> Result<Option<f64>> {
    if missing(cell) {
        return Ok(None);
    }
    let c = cell.trim();
    match c {
        "true" | "True" | "TRUE" => return Ok(Some(1.0)),
        "false" | "False" | "FALSE" => return Ok(Some(0.0)),
        _ => {}
    }
    c.parse::<f64>().map(Some).map_err(|_| {
        Error::Build(format!(
            "reference data: column {column:?} row {}: {c:?} is not a number",
            row + 1
        ))
    })
}

impl ReferenceData {
    fn column(&self, index: usize) -> Vec<Option<String>> {
        match self {
            ReferenceData::Table { rows, .. } => rows
                .iter()
                .map(|r| {
                    r.get(index)
                        .filter(|c| !missing(c))
                        .map(|c| c.trim().to_owned())
                })
                .collect(),
            ReferenceData::Matrix { .. } => Vec::new(),
        }
    }

    fn numbers(&self, index: usize, name: &str) -> Result<Vec<Option<f64>>> {
        match self {
            ReferenceData::Table { rows, .. } => rows
                .iter()
                .enumerate()
                .map(|(i, r)| number(r.get(index).map_or("", String::as_str), name, i))
                .collect(),
            ReferenceData::Matrix { width, values } => Ok(values
                .chunks(*width)
                .map(|row| row.get(index).copied().filter(|v| !v.is_nan()))
                .collect()),
        }
    }

    fn width(&self) -> usize {
        match self {
            ReferenceData::Table { columns, .. } => columns.len(),
            ReferenceData::Matrix { width, .. } => *width,
        }
    }

    fn rows(&self) -> usize {
        match self {
            ReferenceData::Table { rows, .. } => rows.len(),
            ReferenceData::Matrix { width, values } => values.len() / (*width).max(1),
        }
    }

    /// Computes the statistics of every feature the data describes, for a capsule with this
    /// external signature and pipeline.
    pub fn statistics(
        &self,
        inputs: &[TensorSpec],
        pipeline: Option<&Pipeline>,
    ) -> Result<ReferenceStats> {
        if self.rows() == 0 || self.width() == 0 {
            return Err(Error::Build("reference data: no rows".into()));
        }
        let mut features = Vec::new();
        let tabular = pipeline.and_then(|p| {
            p.inputs
                .iter()
                .find_map(|i| i.tabular.as_ref().map(|t| (i.name.as_str(), t)))
        });
        if let (Some((input, spec)), ReferenceData::Table { columns, .. }) = (tabular, self) {
            for field in &spec.fields {
                let Some(index) = columns.iter().position(|c| c.trim() == field.name) else {
                    continue;
                };
                let source = FeatureSource::Field {
                    input: input.to_owned(),
                    field: field.name.clone(),
                };
                features.push(match field.kind {
                    FieldKind::Category => {
                        FeatureReference::categorical(&field.name, source, &self.column(index))
                    }
                    FieldKind::Number | FieldKind::Boolean => FeatureReference::numeric(
                        &field.name,
                        source,
                        &self.numbers(index, &field.name)?,
                        DEFAULT_BINS,
                    ),
                });
            }
            if features.is_empty() {
                return Err(Error::Build(format!(
                    "reference data: no column is named after a field of input {input:?}"
                )));
            }
        } else {
            let width = self.width();
            let input = inputs
                .iter()
                .find(|i| {
                    i.dtype != DType::Bytes
                        && i.shape.len() == 2
                        && i.shape.last() == Some(&Dim::Fixed(width as u64))
                })
                .ok_or_else(|| {
                    Error::Build(format!(
                        "reference data: {width} columns, but no input has shape [N, {width}] \
                         (or a tabular pipeline with fields named like the columns)"
                    ))
                })?;
            for index in 0..width {
                let name = match self {
                    ReferenceData::Table { columns, .. } => columns[index].trim().to_owned(),
                    ReferenceData::Matrix { .. } => format!("{}[{index}]", input.name),
                };
                let source = FeatureSource::Column {
                    input: input.name.clone(),
                    index: u32::try_from(index)
                        .map_err(|_| Error::Build("reference data: too many columns".into()))?,
                };
                features.push(FeatureReference::numeric(
                    &name,
                    source,
                    &self.numbers(index, &name)?,
                    DEFAULT_BINS,
                ));
            }
        }
        let stats = ReferenceStats {
            rows: self.rows() as u64,
            features,
        };
        stats.validate().map_err(|e| Error::Build(e.to_string()))?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_format::telemetry::Binning;

    fn spec(name: &str, width: u64) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(width)],
        }
    }

    #[test]
    fn matrix_columns_map_to_the_input_with_that_width() {
        let data = ReferenceData::Matrix {
            width: 2,
            values: vec![0.0, 10.0, 1.0, 20.0, 2.0, f64::NAN, 3.0, 40.0],
        };
        let stats = data.statistics(&[spec("x", 2)], None).unwrap();
        assert_eq!(stats.rows, 4);
        assert_eq!(stats.features[1].name, "x[1]");
        assert_eq!(stats.features[1].missing, 1);
        assert_eq!(
            stats.features[0].source,
            FeatureSource::Column {
                input: "x".into(),
                index: 0
            }
        );
        let err = data.statistics(&[spec("x", 3)], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot build capsule: reference data: 2 columns, but no input has shape [N, 2] (or a tabular pipeline with fields named like the columns)"
        );
    }

    #[test]
    fn table_cells_parse_or_name_the_bad_one() {
        let data = ReferenceData::Table {
            columns: vec!["a".into(), "b".into()],
            rows: vec![vec!["1".into(), "NA".into()], vec!["2".into(), "x".into()]],
        };
        let err = data.statistics(&[spec("in", 2)], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot build capsule: reference data: column \"b\" row 2: \"x\" is not a number"
        );
        let ok = ReferenceData::Table {
            columns: vec!["a".into(), "b".into()],
            rows: vec![vec!["1".into(), "".into()], vec!["2".into(), "true".into()]],
        };
        let stats = ok.statistics(&[spec("in", 2)], None).unwrap();
        assert_eq!(stats.features[1].missing, 1);
        assert!(matches!(stats.features[0].binning, Binning::Numeric { .. }));
    }
}
