//! Process-wide counters, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the exec latency histogram.
const EXEC_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0,
];

/// A point-in-time gauge: name, help text, and `(labels, value)` samples.
pub type Gauge<'a> = (&'a str, &'a str, Vec<(String, f64)>);

#[derive(Default)]
pub struct Metrics {
    pub sandboxes_created: AtomicU64,
    pub sandboxes_create_failed: AtomicU64,
    pub sandboxes_destroyed: AtomicU64,
    pub sandboxes_reaped: AtomicU64,
    pub execs: AtomicU64,
    pub exec_timeouts: AtomicU64,
    pub exec_errors: AtomicU64,
    pub http_requests: [AtomicU64; 5],
    exec_buckets: [AtomicU64; EXEC_BUCKETS.len()],
    exec_sum_micros: AtomicU64,
    create_sum_micros: AtomicU64,
}

impl Metrics {
    pub fn observe_exec(&self, d: Duration) {
        self.execs.fetch_add(1, Relaxed);
        let s = d.as_secs_f64();
        for (i, le) in EXEC_BUCKETS.iter().enumerate() {
            if s <= *le {
                self.exec_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.exec_sum_micros
            .fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn observe_create(&self, d: Duration) {
        self.sandboxes_created.fetch_add(1, Relaxed);
        self.create_sum_micros
            .fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Count one HTTP answer by status class (1xx … 5xx).
    pub fn observe_http(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.http_requests[class].fetch_add(1, Relaxed);
    }

    /// Render every metric; `gauges` adds point-in-time values computed by the caller.
    pub fn render(&self, gauges: &[Gauge<'_>]) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "stacyvm_sandboxes_created_total",
            "Sandboxes created.",
            self.sandboxes_created.load(Relaxed),
        );
        counter(
            &mut out,
            "stacyvm_sandboxes_create_failed_total",
            "Sandbox creations that failed.",
            self.sandboxes_create_failed.load(Relaxed),
        );
        counter(
            &mut out,
            "stacyvm_sandboxes_destroyed_total",
            "Sandboxes destroyed.",
            self.sandboxes_destroyed.load(Relaxed),
        );
        counter(
            &mut out,
            "stacyvm_sandboxes_reaped_total",
            "Sandboxes destroyed by the TTL reaper.",
            self.sandboxes_reaped.load(Relaxed),
        );
        counter(
            &mut out,
            "stacyvm_exec_timeouts_total",
            "Execs killed at their timeout.",
            self.exec_timeouts.load(Relaxed),
        );
        counter(
            &mut out,
            "stacyvm_exec_errors_total",
            "Execs that failed to reach the sandbox.",
            self.exec_errors.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP stacyvm_sandbox_create_seconds_sum Total time spent creating sandboxes.\n# TYPE stacyvm_sandbox_create_seconds_sum counter\nstacyvm_sandbox_create_seconds_sum {}", self.create_sum_micros.load(Relaxed) as f64 / 1e6);

        let _ = writeln!(out, "# HELP stacyvm_exec_duration_seconds Exec round trips through the agent.\n# TYPE stacyvm_exec_duration_seconds histogram");
        for (i, le) in EXEC_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "stacyvm_exec_duration_seconds_bucket{{le=\"{le}\"}} {}",
                self.exec_buckets[i].load(Relaxed)
            );
        }
        let n = self.execs.load(Relaxed);
        let _ = writeln!(
            out,
            "stacyvm_exec_duration_seconds_bucket{{le=\"+Inf\"}} {n}"
        );
        let _ = writeln!(
            out,
            "stacyvm_exec_duration_seconds_sum {}",
            self.exec_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "stacyvm_exec_duration_seconds_count {n}");

        let _ = writeln!(out, "# HELP stacyvm_http_requests_total HTTP answers by status class.\n# TYPE stacyvm_http_requests_total counter");
        for (i, c) in self.http_requests.iter().enumerate() {
            let _ = writeln!(
                out,
                "stacyvm_http_requests_total{{class=\"{}xx\"}} {}",
                i + 1,
                c.load(Relaxed)
            );
        }
        for (name, help, values) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in values {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_exec(Duration::from_micros(1500));
        m.observe_exec(Duration::from_secs(2));
        m.observe_http(200);
        m.observe_http(404);
        let text = m.render(&[(
            "stacyvm_sandboxes_active",
            "Active sandboxes.",
            vec![(String::new(), 3.0)],
        )]);
        assert!(
            text.contains("stacyvm_exec_duration_seconds_bucket{le=\"0.002\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stacyvm_exec_duration_seconds_bucket{le=\"5\"} 2"),
            "{text}"
        );
        assert!(text.contains("stacyvm_exec_duration_seconds_count 2"));
        assert!(text.contains("stacyvm_http_requests_total{class=\"4xx\"} 1"));
        assert!(text.contains("stacyvm_sandboxes_active 3"));
    }
}
