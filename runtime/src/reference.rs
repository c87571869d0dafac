//! Reference statistics for drift detection, computed at build time from training data.
//!
//! The data is a table: named columns of text cells (a CSV file), or an unnamed numeric
//! matrix (a `.npy` file). Columns are matched to the capsule's inputs:
//! - with a tabular pipeline input, each column named after one of its fields describes that
//!   field (numbers and booleans in quantile bins, categories by value);
//! - otherwise a numeric input of shape `[N, F]` takes the table's `F` columns in order.
//!
//! The statistics travel in the manifest, which browsers download: [`ReferencePrivacy`]
//! bounds what they reveal of the training data (coarser bins, rounded edges and extremes,
//! no rare or no category values at all).

use capsule_format::pipeline::{FieldKind, Pipeline};
use capsule_format::telemetry::{FeatureReference, FeatureSource, ReferenceStats};
use capsule_format::{DType, Dim, TensorSpec};

use crate::{Error, Result};

/// Bins of a numeric feature (deciles).
pub const DEFAULT_BINS: usize = 10;

/// What a capsule's reference statistics may reveal of the training data
/// (`capsule build --reference-privacy`). By default the edges of the deciles, each
/// feature's minimum and maximum are exact training values, and the 64 most frequent values
/// of each categorical feature are listed with their counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReferencePrivacy {
    /// Quantile bins per numeric feature (2..=64; default 10, deciles). Fewer bins reveal
    /// fewer training values and detect smaller shifts less well.
    pub bins: usize,
    /// Round bin edges and each feature's minimum and maximum to this many significant
    /// digits (1..=15), so that none is an exact training value; counts follow the rounded
    /// edges.
    pub round_digits: Option<u32>,
    /// Leave out category values seen fewer times than this (rare values identify rows).
    pub min_category_count: u64,
    /// Whether categorical features are in the reference at all (without them their drift
    /// is not watched).
    pub categories: bool,
}

impl Default for ReferencePrivacy {
    fn default() -> Self {
        ReferencePrivacy {
            bins: DEFAULT_BINS,
            round_digits: None,
            min_category_count: 1,
            categories: true,
        }
    }
}

impl std::str::FromStr for ReferencePrivacy {
    type Err = String;

    /// A comma-separated list of `bins=N`, `round=DIGITS`, `min-count=K`, `no-categories`.
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let mut p = ReferencePrivacy::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let number = |range: std::ops::RangeInclusive<u64>| {
                value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| range.contains(n))
                    .ok_or_else(|| {
                        format!("{key}: expected a whole number in {range:?}, not {value:?}")
                    })
            };
            match key {
                "bins" => p.bins = number(2..=64)? as usize,
                "round" => p.round_digits = Some(number(1..=15)? as u32),
                "min-count" => p.min_category_count = number(1..=u64::from(u32::MAX))?,
                "no-categories" if value.is_empty() => p.categories = false,
                _ => {
                    return Err(format!(
                        "unknown option {item:?} (bins=N, round=DIGITS, min-count=K, no-categories)"
                    ));
                }
            }
        }
        Ok(p)
    }
}

impl std::fmt::Display for ReferencePrivacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bins", self.bins)?;
        if let Some(d) = self.round_digits {
            write!(f, ", edges and extremes rounded to {d} significant digits")?;
        }
        if !self.categories {
            write!(f, ", no categories")?;
        } else if self.min_category_count > 1 {
            write!(
                f,
                ", categories seen at least {} times",
                self.min_category_count
            )?;
        }
        Ok(())
    }
}

/// `v` rounded to `digits` significant digits.
fn round_significant(v: f64, digits: u32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let magnitude = v.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits as i32 - 1 - magnitude);
    let rounded = (v * scale).round() / scale;
    if rounded.is_finite() { rounded } else { v }
}

impl ReferencePrivacy {
    /// A numeric feature's statistics under this policy.
    fn numeric(
        &self,
        name: &str,
        source: FeatureSource,
        values: &[Option<f64>],
    ) -> FeatureReference {
        let mut edges = FeatureReference::quantile_edges(values, self.bins);
        let Some(digits) = self.round_digits else {
            return FeatureReference::numeric_with_edges(name, source, values, edges);
        };
        for e in &mut edges {
            *e = round_significant(*e, digits);
        }
        edges.dedup();
        let mut feature = FeatureReference::numeric_with_edges(name, source, values, edges);
        feature.moments.min = round_significant(feature.moments.min, digits);
        feature.moments.max = round_significant(feature.moments.max, digits);
        feature
    }
}

