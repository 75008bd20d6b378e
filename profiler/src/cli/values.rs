//! Values on the command line parsed with their ranges, so that nothing out of range reaches
//! the work (and panics there) and the refusal is one line.

use std::time::Duration;

/// A duration as people write it: `6` (seconds), `6s`, `500ms`, `2m`, `1h 30m`, within
/// `min..=max`.
pub fn duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 && secs <= max.as_secs_f64() => {
            Duration::from_secs_f64(secs)
        }
        Ok(_) => return Err(range(s, min, max)),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 6, 6s, 500ms or 2m"))?,
    };
    if d < min || d > max {
        return Err(range(s, min, max));
    }
    Ok(d)
}

fn range(s: &str, min: Duration, max: Duration) -> String {
    format!(
        "{s:?} is out of range: from {} to {}",
        humantime::format_duration(min),
        humantime::format_duration(max)
    )
}

/// A number within `min..=max` (finite: NaN and infinities are refused).
pub fn number_within(s: &str, min: f64, max: f64) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Ok(_) => Err(format!("{s} is out of range: from {min} to {max}")),
        Err(_) => Err(format!("{s:?} is not a number")),
    }
}

/// An OTLP/gRPC endpoint: an http:// or https:// URL with a host.
pub fn otlp_endpoint(s: &str) -> Result<String, String> {
    let rest = (s.strip_prefix("http://"))
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("{s:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{s:?} has no host"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn durations_as_people_write_them() {
        let day = Duration::from_secs(86_400);
        let ok = |s: &str| duration_within(s, Duration::from_millis(1), day).expect(s);
        assert_eq!(ok("6"), 6 * S);
        assert_eq!(ok("6s"), 6 * S);
        assert_eq!(ok("0.5"), S / 2);
        assert_eq!(ok("500ms"), S / 2);
        assert_eq!(ok("2m"), 120 * S);
        assert_eq!(ok("1h 30m"), 5400 * S);
        for bad in ["1e20", "-1", "NaN", "inf", "0", "2d", "soon", ""] {
            let e = duration_within(bad, Duration::from_millis(1), day).expect_err(bad);
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn numbers_outside_their_range_are_refused() {
        assert_eq!(number_within("25", 0.1, 1e6), Ok(25.0));
        for bad in ["1e-20", "0", "-3", "1e7", "NaN", "inf", "x"] {
            assert!(number_within(bad, 0.1, 1e6).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_otlp_endpoint_is_an_http_url_with_a_host() {
        assert_eq!(
            otlp_endpoint("http://127.0.0.1:4317").as_deref(),
            Ok("http://127.0.0.1:4317")
        );
        assert!(otlp_endpoint("https://collector").is_ok());
        assert!(otlp_endpoint("collector:4317")
            .unwrap_err()
            .contains("not an http"));
        assert!(otlp_endpoint("http://").unwrap_err().contains("no host"));
    }
}
