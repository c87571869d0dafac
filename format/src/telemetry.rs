//! Telemetry shared by the node, the hub and the browser SDK: the reference statistics a
//! capsule carries in its manifest, the live statistics a node aggregates per window, the
//! batches it ships to the hub, and the drift measures (PSI and Kolmogorov-Smirnov) the hub
//! computes from both.
//!
//! A feature is one column of a tensor input (`[N, F]`, a row per leading index) or one field
//! of a tabular record input. Its values are counted in fixed bins taken from the training
//! set (quantile edges for numbers, the most frequent values for categories, plus an "other"
//! bin), so a node's histogram and the reference compare bin for bin.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{DType, Error, NamedTensor, Result, byte_elements};

/// Most bins of one numeric feature.
pub const MAX_BINS: usize = 64;
/// Most categories of one categorical feature (besides "other").
pub const MAX_CATEGORIES: usize = 64;
/// Most features a reference describes.
pub const MAX_FEATURES: usize = 4096;
/// Most distinct classes a window counts per model version (others go to `"(other)"`).
pub const MAX_CLASSES: usize = 256;
/// Most predictions (request id and class) a window keeps per model version, for feedback.
pub const MAX_PREDICTIONS: usize = 20_000;
/// Most feedback labels one window keeps.
pub const MAX_FEEDBACK: usize = 20_000;
/// Longest request id, class or label kept (longer ones are cut).
pub const MAX_LABEL_CHARS: usize = 128;
/// Largest encoded batch a hub accepts.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// The class name of everything past [`MAX_CLASSES`].
pub const OTHER_CLASS: &str = "(other)";

/// Upper bounds (milliseconds) of the latency bins; one more bin holds everything slower.
pub const LATENCY_BOUNDS_MS: [f64; 17] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    10000.0, 30000.0,
];

/// Where a feature's values come from in a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSource {
    /// Column `index` of the last axis of a numeric tensor input.
    Column {
        /// Input name.
        input: String,
        /// Index on the last axis.
        index: u32,
    },
    /// A field of the JSON records of a `BYTES` (tabular) input.
    Field {
        /// Input name.
        input: String,
        /// Field name.
        field: String,
    },
}

impl FeatureSource {
    /// The input the feature is read from.
    pub fn input(&self) -> &str {
        match self {
            FeatureSource::Column { input, .. } | FeatureSource::Field { input, .. } => input,
        }
    }
}

/// How values are counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binning {
    /// Bin `i` holds values in `[edges[i-1], edges[i])`; the first bin everything below
    /// `edges[0]`, the last everything from the last edge up. `edges.len() + 1` bins.
    Numeric {
        /// Increasing bin edges.
        edges: Vec<f64>,
    },
    /// One bin per category, then one for every other value. `categories.len() + 1` bins.
    Categorical {
        /// Known categories.
        categories: Vec<String>,
    },
}

impl Binning {
    /// Number of bins.
    pub fn bins(&self) -> usize {
        match self {
            Binning::Numeric { edges } => edges.len() + 1,
            Binning::Categorical { categories } => categories.len() + 1,
        }
    }

    fn bin_number(edges: &[f64], v: f64) -> usize {
        edges.partition_point(|e| *e <= v)
    }

    /// The bin of one value, or `None` for a missing one (absent, null, NaN).
    pub fn bin(&self, value: &Value) -> Option<usize> {
        match (self, value) {
            (_, Value::Null) => None,
            (Binning::Numeric { edges }, Value::Number(n)) => n
                .as_f64()
                .filter(|v| !v.is_nan())
                .map(|v| Binning::bin_number(edges, v)),
            (Binning::Numeric { edges }, Value::Bool(b)) => {
                Some(Binning::bin_number(edges, f64::from(u8::from(*b))))
            }
            (Binning::Numeric { .. }, Value::String(s)) if s.eq_ignore_ascii_case("nan") => None,
            (Binning::Numeric { edges }, _) => Some(edges.len()),
            (Binning::Categorical { categories }, Value::String(s)) => Some(
                categories
                    .iter()
                    .position(|c| c == s)
                    .unwrap_or(categories.len()),
            ),
            (Binning::Categorical { categories }, _) => Some(categories.len()),
        }
    }

    /// The bin of a number.
    pub fn bin_f64(&self, v: f64) -> Option<usize> {
        if v.is_nan() {
            return None;
        }
        Some(match self {
            Binning::Numeric { edges } => Binning::bin_number(edges, v),
            Binning::Categorical { categories } => categories.len(),
        })
    }

    /// A short label of bin `i` (for charts).
    pub fn label(&self, i: usize) -> String {
        match self {
            Binning::Numeric { edges } => {
                match (i.checked_sub(1).and_then(|j| edges.get(j)), edges.get(i)) {
                    (None, Some(hi)) => format!("< {}", short(*hi)),
                    (Some(lo), Some(hi)) => format!("{}–{}", short(*lo), short(*hi)),
                    (Some(lo), None) => format!(">= {}", short(*lo)),
                    (None, None) => "all".into(),
                }
            }
            Binning::Categorical { categories } => categories
                .get(i)
                .cloned()
                .unwrap_or_else(|| OTHER_CLASS.to_owned()),
        }
    }
}

/// A number in at most three significant digits (whole numbers kept whole).
fn short(v: f64) -> String {
    let digits = if v == 0.0 {
        0
    } else {
        v.abs().log10().floor() as i32 + 1
    };
    let decimals = usize::try_from((3 - digits).max(0)).unwrap_or(0);
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    };
    if s == "-0" { "0".into() } else { s }
}