/// What `capsule build --reference` gives the builder: the training data and what its
/// statistics may reveal.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// The training data.
    pub data: ReferenceData,
    /// What the statistics may reveal of it.
    pub privacy: ReferencePrivacy,
}

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
        privacy: &ReferencePrivacy,
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
                    FieldKind::Category if !privacy.categories => continue,
                    FieldKind::Category => FeatureReference::categorical_min_count(
                        &field.name,
                        source,
                        &self.column(index),
                        privacy.min_category_count,
                    ),
                    FieldKind::Number | FieldKind::Boolean => {
                        privacy.numeric(&field.name, source, &self.numbers(index, &field.name)?)
                    }
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
                features.push(privacy.numeric(&name, source, &self.numbers(index, &name)?));
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
        let stats = data
            .statistics(&[spec("x", 2)], None, &ReferencePrivacy::default())
            .unwrap();
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
        let err = data
            .statistics(&[spec("x", 3)], None, &ReferencePrivacy::default())
            .unwrap_err();
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
        let err = data
            .statistics(&[spec("in", 2)], None, &ReferencePrivacy::default())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot build capsule: reference data: column \"b\" row 2: \"x\" is not a number"
        );
        let ok = ReferenceData::Table {
            columns: vec!["a".into(), "b".into()],
            rows: vec![vec!["1".into(), "".into()], vec!["2".into(), "true".into()]],
        };
        let stats = ok
            .statistics(&[spec("in", 2)], None, &ReferencePrivacy::default())
            .unwrap();
        assert_eq!(stats.features[1].missing, 1);
        assert!(matches!(stats.features[0].binning, Binning::Numeric { .. }));
    }

    #[test]
    fn privacy_options_parse_and_refuse_what_they_do_not_know() {
        let p: ReferencePrivacy = "bins=4, round=2,min-count=5,no-categories".parse().unwrap();
        assert_eq!(
            p,
            ReferencePrivacy {
                bins: 4,
                round_digits: Some(2),
                min_category_count: 5,
                categories: false
            }
        );
        assert_eq!(
            "".parse::<ReferencePrivacy>().unwrap(),
            ReferencePrivacy::default()
        );
        for (bad, error) in [
            (
                "bins=1",
                "bins: expected a whole number in 2..=64, not \"1\"",
            ),
            (
                "round=x",
                "round: expected a whole number in 1..=15, not \"x\"",
            ),
            (
                "coarse",
                "unknown option \"coarse\" (bins=N, round=DIGITS, min-count=K, no-categories)",
            ),
            (
                "no-categories=1",
                "unknown option \"no-categories=1\" (bins=N, round=DIGITS, min-count=K, no-categories)",
            ),
        ] {
            assert_eq!(bad.parse::<ReferencePrivacy>().unwrap_err(), error);
        }
    }

    #[test]
    fn rounded_edges_and_extremes_are_not_training_values() {
        let values: Vec<String> = (0..100)
            .map(|i| format!("{}", 1000.0 + f64::from(i) * 1.2345))
            .collect();
        let data = ReferenceData::Table {
            columns: vec!["a".into()],
            rows: values.iter().map(|v| vec![v.clone()]).collect(),
        };
        let exact = data
            .statistics(&[spec("in", 1)], None, &ReferencePrivacy::default())
            .unwrap();
        let private = data
            .statistics(&[spec("in", 1)], None, &"bins=4,round=3".parse().unwrap())
            .unwrap();
        let edges = |s: &ReferenceStats| match &s.features[0].binning {
            Binning::Numeric { edges } => edges.clone(),
            other => panic!("{other:?}"),
        };
        let trained: Vec<f64> = values.iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(edges(&exact).len(), 9);
        assert!(edges(&exact).iter().all(|e| trained.contains(e)));
        assert_eq!(edges(&private), vec![1030.0, 1060.0, 1090.0]);
        let f = &private.features[0];
        assert_eq!((f.moments.min, f.moments.max), (1000.0, 1120.0));
        assert_eq!(f.counts.iter().sum::<u64>(), 100);
        assert!(private.validate().is_ok());
    }

    #[test]
    fn rare_categories_and_all_categories_can_be_left_out() {
        let pipeline: Pipeline = toml::from_str(
            r#"
[[input]]
name = "record"
feeds = "x"
[[input.tabular.fields]]
name = "colour"
type = "category"
categories = ["red", "green", "blue"]
[[input.tabular.fields]]
name = "size"
"#,
        )
        .unwrap();
        let mut rows = Vec::new();
        for (colour, n) in [("red", 6), ("green", 3), ("blue", 1)] {
            for i in 0..n {
                rows.push(vec![colour.to_owned(), format!("{i}")]);
            }
        }
        let data = ReferenceData::Table {
            columns: vec!["colour".into(), "size".into()],
            rows,
        };
        let categories = |p: &str| {
            let stats = data
                .statistics(&[], Some(&pipeline), &p.parse().unwrap())
                .unwrap();
            let names: Vec<String> = stats.features.iter().map(|f| f.name.clone()).collect();
            match &stats.features[0].binning {
                Binning::Categorical { categories } => (names, categories.clone()),
                _ => (names, Vec::new()),
            }
        };
        assert_eq!(categories("").1, ["red", "green", "blue"]);
        assert_eq!(categories("min-count=3").1, ["red", "green"]);
        assert_eq!(categories("no-categories").0, ["size"]);
    }
}
