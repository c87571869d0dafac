//! Reference statistics: the bins and moments of each feature of the training set, and
//! how a row of live values falls into them.

use super::*;

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
pub(super) fn short(v: f64) -> String {
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

pub(super) fn invalid(reason: String) -> Error {
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
pub(super) enum Scalar {
    Missing,
    Number(f64),
    Text(String),
    Other,
}

/// Deserializes one record element (an object, or an array of objects) into the values of
/// `fields`, one row per object.
pub(super) struct Rows<'a>(&'a [&'a str]);

/// One record into the values of `fields`.
pub(super) struct Row<'a>(&'a [&'a str]);

/// A key, as its index among `fields`.
pub(super) struct FieldIndex<'a>(&'a [&'a str]);

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
