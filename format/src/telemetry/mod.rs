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

mod drift;
mod reference;
mod window;

pub use drift::*;
pub use reference::*;
pub use window::*;

/// Most bins of one numeric feature.
pub const MAX_BINS: usize = 64;
/// Most categories of one categorical feature (besides "other").
pub const MAX_CATEGORIES: usize = 64;
/// Most features a reference describes.
pub const MAX_FEATURES: usize = 4096;
/// Most distinct classes a window counts per model version (others go to `"(other)"`).
pub const MAX_CLASSES: usize = 256;
/// Most model versions in one batch: each is a row the hub updates in the batch's
/// transaction, so the count bounds how long one batch holds the hub's database. (A node
/// serving more model versions with traffic in one window has that window's batch refused
/// and quarantined.)
pub const MAX_MODELS: usize = 1024;
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

    /// A batch naming more model versions than [`MAX_MODELS`] is refused before the hub
    /// folds any of them (each is a row it would update in one transaction).
    #[test]
    fn a_batch_of_too_many_model_versions_is_refused() {
        let window = |i: usize| ModelWindow {
            model: format!("m{i}"),
            version: "1".into(),
            ..ModelWindow::default()
        };
        let batch = |n: usize| TelemetryBatch {
            node_id: "n".into(),
            seq: 1,
            window_start_ms: 0,
            window_end_ms: 1,
            dropped_batches: 0,
            dropped_requests: 0,
            models: (0..n).map(window).collect(),
            feedback: vec![],
        };
        assert!(batch(MAX_MODELS).validate().is_ok());
        let e = batch(MAX_MODELS + 1).validate().unwrap_err().to_string();
        assert!(e.contains("model versions"), "{e}");
    }
}
