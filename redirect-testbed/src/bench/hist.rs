//! HDR histograms of nanosecond samples, and their wire form between the
//! load generator and the runner: the recorded buckets as `[value, count]`.

use hdrhistogram::Histogram;

/// 1 ns to 60 s, 3 significant digits.
pub fn new() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

pub fn to_buckets(h: &Histogram<u64>) -> Vec<[u64; 2]> {
    h.iter_recorded()
        .map(|v| {
            [
                h.highest_equivalent(v.value_iterated_to()),
                v.count_at_value(),
            ]
        })
        .collect()
}

pub fn from_buckets(b: &[[u64; 2]]) -> Histogram<u64> {
    let mut h = new();
    for [v, c] in b {
        let _ = h.record_n(*v, *c);
    }
    h
}

/// Value at quantile `q` in microseconds.
pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip() {
        let mut h = new();
        for v in [1_000u64, 2_000, 2_000, 35_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let back = from_buckets(&to_buckets(&h));
        assert_eq!(back.len(), 5);
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q));
        }
    }
}
