//! Postprocessing steps on model outputs (shapes and types as `Pipeline::resolve` declares).

use capsule_format::pipeline::PostOp;
use capsule_format::wire::NamedTensorView;
use capsule_format::{DType, Tensor, byte_elements};

/// Last-axis length and number of rows of a tensor.
fn rows(t: &Tensor) -> Result<(usize, usize), String> {
    let last = *t.shape.last().ok_or("needs a tensor of rank 1 or more")? as usize;
    let count = t.element_count().map_err(|e| e.to_string())? as usize;
    if last == 0 {
        return Err("the last axis is empty".into());
    }
    Ok((last, count / last))
}

fn values(t: &Tensor) -> Result<Vec<f64>, String> {
    t.to_f64_vec().map_err(|e| e.to_string())
}

fn f32s(shape: Vec<u64>, v: impl Iterator<Item = f64>) -> Result<Tensor, String> {
    let v: Vec<f32> = v.map(|x| x as f32).collect();
    crate::f32_tensor(shape, &v)
}

/// Indices of the last axis of `row` sorted by value, largest first, lower index on ties.
fn ranked(row: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx
}

pub(crate) fn apply(
    step: &PostOp,
    t: Tensor,
    inputs: &[NamedTensorView<'_>],
    labels: &[String],
) -> Result<Tensor, String> {
    match step {
        PostOp::Softmax => {
            let (n, _) = rows(&t)?;
            let v = values(&t)?;
            let mut out = Vec::with_capacity(v.len());
            for row in v.chunks(n) {
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                out.extend(exps.into_iter().map(|e| e / sum));
            }
            f32s(t.shape, out.into_iter())
        }
        PostOp::L2Normalize => {
            let (n, _) = rows(&t)?;
            let v = values(&t)?;
            let mut out = Vec::with_capacity(v.len());
            for row in v.chunks(n) {
                let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                out.extend(row.iter().map(|x| x / norm));
            }
            f32s(t.shape, out.into_iter())
        }
        PostOp::Argmax | PostOp::TopK { .. } | PostOp::TopKScores { .. } => {
            let (n, _) = rows(&t)?;
            let k = match step {
                PostOp::TopK { k } | PostOp::TopKScores { k } => *k as usize,
                _ => 1,
            };
            if k > n {
                return Err(format!("k is {k}, but the last axis has {n} values"));
            }
            let v = values(&t)?;
            let mut shape = t.shape.clone();
            let last = shape.len() - 1;
            if matches!(step, PostOp::Argmax) {
                shape.truncate(last);
            } else {
                shape[last] = k as u64;
            }
            let mut idx = Vec::new();
            let mut scores = Vec::new();
            for row in v.chunks(n) {
                for i in ranked(row).into_iter().take(k) {
                    idx.push(i as i64);
                    scores.push(row[i]);
                }
            }
            if matches!(step, PostOp::TopKScores { .. }) {
                f32s(shape, scores.into_iter())
            } else {
                Tensor::from_i64(shape, &idx).map_err(|e| e.to_string())
            }
        }
        PostOp::Labels => {
            let v = values(&t)?;
            let mut names = Vec::with_capacity(v.len());
            for x in v {
                let label = usize::try_from(x as i64)
                    .ok()
                    .and_then(|i| labels.get(i))
                    .ok_or_else(|| {
                        format!("class {x} has no label (the capsule has {})", labels.len())
                    })?;
                names.push(label.as_bytes());
            }
            Tensor::from_byte_strings(t.shape, &names).map_err(|e| e.to_string())
        }
        PostOp::Threshold { value } => {
            let v = values(&t)?;
            let threshold = f64::from(*value);
            Tensor::new(
                DType::Bool,
                t.shape,
                v.into_iter().map(|x| u8::from(x >= threshold)).collect(),
            )
            .map_err(|e| e.to_string())
        }
        PostOp::MeanPool { mask } => {
            let [n, seq, dim] = t.shape[..] else {
                return Err(format!("needs [N, T, D], got {:?}", t.shape));
            };
            let m = inputs
                .iter()
                .find(|i| i.name == mask.as_str())
                .ok_or_else(|| format!("the mask {mask:?} is not among the model inputs"))?;
            if m.tensor.shape != [n, seq] {
                return Err(format!(
                    "the mask {mask:?} is {:?}, the output is {:?}",
                    m.tensor.shape, t.shape
                ));
            }
            let weights = m.tensor.to_f64_vec().map_err(|e| e.to_string())?;
            let v = values(&t)?;
            let (seq, dim) = (seq as usize, dim as usize);
            let mut out = vec![0f64; n as usize * dim];
            for b in 0..n as usize {
                let mut total = 0.0;
                for s in 0..seq {
                    let w = weights[b * seq + s];
                    total += w;
                    if w != 0.0 {
                        let row = &v[(b * seq + s) * dim..(b * seq + s + 1) * dim];
                        for (o, x) in out[b * dim..(b + 1) * dim].iter_mut().zip(row) {
                            *o += x * w;
                        }
                    }
                }
                let total = total.max(1e-9);
                for o in &mut out[b * dim..(b + 1) * dim] {
                    *o /= total;
                }
            }
            f32s(vec![n, dim as u64], out.into_iter())
        }
    }
}

/// The text of a `BYTES` tensor's elements (lossy UTF-8), for tests and tools.
pub fn strings(t: &Tensor) -> Vec<String> {
    byte_elements(&t.data)
        .map(|items| {
            items
                .into_iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_weights_rows_by_the_mask() {
        // N=1, T=3, D=2; the third position is padding.
        let t = Tensor::from_f32(vec![1, 3, 2], &[1.0, 2.0, 3.0, 4.0, 100.0, 100.0]).unwrap();
        let mask = Tensor::from_i64(vec![1, 3], &[1, 1, 0]).unwrap();
        let inputs = [NamedTensorView {
            name: "m",
            tensor: mask.view(),
        }];
        let step = PostOp::MeanPool { mask: "m".into() };
        let pooled = apply(&step, t.clone(), &inputs, &[]).unwrap();
        assert_eq!(pooled.shape, [1, 2]);
        assert_eq!(pooled.to_f64_vec().unwrap(), [2.0, 3.0]);
        let short = Tensor::from_i64(vec![1, 2], &[1, 1]).unwrap();
        let bad = [NamedTensorView {
            name: "m",
            tensor: short.view(),
        }];
        assert_eq!(
            apply(&step, t, &bad, &[]).unwrap_err(),
            "the mask \"m\" is [1, 2], the output is [1, 3, 2]"
        );
    }

    #[test]
    fn top_k_breaks_ties_by_index_and_labels_map() {
        let t = Tensor::from_f32(vec![1, 4], &[0.1, 0.7, 0.1, 0.7]).unwrap();
        let top = apply(&PostOp::TopK { k: 3 }, t.clone(), &[], &[]).unwrap();
        assert_eq!(top, Tensor::from_i64(vec![1, 3], &[1, 3, 0]).unwrap());
        let labels: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let named = apply(&PostOp::Labels, top, &[], &labels).unwrap();
        assert_eq!(strings(&named), ["b", "d", "a"]);
        let arg = apply(&PostOp::Argmax, t.clone(), &[], &[]).unwrap();
        assert_eq!(arg, Tensor::from_i64(vec![1], &[1]).unwrap());
        let err = apply(
            &PostOp::Labels,
            Tensor::from_i64(vec![1], &[9]).unwrap(),
            &[],
            &labels,
        );
        assert_eq!(err.unwrap_err(), "class 9 has no label (the capsule has 4)");
        let hot = apply(&PostOp::Threshold { value: 0.7 }, t.clone(), &[], &[]).unwrap();
        assert_eq!(hot.dtype, DType::Bool);
        assert_eq!(hot.data, [0, 1, 0, 1]);
        let unit = apply(
            &PostOp::L2Normalize,
            Tensor::from_f32(vec![1, 2], &[3.0, 4.0]).unwrap(),
            &[],
            &[],
        );
        assert_eq!(
            unit.unwrap().to_f64_vec().unwrap(),
            [0.6000000238418579, 0.800000011920929]
        );
        let soft = apply(&PostOp::Softmax, t, &[], &[]).unwrap();
        let sum: f64 = soft.to_f64_vec().unwrap().iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
