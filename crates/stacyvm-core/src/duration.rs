//! Go duration syntax (`300ms`, `1h30m`, `1.5h`), parsed and rendered the way
//! Go's `time.ParseDuration` and `Duration.String` do.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

fn err(input: &str, reason: &'static str) -> DurationError {
    DurationError {
        input: input.to_string(),
        reason,
    }
}

/// Parse a Go duration. Negative durations are refused (nothing in the API
/// takes one); a bare `0` is allowed.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(err(input, "empty"));
    }
    let s = match s.strip_prefix('+') {
        Some(rest) => rest,
        None if s.starts_with('-') => return Err(err(input, "must not be negative")),
        None => s,
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return Err(err(input, "empty"));
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num = &rest[..num_len];
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(err(input, "expected a number"));
        }
        let value: f64 = num.parse().map_err(|_| err(input, "expected a number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let nanos_per: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(err(input, "missing unit (use ns, us, ms, s, m or h)")),
            _ => return Err(err(input, "unknown unit (use ns, us, ms, s, m or h)")),
        };
        total += value * nanos_per;
        if !total.is_finite() || total > u64::MAX as f64 / 2.0 {
            return Err(err(input, "too large"));
        }
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Render like Go's `Duration.String()`: `1h30m0s`, `1.5s`, `300ms`, `0s`.
pub fn format(d: Duration) -> String {
    let total = d.as_nanos();
    if total == 0 {
        return "0s".to_string();
    }
    if total < 1_000_000_000 {
        // Sub-second: pick the largest unit that keeps a non-zero integer part.
        let (unit, div) = if total < 1_000 {
            ("ns", 1u128)
        } else if total < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", frac(total, div));
    }
    let hours = total / 3_600_000_000_000;
    let rem = total % 3_600_000_000_000;
    let mins = rem / 60_000_000_000;
    let secs_nanos = rem % 60_000_000_000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || mins > 0 {
        out.push_str(&format!("{mins}m"));
    }
    out.push_str(&format!("{}s", frac(secs_nanos, 1_000_000_000)));
    out
}

/// `value / div` with the fraction's trailing zeros dropped.
fn frac(value: u128, div: u128) -> String {
    let int = value / div;
    let mut f = value % div;
    if f == 0 {
        return int.to_string();
    }
    let mut digits = div.to_string().len() - 1;
    while f.is_multiple_of(10) {
        f /= 10;
        digits -= 1;
    }
    format!("{int}.{f:0digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_syntax() {
        assert_eq!(parse("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("2us").unwrap(), Duration::from_micros(2));
        assert_eq!(parse("2µs").unwrap(), Duration::from_micros(2));
        assert_eq!(parse("1m0.5s").unwrap(), Duration::from_millis(60_500));
        assert_eq!(parse(".5s").unwrap(), Duration::from_millis(500));
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            "",
            "10",
            "abc",
            "10x",
            "-5s",
            "1..5s",
            "s",
            "5 s",
            ".s",
            "1e5s",
            "99999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_secs(600)), "10m0s");
        assert_eq!(format(Duration::from_secs(5400)), "1h30m0s");
        assert_eq!(format(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format(Duration::from_millis(300)), "300ms");
        assert_eq!(format(Duration::from_micros(1234)), "1.234ms");
        assert_eq!(format(Duration::from_nanos(1500)), "1.5µs");
        assert_eq!(format(Duration::from_nanos(12)), "12ns");
        assert_eq!(format(Duration::from_secs(3600)), "1h0m0s");
        for s in ["10m0s", "1h30m0s", "1.5s", "300ms", "1.234ms"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