/// Count, sum and sum of squares, minimum and maximum of the present finite values
/// (`min` and `max` are 0 while `count` is 0, so the JSON form never holds an infinity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// Values counted.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The sum of their squares.
    pub sum_sq: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Moments {
    /// Adds one value (infinities and NaN are not counted).
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count = self.count.saturating_add(1);
        self.sum += v;
        self.sum_sq += v * v;
    }

    /// Adds another set of moments.
    pub fn merge(&mut self, other: &Moments) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The mean, if any value was counted.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The population standard deviation, if any value was counted.
    pub fn std(&self) -> Option<f64> {
        let mean = self.mean()?;
        Some(
            (self.sum_sq / self.count as f64 - mean * mean)
                .max(0.0)
                .sqrt(),
        )
    }
}

/// The training-set statistics of one feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureReference {
    /// Feature name (the field name, or `input[i]` for a tensor column).
    pub name: String,
    /// Where its values come from.
    pub source: FeatureSource,
    /// Its bins.
    pub binning: Binning,
    /// Training values per bin.
    pub counts: Vec<u64>,
    /// Missing training values.
    pub missing: u64,
    /// Moments of the numeric training values.
    pub moments: Moments,
}

/// The training-set statistics a capsule carries, for drift detection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReferenceStats {
    /// Training rows they were computed from.
    pub rows: u64,
    /// One entry per feature.
    pub features: Vec<FeatureReference>,
}

fn invalid(reason: String) -> Error {
    Error::InvalidTelemetry(reason)
}

impl FeatureReference {
    /// Statistics of a numeric feature, with up to `bins` bins at the quantiles of `values`
    /// (equal edges merged, so a discrete feature gets one bin per value at most).
    pub fn numeric(
        name: &str,
        source: FeatureSource,
        values: &[Option<f64>],
        bins: usize,
    ) -> FeatureReference {
        Self::numeric_with_edges(name, source, values, Self::quantile_edges(values, bins))
    }

    /// The inner edges of up to `bins` bins at the quantiles of `values` (each edge is a
    /// training value; equal edges merged).
    pub fn quantile_edges(values: &[Option<f64>], bins: usize) -> Vec<f64> {
        let mut present: Vec<f64> = values
            .iter()
            .flatten()
            .copied()
            .filter(|v| !v.is_nan())
            .collect();
        present.sort_by(f64::total_cmp);
        let bins = bins.clamp(1, MAX_BINS);
        let mut edges: Vec<f64> = Vec::new();
        if !present.is_empty() {
            for k in 1..bins {
                let at = (k * present.len()) / bins;
                let Some(&edge) = present.get(at) else {
                    continue;
                };
                // Edges at the minimum would leave an empty first bin.
                if edge > present[0] && edges.last().is_none_or(|last| edge > *last) {
                    edges.push(edge);
                }
            }
        }
        edges
    }

    /// Statistics of a numeric feature binned at `edges` (increasing inner edges).
    pub fn numeric_with_edges(
        name: &str,
        source: FeatureSource,
        values: &[Option<f64>],
        edges: Vec<f64>,
    ) -> FeatureReference {
        let binning = Binning::Numeric { edges };
        let mut counts = vec![0u64; binning.bins()];
        let mut moments = Moments::default();
        let mut missing = 0u64;
        for v in values {
            match v.and_then(|v| binning.bin_f64(v).map(|b| (v, b))) {
                Some((v, b)) => {
                    counts[b] += 1;
                    moments.add(v);
                }
                None => missing += 1,
            }
        }
        FeatureReference {
            name: name.to_owned(),
            source,
            binning,
            counts,
            missing,
            moments,
        }
    }

    /// Statistics of a categorical feature: its most frequent values (at most
    /// [`MAX_CATEGORIES`], ties by name) get a bin each.
    pub fn categorical(
        name: &str,
        source: FeatureSource,
        values: &[Option<String>],
    ) -> FeatureReference {
        Self::categorical_min_count(name, source, values, 1)
    }

    /// Like [`FeatureReference::categorical`], keeping only values seen at least
    /// `min_count` times (the others fall in the "other" bin with every unlisted value).
    pub fn categorical_min_count(
        name: &str,
        source: FeatureSource,
        values: &[Option<String>],
        min_count: u64,
    ) -> FeatureReference {
        let mut freq: BTreeMap<&str, u64> = BTreeMap::new();
        for v in values.iter().flatten() {
            *freq.entry(v.as_str()).or_default() += 1;
        }
        let mut ranked: Vec<(&str, u64)> = freq.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        ranked.retain(|(_, n)| *n >= min_count);
        ranked.truncate(MAX_CATEGORIES);
        let categories: Vec<String> = ranked.iter().map(|(c, _)| (*c).to_owned()).collect();
        let binning = Binning::Categorical { categories };
        let mut counts = vec![0u64; binning.bins()];
        let mut missing = 0u64;
        for v in values {
            match v {
                Some(s) => {
                    if let Some(b) = binning.bin(&Value::String(s.clone())) {
                        counts[b] += 1;
                    }
                }
                None => missing += 1,
            }
        }
        FeatureReference {
            name: name.to_owned(),
            source,
            binning,
            counts,
            missing,
            moments: Moments::default(),
        }
    }

    /// An empty live histogram with this feature's bins.
    pub fn empty_live(&self) -> FeatureHistogram {
        FeatureHistogram {
            name: self.name.clone(),
            counts: vec![0; self.binning.bins()],
            missing: 0,
            moments: Moments::default(),
        }
    }
}

