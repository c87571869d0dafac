//! Drift measures of live histograms against the reference: PSI and Kolmogorov-Smirnov.

use super::*;

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

pub(super) fn totals(reference: &[u64], live: &[u64]) -> Option<(f64, f64)> {
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
