//! Summaries of repeated measurements: the median, the spread ((max - min) / median) that
//! says how much the rounds disagreed, and ratios to a baseline.

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The `q` quantile of sorted values, nearest rank (0 when empty): of 50 values or fewer,
/// the 0.99 quantile is the largest.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n - 1) as f64 * q).round() as usize],
    }
}

/// (max - min) / median of `v`; 0 when the median is 0, `None` when empty.
pub fn spread(v: &[f64]) -> Option<f64> {
    let max = v.iter().copied().reduce(f64::max)?;
    let min = v.iter().copied().reduce(f64::min)?;
    let m = median(v)?;
    Some(if m > 0.0 { (max - min) / m } else { 0.0 })
}

/// `a / b`, NaN when `b` is not positive (a missing baseline shows as `NaN`, never as a ratio).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// One design-target line: `what`, the measured ratio and whether it reaches `min` (measured,
/// never asserted).
pub fn target_line(what: &str, measured: Option<f64>, min: f64) -> String {
    let (value, verdict) = match measured {
        Some(v) if v >= min => (format!("{v:.2}x"), "met"),
        Some(v) => (format!("{v:.2}x"), "NOT met"),
        None => ("-".to_string(), "not measured"),
    };
    format!("  {what:<48} {value:>7}  (>= {min}x) {verdict}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_spread_and_ratio() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(spread(&[10.0, 8.0, 12.0]), Some(0.4));
        assert_eq!(ratio(1.0, 2.0), 0.5);
        assert!(ratio(1.0, 0.0).is_nan());
        assert!(target_line("a", Some(0.5), 0.4).ends_with("0.50x  (>= 0.4x) met\n"));
        assert!(target_line("a", Some(0.3), 0.4).ends_with("0.30x  (>= 0.4x) NOT met\n"));
        assert!(target_line("a", None, 0.4).ends_with("-  (>= 0.4x) not measured\n"));
    }

    #[test]
    fn quantiles_of_sorted_values() {
        assert_eq!(quantile(&[], 0.99), 0.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 1.0), 3.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.5), 2.0);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&hundred, 0.99), 99.0);
        assert_eq!(quantile(&hundred[..50], 0.99), 50.0);
    }
}