impl ReferenceStats {
    /// Checks what a decoder cannot: bin counts agree with the bins, edges increase, sizes
    /// are bounded and names are unique.
    pub fn validate(&self) -> Result<()> {
        if self.features.len() > MAX_FEATURES {
            return Err(invalid(format!(
                "reference statistics: {} features (at most {MAX_FEATURES})",
                self.features.len()
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for f in &self.features {
            if !names.insert(f.name.as_str()) {
                return Err(invalid(format!(
                    "reference statistics: feature {:?} twice",
                    f.name
                )));
            }
            let ok = match &f.binning {
                Binning::Numeric { edges } => {
                    edges.len() < MAX_BINS
                        && edges.iter().all(|e| e.is_finite())
                        && edges.windows(2).all(|w| w[0] < w[1])
                }
                Binning::Categorical { categories } => categories.len() <= MAX_CATEGORIES,
            };
            if !ok || f.counts.len() != f.binning.bins() {
                return Err(invalid(format!(
                    "reference statistics: feature {:?} has inconsistent bins",
                    f.name
                )));
            }
        }
        Ok(())
    }

    /// Empty live histograms, one per feature, in reference order.
    pub fn empty_live(&self) -> Vec<FeatureHistogram> {
        self.features
            .iter()
            .map(FeatureReference::empty_live)
            .collect()
    }

    /// The reference of one feature.
    pub fn feature(&self, name: &str) -> Option<&FeatureReference> {
        self.features.iter().find(|f| f.name == name)
    }

    /// Counts the features of one request's inputs into `live` (one histogram per reference
    /// feature, in order). Returns the number of rows seen. Inputs the reference does not
    /// name are ignored; an input that cannot be read (not JSON, wrong type) counts its
    /// features as missing for every row it has.
    pub fn observe(&self, inputs: &[NamedTensor], live: &mut [FeatureHistogram]) -> u64 {
        let mut rows_seen = 0u64;
        for input in inputs {
            let features: Vec<usize> = self
                .features
                .iter()
                .enumerate()
                .filter(|(_, f)| f.source.input() == input.name)
                .map(|(i, _)| i)
                .collect();
            if features.is_empty() {
                continue;
            }
            let rows = if input.tensor.dtype == DType::Bytes {
                self.observe_records(input, &features, live)
            } else {
                self.observe_columns(input, &features, live)
            };
            rows_seen = rows_seen.max(rows);
        }
        rows_seen
    }

    fn observe_columns(
        &self,
        input: &NamedTensor,
        features: &[usize],
        live: &mut [FeatureHistogram],
    ) -> u64 {
        let Ok(values) = input.tensor.to_f64_vec() else {
            return 0;
        };
        let width = input
            .tensor
            .shape
            .last()
            .and_then(|w| usize::try_from(*w).ok())
            .filter(|w| *w > 0)
            .unwrap_or(1);
        let mut rows = 0u64;
        for row in values.chunks(width) {
            rows += 1;
            for &i in features {
                let (Some(reference), Some(hist)) = (self.features.get(i), live.get_mut(i)) else {
                    continue;
                };
                let FeatureSource::Column { index, .. } = reference.source else {
                    continue;
                };
                match usize::try_from(index).ok().and_then(|ix| row.get(ix)) {
                    Some(v) => hist.add_f64(&reference.binning, *v),
                    None => hist.count(None, None),
                }
            }
        }
        rows
    }

    fn observe_records(
        &self,
        input: &NamedTensor,
        features: &[usize],
        live: &mut [FeatureHistogram],
    ) -> u64 {
        let Ok(elements) = byte_elements(&input.tensor.data) else {
            return 0;
        };
        let fields: Vec<&str> = features
            .iter()
            .map(|&i| match self.features.get(i).map(|f| &f.source) {
                Some(FeatureSource::Field { field, .. }) => field.as_str(),
                _ => "",
            })
            .collect();
        let mut rows = 0u64;
        for element in elements {
            // Only the features' fields are read, without building a JSON tree.
            let mut de = serde_json::Deserializer::from_slice(element);
            let parsed = serde::de::DeserializeSeed::deserialize(Rows(&fields), &mut de)
                .ok()
                .filter(|_| de.end().is_ok());
            let parsed = parsed.unwrap_or_else(|| vec![vec![Scalar::Missing; fields.len()]]);
            for row in parsed {
                rows += 1;
                for (&i, value) in features.iter().zip(&row) {
                    if let (Some(reference), Some(hist)) = (self.features.get(i), live.get_mut(i)) {
                        hist.add_scalar(&reference.binning, value);
                    }
                }
            }
        }
        rows
    }
}

/// One field's value in a record, as far as binning cares.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Missing,
    Number(f64),
    Text(String),
    Other,
}

/// Deserializes one record element (an object, or an array of objects) into the values of
/// `fields`, one row per object.
struct Rows<'a>(&'a [&'a str]);

/// One record into the values of `fields`.
struct Row<'a>(&'a [&'a str]);

/// A key, as its index among `fields`.
struct FieldIndex<'a>(&'a [&'a str]);

impl<'de> serde::de::DeserializeSeed<'de> for FieldIndex<'_> {
    type Value = Option<usize>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for FieldIndex<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Option<usize>, E> {
        Ok(self.0.iter().position(|f| *f == v))
    }
}

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Scalar, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Scalar, E> {
                Ok(Scalar::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Scalar, E> {
                Ok(Scalar::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Scalar, E> {
                Ok(Scalar::Number(v as f64))
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Scalar, E> {
                Ok(Scalar::Number(f64::from(u8::from(v))))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            fn visit_unit<E>(self) -> std::result::Result<Scalar, E> {
                Ok(Scalar::Missing)
            }
            fn visit_none<E>(self) -> std::result::Result<Scalar, E> {
                Ok(Scalar::Missing)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Scalar, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Scalar, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Row<'_> {
    type Value = Vec<Scalar>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Vec<Scalar>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Row<'_> {
    type Value = Vec<Scalar>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<Vec<Scalar>, A::Error> {
        let mut row = vec![Scalar::Missing; self.0.len()];
        while let Some(index) = a.next_key_seed(FieldIndex(self.0))? {
            match index {
                Some(i) => {
                    let v: Scalar = a.next_value()?;
                    // Every feature naming this field gets the value.
                    for (j, f) in self.0.iter().enumerate() {
                        if *f == self.0[i] {
                            row[j] = v.clone();
                        }
                    }
                }
                None => {
                    a.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(row)
    }
    // Anything but an object is a row whose fields are all missing.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<Vec<Scalar>, A::Error> {
        while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(vec![Scalar::Missing; self.0.len()])
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Vec<Scalar>, E> {
        Ok(vec![Scalar::Missing; self.0.len()])
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Vec<Scalar>, E> {
        Ok(vec![Scalar::Missing; self.0.len()])
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Vec<Scalar>, E> {
        Ok(vec![Scalar::Missing; self.0.len()])
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Vec<Scalar>, E> {
        Ok(vec![Scalar::Missing; self.0.len()])
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Vec<Scalar>, E> {
        Ok(vec![Scalar::Missing; self.0.len()])
    }
    fn visit_unit<E>(self) -> std::result::Result<Vec<Scalar>, E> {
        Ok(vec![Scalar::Missing; self.0.len()])
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Rows<'_> {
    type Value = Vec<Vec<Scalar>>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Vec<Vec<Scalar>>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Rows<'_> {
    type Value = Vec<Vec<Scalar>>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        a: A,
    ) -> std::result::Result<Vec<Vec<Scalar>>, A::Error> {
        Ok(vec![Row(self.0).visit_map(a)?])
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<Vec<Vec<Scalar>>, A::Error> {
        let mut rows = Vec::new();
        while let Some(row) = a.next_element_seed(Row(self.0))? {
            rows.push(row);
        }
        Ok(rows)
    }
}

/// Live counts of one feature in one window, in the reference's bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureHistogram {
    /// Feature name.
    pub name: String,
    /// Values per bin.
    pub counts: Vec<u64>,
    /// Missing values.
    pub missing: u64,
    /// Moments of the numeric values.
    pub moments: Moments,
}

impl FeatureHistogram {
    /// Counts one value.
    pub fn add(&mut self, binning: &Binning, value: Value) {
        match binning.bin(&value) {
            Some(b) => {
                if let Some(c) = self.counts.get_mut(b) {
                    *c = c.saturating_add(1);
                }
                let numeric = match &value {
                    Value::Number(n) => n.as_f64(),
                    Value::Bool(b) => Some(f64::from(u8::from(*b))),
                    _ => None,
                };
                if let Some(v) = numeric.filter(|v| v.is_finite()) {
                    self.moments.add(v);
                }
            }
            None => self.missing = self.missing.saturating_add(1),
        }
    }

    fn count(&mut self, bin: Option<usize>, numeric: Option<f64>) {
        match bin {
            Some(b) => {
                if let Some(c) = self.counts.get_mut(b) {
                    *c = c.saturating_add(1);
                }
                if let Some(v) = numeric {
                    self.moments.add(v);
                }
            }
            None => self.missing = self.missing.saturating_add(1),
        }
    }

    /// Counts one number (NaN is missing).
    pub fn add_f64(&mut self, binning: &Binning, v: f64) {
        self.count(binning.bin_f64(v), Some(v));
    }

    fn add_scalar(&mut self, binning: &Binning, value: &Scalar) {
        match (binning, value) {
            (_, Scalar::Missing) => self.count(None, None),
            (Binning::Numeric { .. }, Scalar::Number(v)) => self.add_f64(binning, *v),
            (Binning::Numeric { .. }, Scalar::Text(t)) if t.eq_ignore_ascii_case("nan") => {
                self.count(None, None)
            }
            (Binning::Numeric { edges }, _) => self.count(Some(edges.len()), None),
            (Binning::Categorical { categories }, Scalar::Text(t)) => self.count(
                Some(
                    categories
                        .iter()
                        .position(|c| c == t)
                        .unwrap_or(categories.len()),
                ),
                None,
            ),
            (Binning::Categorical { categories }, _) => self.count(Some(categories.len()), None),
        }
    }

    /// Adds another window's counts of the same feature (same bins).
    pub fn merge(&mut self, other: &FeatureHistogram) -> Result<()> {
        if other.counts.len() != self.counts.len() {
            return Err(invalid(format!(
                "feature {:?}: {} bins, expected {}",
                self.name,
                other.counts.len(),
                self.counts.len()
            )));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.missing = self.missing.saturating_add(other.missing);
        self.moments.merge(&other.moments);
        Ok(())
    }

    /// Values counted in bins (missing ones excluded).
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Request latencies in fixed bins ([`LATENCY_BOUNDS_MS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Requests per bin.
    pub counts: Vec<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; LATENCY_BOUNDS_MS.len() + 1],
        }
    }
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn observe(&mut self, ms: f64) {
        let b = LATENCY_BOUNDS_MS.partition_point(|bound| *bound < ms);
        if let Some(c) = self.counts.get_mut(b) {
            *c = c.saturating_add(1);
        }
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
    }

    /// The `q` quantile in milliseconds, interpolated linearly inside its bin (Prometheus'
    /// `histogram_quantile`); `None` when empty. The overflow bin answers its lower bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let lo = if i == 0 {
                    0.0
                } else {
                    LATENCY_BOUNDS_MS.get(i - 1).copied().unwrap_or(0.0)
                };
                let Some(&hi) = LATENCY_BOUNDS_MS.get(i) else {
                    return Some(lo);
                };
                return Some(lo + (hi - lo) * ((rank - seen as f64) / c as f64).clamp(0.0, 1.0));
            }
            seen += c;
        }
        LATENCY_BOUNDS_MS.last().copied()
    }
}

/// One prediction kept for feedback: the request (with `/i` for row `i` of a batch of more
/// than one row) and the class the model gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    /// Request id (see [`prediction_id`]).
    pub id: String,
    /// Predicted class.
    pub class: String,
}

/// A ground-truth label for an earlier prediction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// Model name.
    pub model: String,
    /// Request id (see [`prediction_id`]).
    pub id: String,
    /// The true class.
    pub label: String,
}

/// One ground-truth label as clients send it: `{"id": "...", "label": ..., "index": i}`
/// (`index` names row `i` of a request of several rows).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackItem {
    /// Request id.
    pub id: String,
    /// The true class: a string, or a number taken as its decimal text.
    pub label: Value,
    /// The row, for a request of several rows.
    #[serde(default)]
    pub index: Option<usize>,
}

impl FeedbackItem {
    /// The prediction id ([`prediction_id`]'s form) and the label text.
    pub fn resolve(self) -> Result<(String, String)> {
        let label = match self.label {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(invalid(format!(
                    "feedback for {:?}: the label must be a string or a number, not {other}",
                    self.id
                )));
            }
        };
        let id = match self.index {
            Some(i) => format!("{}/{i}", self.id),
            None => self.id,
        };
        Ok((cut(&id), cut(&label)))
    }
}

/// What one model version saw in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelWindow {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Inference requests.
    pub requests: u64,
    /// Requests that failed, by outcome.
    pub errors: BTreeMap<String, u64>,
    /// Rows (records, tensor rows) in the requests.
    pub rows: u64,
    /// Whole request latency.
    pub latency: LatencyHistogram,
    /// Input features, in the reference's order (empty without reference statistics).
    pub features: Vec<FeatureHistogram>,
    /// Predicted classes.
    pub classes: BTreeMap<String, u64>,
    /// Predictions kept for feedback.
    pub predictions: Vec<Prediction>,
    /// Predictions not kept (past [`MAX_PREDICTIONS`]).
    pub predictions_dropped: u64,
}

impl ModelWindow {
    /// Failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Counts one predicted class, folding classes past [`MAX_CLASSES`] into one.
    pub fn count_class(&mut self, class: &str) {
        let key = if self.classes.contains_key(class) || self.classes.len() < MAX_CLASSES {
            cut(class)
        } else {
            OTHER_CLASS.to_owned()
        };
        let c = self.classes.entry(key).or_default();
        *c = c.saturating_add(1);
    }

    /// Adds another window of the same model version.
    pub fn merge(&mut self, other: &ModelWindow) -> Result<()> {
        self.requests = self.requests.saturating_add(other.requests);
        self.rows = self.rows.saturating_add(other.rows);
        for (k, v) in &other.errors {
            let e = self.errors.entry(k.clone()).or_default();
            *e = e.saturating_add(*v);
        }
        self.latency.merge(&other.latency);
        if self.features.is_empty() {
            self.features = other.features.clone();
        } else if !other.features.is_empty() {
            if self.features.len() != other.features.len() {
                return Err(invalid(format!(
                    "{} {}: {} features, expected {}",
                    self.model,
                    self.version,
                    other.features.len(),
                    self.features.len()
                )));
            }
            for (a, b) in self.features.iter_mut().zip(&other.features) {
                a.merge(b)?;
            }
        }
        for (k, v) in &other.classes {
            let c = self.classes.entry(k.clone()).or_default();
            *c = c.saturating_add(*v);
        }
        self.predictions_dropped = self
            .predictions_dropped
            .saturating_add(other.predictions_dropped);
        Ok(())
    }
}

/// One window of a node's telemetry, as shipped to the hub. `(node_id, seq)` identifies it,
/// so the hub stores a retried batch once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// The node (or browser) that recorded it.
    pub node_id: String,
    /// Its sequence number on that node, from 1, never reused.
    pub seq: u64,
    /// Window start, milliseconds since the Unix epoch.
    pub window_start_ms: u64,
    /// Window end.
    pub window_end_ms: u64,
    /// Batches the node has dropped from its full buffer so far (cumulative).
    pub dropped_batches: u64,
    /// Requests in those batches (cumulative).
    pub dropped_requests: u64,
    /// Per model version.
    pub models: Vec<ModelWindow>,
    /// Feedback labels received in the window.
    pub feedback: Vec<Feedback>,
}

fn json_len<T: Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

impl TelemetryBatch {
    /// Splits the batch into batches of the same node and window whose JSON encoding is at
    /// most `limit` bytes each (a hub refuses larger ones, [`MAX_BATCH_BYTES`], and a batch
    /// refused for its size would be retried forever). A model version's window that does
    /// not fit on its own is cut between its predictions: the first part keeps its counts,
    /// histograms and classes, the others carry only predictions (zero requests). Feedback
    /// is cut the same way. The parts' `seq` is left to the caller. Nothing is dropped unless
    /// one prediction or feedback item is alone over the limit (impossible for the limits
    /// of this module: ids and labels are cut to [`MAX_LABEL_CHARS`]).
    pub fn split_to_fit(self, limit: usize) -> Vec<TelemetryBatch> {
        if json_len(&self) <= limit {
            return vec![self];
        }
        let empty = TelemetryBatch {
            models: Vec::new(),
            feedback: Vec::new(),
            ..self.clone()
        };
        let base = json_len(&empty);
        // Pieces no larger than the room one batch has, each a model window or feedback.
        let room = limit.saturating_sub(base + 2);
        let mut models = Vec::new();
        for mut m in self.models {
            if json_len(&m) <= room {
                models.push(m);
                continue;
            }
            let predictions = std::mem::take(&mut m.predictions);
            let mut part = m;
            let mut used = json_len(&part);
            for p in predictions {
                let n = json_len(&p) + 1;
                if !part.predictions.is_empty() && used + n > room {
                    let next = ModelWindow {
                        model: part.model.clone(),
                        version: part.version.clone(),
                        ..ModelWindow::default()
                    };
                    models.push(std::mem::replace(&mut part, next));
                    used = json_len(&part);
                }
                used += n;
                part.predictions.push(p);
            }
            models.push(part);
        }
        let mut feedback_parts: Vec<Vec<Feedback>> = vec![Vec::new()];
        let mut used = 2;
        for f in self.feedback {
            let n = json_len(&f) + 1;
            if used + n > room
                && let Some(last) = feedback_parts.last()
                && !last.is_empty()
            {
                feedback_parts.push(Vec::new());
                used = 2;
            }
            used += n;
            if let Some(last) = feedback_parts.last_mut() {
                last.push(f);
            }
        }
        // Greedy packing, in order.
        let mut out: Vec<TelemetryBatch> = Vec::new();
        let mut current = empty.clone();
        let mut used = base;
        for m in models {
            let n = json_len(&m) + 1;
            if !current.models.is_empty() && used + n > limit {
                out.push(std::mem::replace(&mut current, empty.clone()));
                used = base;
            }
            used += n;
            current.models.push(m);
        }
        for f in feedback_parts.into_iter().filter(|f| !f.is_empty()) {
            let n = json_len(&f);
            if !(current.models.is_empty() && current.feedback.is_empty()) && used + n > limit {
                out.push(std::mem::replace(&mut current, empty.clone()));
                used = base;
            }
            used += n;
            current.feedback.extend(f);
        }
        if !(current.models.is_empty() && current.feedback.is_empty()) {
            out.push(current);
        }
        out
    }

    /// Requests in the batch.
    pub fn requests(&self) -> u64 {
        self.models.iter().map(|m| m.requests).sum()
    }

    /// Checks the bounds a decoder cannot.
    pub fn validate(&self) -> Result<()> {
        let long = |s: &str| s.chars().count() > MAX_LABEL_CHARS;
        if self.seq == 0 || self.window_end_ms < self.window_start_ms {
            return Err(invalid(format!(
                "batch {}: bad sequence or window",
                self.seq
            )));
        }
        if self.feedback.len() > MAX_FEEDBACK
            || self.feedback.iter().any(|f| long(&f.id) || long(&f.label))
        {
            return Err(invalid(format!("batch {}: too much feedback", self.seq)));
        }
        for m in &self.models {
            if m.predictions.len() > MAX_PREDICTIONS
                || m.classes.len() > MAX_CLASSES + 1
                || m.features.len() > MAX_FEATURES
                || m.features
                    .iter()
                    .any(|f| f.counts.len() > MAX_CATEGORIES.max(MAX_BINS) + 1)
                || m.latency.counts.len() != LATENCY_BOUNDS_MS.len() + 1
            {
                return Err(invalid(format!(
                    "batch {}: model {} {} is out of bounds",
                    self.seq, m.model, m.version
                )));
            }
        }
        Ok(())
    }
}

/// Cuts a request id, class or label to [`MAX_LABEL_CHARS`].
pub fn cut(s: &str) -> String {
    s.chars().take(MAX_LABEL_CHARS).collect()
}

/// The id a prediction is kept under: the request id for a one-row request, `id/i` for
/// row `i` of a larger one. Feedback names predictions the same way.
pub fn prediction_id(request_id: &str, row: usize, rows: usize) -> String {
    if rows <= 1 {
        cut(request_id)
    } else {
        cut(&format!("{request_id}/{row}"))
    }
}

/// The predicted class of each row, from the first output: a `BYTES` output is the class
/// itself (a label), an integer output a class index (named by `labels` when it has one),
/// and a floating-point output of rank 2 or more a score per class (its argmax). Other
/// outputs (a regression, an embedding of rank 1) give no class.
pub fn classes(outputs: &[NamedTensor], labels: &[String]) -> Vec<String> {
    let Some(first) = outputs.first() else {
        return Vec::new();
    };
    let t = &first.tensor;
    let name = |i: i64| -> String {
        usize::try_from(i)
            .ok()
            .and_then(|i| labels.get(i))
            .cloned()
            .unwrap_or_else(|| i.to_string())
    };
    // Values per row: the last dimension of a rank-2+ output, else one.
    let width = if t.shape.len() >= 2 {
        t.shape
            .last()
            .and_then(|w| usize::try_from(*w).ok())
            .unwrap_or(1)
            .max(1)
    } else {
        1
    };
    match t.dtype {
        DType::Bytes => {
            let Ok(elements) = byte_elements(&t.data) else {
                return Vec::new();
            };
            // A [N, k] label output (top-k) gives each row its first label.
            elements
                .chunks(width)
                .filter_map(|row| row.first())
                .map(|e| cut(&String::from_utf8_lossy(e)))
                .collect()
        }
        DType::F16 | DType::F32 | DType::F64 => {
            let Ok(values) = t.to_f64_vec() else {
                return Vec::new();
            };
            // Scores need a row of at least two classes.
            if t.shape.len() < 2 || width < 2 {
                return Vec::new();
            }
            values
                .chunks(width)
                .map(|row| {
                    let best = row
                        .iter()
                        .enumerate()
                        .fold((0usize, f64::NEG_INFINITY), |best, (i, &v)| {
                            if v > best.1 { (i, v) } else { best }
                        })
                        .0;
                    name(i64::try_from(best).unwrap_or(0))
                })
                .collect()
        }
        _ => {
            let Ok(values) = t.to_f64_vec() else {
                return Vec::new();
            };
            values
                .chunks(width)
                .filter_map(|row| row.first())
                .map(|v| name(*v as i64))
                .collect()
        }
    }
}

/// Smallest proportion a bin is given in [`psi`], so an empty bin does not make it infinite.
pub const PSI_EPSILON: f64 = 1e-4;

/// Population stability index of `live` against `reference` (same bins):
/// `sum((l - r) * ln(l / r))` over bin proportions. `None` when either is empty or the bins
/// differ.
pub fn psi(reference: &[u64], live: &[u64]) -> Option<f64> {
    let (rt, lt) = totals(reference, live)?;
    Some(
        reference
            .iter()
            .zip(live)
            .map(|(&r, &l)| {
                let r = (r as f64 / rt).max(PSI_EPSILON);
                let l = (l as f64 / lt).max(PSI_EPSILON);
                (l - r) * (l / r).ln()
            })
            .sum(),
    )
}

/// The Kolmogorov-Smirnov statistic of `live` against `reference` over the same ordered bins:
/// the largest difference of their cumulative proportions at a bin edge (a lower bound of
/// the statistic on the raw values). `None` when either is empty or the bins differ.
pub fn ks(reference: &[u64], live: &[u64]) -> Option<f64> {
    let (rt, lt) = totals(reference, live)?;
    let (mut rc, mut lc, mut d) = (0u64, 0u64, 0f64);
    for (&r, &l) in reference.iter().zip(live) {
        rc += r;
        lc += l;
        d = d.max((rc as f64 / rt - lc as f64 / lt).abs());
    }
    Some(d)
}

fn totals(reference: &[u64], live: &[u64]) -> Option<(f64, f64)> {
    let rt: u64 = reference.iter().sum();
    let lt: u64 = live.iter().sum();
    (reference.len() == live.len() && rt > 0 && lt > 0).then_some((rt as f64, lt as f64))
}

/// The drift of one feature in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDrift {
    /// Feature name.
    pub feature: String,
    /// Population stability index.
    pub psi: f64,
    /// Kolmogorov-Smirnov statistic (numeric features only).
    pub ks: Option<f64>,
    /// Live values counted.
    pub count: u64,
    /// Live missing values.
    pub missing: u64,
    /// Live mean.
    pub mean: Option<f64>,
    /// Training mean.
    pub reference_mean: Option<f64>,
}

/// PSI and KS of every feature that has live values.
pub fn drift(reference: &ReferenceStats, live: &[FeatureHistogram]) -> Vec<FeatureDrift> {
    reference
        .features
        .iter()
        .zip(live)
        .filter_map(|(r, l)| {
            let psi = psi(&r.counts, &l.counts)?;
            let ks = match r.binning {
                Binning::Numeric { .. } => ks(&r.counts, &l.counts),
                Binning::Categorical { .. } => None,
            };
            Some(FeatureDrift {
                feature: r.name.clone(),
                psi,
                ks,
                count: l.total(),
                missing: l.missing,
                mean: l.moments.mean(),
                reference_mean: r.moments.mean(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    /// Issue 16: a window's batch could exceed what a hub accepts ([`MAX_BATCH_BYTES`]) and be
    /// refused with 413 on every retry, blocking the node's buffer. It is split instead, and
    /// nothing is lost: every prediction, feedback item and request is in exactly one part.
    #[test]
    fn a_batch_over_the_limit_is_split_losing_nothing() {
        let predictions = |model: &str, n: usize| -> Vec<Prediction> {
            (0..n)
                .map(|i| Prediction {
                    id: format!("{model}-{i:0>100}"),
                    class: "cat".into(),
                })
                .collect()
        };
        let window = |model: &str, requests: u64, n: usize| ModelWindow {
            model: model.into(),
            version: "1".into(),
            requests,
            predictions: predictions(model, n),
            ..ModelWindow::default()
        };
        let batch = TelemetryBatch {
            node_id: "n".into(),
            seq: 0,
            window_start_ms: 1,
            window_end_ms: 2,
            models: vec![
                window("a", 5, 20_000),
                window("b", 7, 10),
                window("c", 1, 15_000),
            ],
            feedback: (0..20_000)
                .map(|i| Feedback {
                    model: "a".into(),
                    id: format!("a-{i:0>100}"),
                    label: "dog".into(),
                })
                .collect(),
            ..TelemetryBatch::default()
        };
        let whole = json_len(&batch);
        let limit = 1 << 20;
        assert!(whole > 4 * limit, "{whole}");
        let parts = batch.clone().split_to_fit(limit);
        assert!(parts.len() >= 5, "{}", parts.len());
        for p in &parts {
            assert!(json_len(p) <= limit, "{} > {limit}", json_len(p));
            assert_eq!(
                (p.node_id.as_str(), p.window_start_ms, p.window_end_ms),
                ("n", 1, 2)
            );
        }
        let requests: u64 = parts.iter().map(TelemetryBatch::requests).sum();
        assert_eq!(requests, 13);
        let ids = |f: &dyn Fn(&TelemetryBatch) -> Vec<String>| -> Vec<String> {
            parts.iter().flat_map(f).collect()
        };
        let predicted = ids(&|p| {
            p.models
                .iter()
                .flat_map(|m| m.predictions.iter().map(|x| x.id.clone()))
                .collect()
        });
        let expected: Vec<String> = batch
            .models
            .iter()
            .flat_map(|m| m.predictions.iter().map(|x| x.id.clone()))
            .collect();
        assert!(predicted == expected, "predictions lost or reordered");
        let labels = ids(&|p| p.feedback.iter().map(|f| f.id.clone()).collect());
        assert_eq!(labels.len(), 20_000);
        // A batch that fits is left alone.
        let small = TelemetryBatch {
            models: vec![window("b", 7, 10)],
            feedback: Vec::new(),
            ..batch
        };
        assert!(small.clone().split_to_fit(limit) == vec![small]);
    }

    fn column(i: u32) -> FeatureSource {
        FeatureSource::Column {
            input: "x".into(),
            index: i,
        }
    }

    #[test]
    fn quantile_bins_spread_the_training_values() {
        let values: Vec<Option<f64>> = (0..1000)
            .map(|i| Some(f64::from(i)))
            .chain([None])
            .collect();
        let r = FeatureReference::numeric("a", column(0), &values, 10);
        assert_eq!(r.counts, vec![100; 10]);
        assert_eq!(r.missing, 1);
        assert_eq!(r.moments.count, 1000);
        assert_eq!(r.moments.mean(), Some(499.5));
        // A discrete feature gets at most one bin per value.
        let flags: Vec<Option<f64>> = (0..100).map(|i| Some(f64::from(i % 2))).collect();
        let r = FeatureReference::numeric("b", column(1), &flags, 10);
        assert_eq!(r.binning, Binning::Numeric { edges: vec![1.0] });
        assert_eq!(r.counts, vec![50, 50]);
    }

    #[test]
    fn psi_and_ks_are_zero_for_the_same_distribution_and_grow_with_a_shift() {
        let reference = [100, 100, 100, 100];
        assert_eq!(psi(&reference, &[10, 10, 10, 10]), Some(0.0));
        assert_eq!(ks(&reference, &[10, 10, 10, 10]), Some(0.0));
        let shifted = [0, 0, 20, 20];
        let p = psi(&reference, &shifted).unwrap();
        // 2 * (0.0001 - 0.25) ln(0.0004) + 2 * (0.5 - 0.25) ln 2
        let expected = 2.0 * (1e-4 - 0.25) * (1e-4f64 / 0.25).ln() + 2.0 * 0.25 * 2f64.ln();
        assert!((p - expected).abs() < 1e-12, "{p} vs {expected}");
        assert_eq!(ks(&reference, &shifted), Some(0.5));
        assert_eq!(psi(&reference, &[0, 0, 0, 0]), None);
        assert_eq!(psi(&reference, &[1, 2]), None);
    }

    #[test]
    fn features_are_read_from_tensor_columns_and_records() {
        let reference = ReferenceStats {
            rows: 4,
            features: vec![
                FeatureReference::numeric(
                    "x[1]",
                    column(1),
                    &[Some(0.0), Some(1.0), Some(2.0), Some(3.0)],
                    4,
                ),
                FeatureReference::numeric(
                    "age",
                    FeatureSource::Field {
                        input: "r".into(),
                        field: "age".into(),
                    },
                    &[Some(10.0), Some(20.0)],
                    2,
                ),
                FeatureReference::categorical(
                    "color",
                    FeatureSource::Field {
                        input: "r".into(),
                        field: "color".into(),
                    },
                    &[Some("red".into()), Some("red".into()), Some("blue".into())],
                ),
            ],
        };
        reference.validate().unwrap();
        let mut live = reference.empty_live();
        let x = NamedTensor {
            name: "x".into(),
            tensor: Tensor::from_f32(vec![3, 2], &[9.0, 0.5, 9.0, 3.0, 9.0, f32::NAN]).unwrap(),
        };
        assert_eq!(reference.observe(&[x], &mut live), 3);
        assert_eq!(live[0].counts, vec![1, 0, 0, 1]);
        assert_eq!(live[0].missing, 1);
        let records = NamedTensor {
            name: "r".into(),
            tensor: Tensor::from_byte_strings(
                vec![3],
                &[
                    r#"{"age": 15, "color": "red"}"#.as_bytes(),
                    br#"[{"age": null, "color": "green"}, {"color": 3}]"#,
                    b"not json",
                ],
            )
            .unwrap(),
        };
        assert_eq!(reference.observe(&[records], &mut live), 4);
        assert_eq!(live[1].counts, vec![1, 0]);
        assert_eq!(live[1].missing, 3);
        // red, then green and 3 as "other", then the unreadable element as missing.
        assert_eq!(live[2].counts, vec![1, 0, 2]);
        assert_eq!(live[2].missing, 1);
    }

    #[test]
    fn classes_come_from_labels_indices_or_scores() {
        let labels = vec!["cat".to_owned(), "dog".to_owned()];
        let scores = NamedTensor {
            name: "p".into(),
            tensor: Tensor::from_f32(vec![2, 2], &[0.1, 0.9, 0.8, 0.2]).unwrap(),
        };
        assert_eq!(classes(&[scores], &labels), vec!["dog", "cat"]);
        let idx = NamedTensor {
            name: "c".into(),
            tensor: Tensor::from_i64(vec![3], &[1, 0, 7]).unwrap(),
        };
        assert_eq!(classes(&[idx], &labels), vec!["dog", "cat", "7"]);
        let top = NamedTensor {
            name: "t".into(),
            tensor: Tensor::from_byte_strings(vec![1, 2], &["b", "a"]).unwrap(),
        };
        assert_eq!(classes(&[top], &labels), vec!["b"]);
        let embedding = NamedTensor {
            name: "e".into(),
            tensor: Tensor::from_f32(vec![3], &[0.1, 0.2, 0.3]).unwrap(),
        };
        assert!(classes(&[embedding], &labels).is_empty());
    }

    #[test]
    fn bin_labels_are_short() {
        let b = Binning::Numeric {
            edges: vec![0.4712, 13.62, 1235.0],
        };
        let labels: Vec<String> = (0..4).map(|i| b.label(i)).collect();
        assert_eq!(labels, ["< 0.471", "0.471–13.6", "13.6–1235", ">= 1235"]);
    }

    #[test]
    fn latency_quantiles_interpolate_inside_a_bin() {
        let mut h = LatencyHistogram::default();
        for _ in 0..90 {
            h.observe(0.3); // bin (0.25, 0.5]
        }
        for _ in 0..10 {
            h.observe(7.0); // bin (5, 10]
        }
        assert_eq!(h.quantile(0.5), Some(0.25 + 0.25 * (50.0 / 90.0)));
        assert_eq!(h.quantile(0.95), Some(5.0 + 5.0 * 0.5));
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }

    #[test]
    fn batches_merge_and_bounds_are_checked() {
        let mut a = ModelWindow {
            model: "m".into(),
            version: "1".into(),
            requests: 2,
            ..ModelWindow::default()
        };
        a.errors.insert("timeout".into(), 1);
        a.count_class("x");
        let b = a.clone();
        a.merge(&b).unwrap();
        assert_eq!((a.requests, a.error_count(), a.classes["x"]), (4, 2, 2));
        let mut batch = TelemetryBatch {
            node_id: "n".into(),
            seq: 1,
            models: vec![a],
            ..TelemetryBatch::default()
        };
        batch.validate().unwrap();
        batch.models[0].latency.counts.push(0);
        assert!(batch.validate().is_err());
        assert_eq!(prediction_id("r", 0, 1), "r");
        let item =
            |v: serde_json::Value| serde_json::from_value::<FeedbackItem>(v).unwrap().resolve();
        assert_eq!(
            item(serde_json::json!({"id": "r", "index": 2, "label": 3})).unwrap(),
            ("r/2".to_owned(), "3".to_owned())
        );
        assert_eq!(
            item(serde_json::json!({"id": "r", "label": ["a"]}))
                .unwrap_err()
                .to_string(),
            "feedback for \"r\": the label must be a string or a number, not [\"a\"]"
        );
        assert_eq!(prediction_id("r", 2, 3), "r/2");
    }
}
