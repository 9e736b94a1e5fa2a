//! The health settings of a service: `health`, `outlier` and `locality`.
//!
//! ```toml
//! health = { interval_ms = 500, timeout_ms = 200, healthy_threshold = 2, unhealthy_threshold = 2,
//!            http_path = "/healthz", expect_status = 200 }
//! outlier = { consecutive_failures = 5, base_ejection_ms = 30000, max_ejection_ms = 300000,
//!             max_ejection_percent = 50 }
//! locality = "prefer-local"
//! ```
//!
//! This module owns the raw (serde) form of those keys, their defaults and their checks; the
//! parent module calls [`settings`] for each service and turns an [`Invalid`] into its
//! `file:line: field: cause` error. Without `health` a service has no active check; the
//! passive outlier detection is on unless `outlier = { enabled = false }`.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::model::settings::{
    DEFAULT_BASE_EJECTION_MS, DEFAULT_CONSECUTIVE_FAILURES, DEFAULT_MAX_EJECTION_MS,
    DEFAULT_MAX_EJECTION_PERCENT,
};
use crate::model::{ActiveCheck, HealthSettings, HttpCheck, Locality, OutlierSettings, Protocol};

/// Active check defaults (those of a `health = {}` table).
pub const DEFAULT_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_EXPECT_STATUS: u16 = 200;

/// Bounds of the durations and counts accepted.
const INTERVAL_MS: Range<u64> = 100..3_600_001;
const EJECTION_MS: Range<u64> = 100..86_400_001;
const THRESHOLD: Range<u32> = 1..1_001;

/// `locality = "any" | "prefer-local"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum RawLocality {
    #[default]
    Any,
    PreferLocal,
}

impl From<RawLocality> for Locality {
    fn from(raw: RawLocality) -> Locality {
        match raw {
            RawLocality::Any => Locality::Any,
            RawLocality::PreferLocal => Locality::PreferLocal,
        }
    }
}

/// The `health` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    healthy_threshold: Option<Spanned<i64>>,
    unhealthy_threshold: Option<Spanned<i64>>,
    http_path: Option<Spanned<String>>,
    expect_status: Option<Spanned<i64>>,
}

/// The `outlier` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlier {
    enabled: Option<bool>,
    consecutive_failures: Option<Spanned<i64>>,
    base_ejection_ms: Option<Spanned<i64>>,
    max_ejection_ms: Option<Spanned<i64>>,
    max_ejection_percent: Option<Spanned<i64>>,
}

/// The health keys of one `[[services]]` entry.
pub(super) struct RawSettings {
    pub health: Option<Spanned<RawHealth>>,
    pub outlier: Option<Spanned<RawOutlier>>,
    pub locality: Option<Spanned<RawLocality>>,
}

/// A value that is out of range: where, which field (relative to the service), why.
#[derive(Debug)]
pub(super) struct Invalid {
    pub span: Range<usize>,
    /// `health.timeout_ms`, …
    pub field: String,
    pub message: String,
}

fn invalid(span: Range<usize>, field: &str, message: String) -> Invalid {
    Invalid {
        span,
        field: field.to_owned(),
        message,
    }
}

/// A number in `range`, or `default` when absent.
pub(super) fn number<T>(
    value: &Option<Spanned<i64>>,
    field: &str,
    range: Range<T>,
    default: T,
    unit: &str,
) -> Result<T, Invalid>
where
    T: TryFrom<i64> + PartialOrd + Copy + std::fmt::Display + std::ops::Sub<Output = T> + From<u8>,
{
    let Some(v) = value else {
        return Ok(default);
    };
    T::try_from(*v.get_ref())
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            invalid(
                v.span(),
                field,
                format!(
                    "{}{unit} is out of range {}..={}",
                    v.get_ref(),
                    range.start,
                    range.end - T::from(1)
                ),
            )
        })
}

/// The checked settings of a service of `protocol`.
pub(super) fn settings(raw: RawSettings, protocol: Protocol) -> Result<HealthSettings, Invalid> {
    let check = match raw.health {
        None => None,
        Some(h) => {
            if protocol != Protocol::Tcp {
                return Err(invalid(
                    h.span(),
                    "health",
                    format!("active checks connect over TCP; this service is {protocol}"),
                ));
            }
            Some(active(h)?)
        }
    };
    let outlier = match raw.outlier {
        None => Some(OutlierSettings::default()),
        Some(o) => outlier(o)?,
    };
    Ok(HealthSettings {
        check,
        outlier,
        locality: raw
            .locality
            .map(Spanned::into_inner)
            .unwrap_or_default()
            .into(),
    })
}

fn active(raw: Spanned<RawHealth>) -> Result<ActiveCheck, Invalid> {
    let span = raw.span();
    let h = raw.into_inner();
    let interval_ms = number(
        &h.interval_ms,
        "health.interval_ms",
        INTERVAL_MS,
        DEFAULT_INTERVAL_MS,
        " ms",
    )?;
    let timeout_ms = number(
        &h.timeout_ms,
        "health.timeout_ms",
        1..INTERVAL_MS.end,
        DEFAULT_TIMEOUT_MS.min(interval_ms / 2),
        " ms",
    )?;
    if timeout_ms >= interval_ms {
        let at = h.timeout_ms.as_ref().map_or(span, Spanned::span);
        return Err(invalid(
            at,
            "health.timeout_ms",
            format!("{timeout_ms} ms is not less than interval_ms ({interval_ms} ms): a probe must end before the next starts"),
        ));
    }
    let healthy_threshold = number(
        &h.healthy_threshold,
        "health.healthy_threshold",
        THRESHOLD,
        DEFAULT_HEALTHY_THRESHOLD,
        "",
    )?;
    let unhealthy_threshold = number(
        &h.unhealthy_threshold,
        "health.unhealthy_threshold",
        THRESHOLD,
        DEFAULT_UNHEALTHY_THRESHOLD,
        "",
    )?;
    let expect_status = number(
        &h.expect_status,
        "health.expect_status",
        100..600,
        DEFAULT_EXPECT_STATUS,
        "",
    )?;
    let http = match h.http_path {
        None => {
            if let Some(s) = &h.expect_status {
                return Err(invalid(
                    s.span(),
                    "health.expect_status",
                    "only an HTTP check has a status: set http_path too".to_owned(),
                ));
            }
            None
        }
        Some(p) => {
            let path = p.get_ref();
            let printable = path.bytes().all(|b| b.is_ascii_graphic());
            if !path.starts_with('/') || !printable {
                return Err(invalid(
                    p.span(),
                    "health.http_path",
                    format!("{path:?} is not an HTTP path: it starts with '/' and has no spaces or control characters"),
                ));
            }
            Some(HttpCheck {
                path: p.into_inner(),
                expect_status,
            })
        }
    };
    Ok(ActiveCheck {
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        healthy_threshold,
        unhealthy_threshold,
        http,
    })
}

fn outlier(raw: Spanned<RawOutlier>) -> Result<Option<OutlierSettings>, Invalid> {
    let span = raw.span();
    let o = raw.into_inner();
    if o.enabled == Some(false) {
        let given = [
            &o.consecutive_failures,
            &o.base_ejection_ms,
            &o.max_ejection_ms,
            &o.max_ejection_percent,
        ];
        if given.iter().any(|v| v.is_some()) {
            return Err(invalid(
                span,
                "outlier",
                "enabled = false takes no other settings".to_owned(),
            ));
        }
        return Ok(None);
    }
    let consecutive_failures = number(
        &o.consecutive_failures,
        "outlier.consecutive_failures",
        THRESHOLD,
        DEFAULT_CONSECUTIVE_FAILURES,
        "",
    )?;
    let base_ms = number(
        &o.base_ejection_ms,
        "outlier.base_ejection_ms",
        EJECTION_MS,
        DEFAULT_BASE_EJECTION_MS,
        " ms",
    )?;
    let max_ms = number(
        &o.max_ejection_ms,
        "outlier.max_ejection_ms",
        EJECTION_MS,
        DEFAULT_MAX_EJECTION_MS.max(base_ms),
        " ms",
    )?;
    if max_ms < base_ms {
        let at = o.max_ejection_ms.as_ref().map_or(span, Spanned::span);
        return Err(invalid(
            at,
            "outlier.max_ejection_ms",
            format!("{max_ms} ms is less than base_ejection_ms ({base_ms} ms)"),
        ));
    }
    let max_ejection_percent = number(
        &o.max_ejection_percent,
        "outlier.max_ejection_percent",
        1..101,
        DEFAULT_MAX_EJECTION_PERCENT,
        " %",
    )?;
    Ok(Some(OutlierSettings {
        consecutive_failures,
        base_ejection: Duration::from_millis(base_ms),
        max_ejection: Duration::from_millis(max_ms),
        max_ejection_percent,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    const SVC: &str = "[[services]]\nname = 'web'\nvip = '10.96.0.10'\nport = 80\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{SVC}{extra}"), "mesh.toml")
    }

    fn health(extra: &str) -> HealthSettings {
        parse(extra).unwrap().services[0].health.clone()
    }

    #[test]
    fn defaults() {
        let h = health("");
        assert_eq!(h, HealthSettings::default());
        assert_eq!(h.check, None);
        assert_eq!(h.outlier, Some(OutlierSettings::default()));
        assert_eq!(h.locality, Locality::Any);
        let c = health("health = {}\n").check.unwrap();
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold), (2, 3));
        assert_eq!(c.http, None);
        // A short interval gets a timeout that fits in it.
        let c = health("health = { interval_ms = 500 }\n").check.unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
    }

    #[test]
    fn full_settings() {
        let h = health(
            "health = { interval_ms = 500, timeout_ms = 200, healthy_threshold = 1, unhealthy_threshold = 2, http_path = '/healthz', expect_status = 204 }\n\
             outlier = { consecutive_failures = 3, base_ejection_ms = 1000, max_ejection_ms = 8000 }\n\
             locality = 'prefer-local'\n",
        );
        let c = h.check.unwrap();
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.timeout, Duration::from_millis(200));
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold), (1, 2));
        assert_eq!(
            c.http,
            Some(HttpCheck {
                path: "/healthz".into(),
                expect_status: 204
            })
        );
        let o = h.outlier.unwrap();
        assert_eq!(o.consecutive_failures, 3);
        assert_eq!(o.base_ejection, Duration::from_secs(1));
        assert_eq!(o.max_ejection, Duration::from_secs(8));
        assert_eq!(h.locality, Locality::PreferLocal);
        assert_eq!(health("outlier = { enabled = false }\n").outlier, None);
        // A base past the default maximum raises the maximum with it.
        let o = health("outlier = { base_ejection_ms = 600000 }\n")
            .outlier
            .unwrap();
        assert_eq!(o.max_ejection, o.base_ejection);
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "health = { interval_ms = 500, timeout_ms = 500 }\n",
                "mesh.toml:5: services[0].health.timeout_ms: 500 ms is not less than interval_ms (500 ms)",
            ),
            (
                "health = { interval_ms = 50 }\n",
                "mesh.toml:5: services[0].health.interval_ms: 50 ms is out of range 100..=3600000",
            ),
            (
                "health = { unhealthy_threshold = 0 }\n",
                "mesh.toml:5: services[0].health.unhealthy_threshold: 0 is out of range 1..=1000",
            ),
            (
                "health = { healthy_threshold = -1 }\n",
                "mesh.toml:5: services[0].health.healthy_threshold: -1 is out of range",
            ),
            (
                "health = { http_path = 'healthz' }\n",
                "mesh.toml:5: services[0].health.http_path: \"healthz\" is not an HTTP path",
            ),
            (
                "health = { http_path = '/a b' }\n",
                "services[0].health.http_path: \"/a b\" is not an HTTP path",
            ),
            (
                "health = { expect_status = 204 }\n",
                "mesh.toml:5: services[0].health.expect_status: only an HTTP check has a status",
            ),
            (
                "health = { http_path = '/', expect_status = 99 }\n",
                "services[0].health.expect_status: 99 is out of range 100..=599",
            ),
            (
                "health = { intervall_ms = 500 }\n",
                "mesh.toml:5: services[0].health.intervall_ms: unknown field `intervall_ms`",
            ),
            (
                "protocol = 'udp'\nhealth = {}\n",
                "mesh.toml:6: services[0].health: active checks connect over TCP; this service is udp",
            ),
            (
                "outlier = { consecutive_failures = 0 }\n",
                "mesh.toml:5: services[0].outlier.consecutive_failures: 0 is out of range 1..=1000",
            ),
            (
                "outlier = { max_ejection_percent = 0 }\n",
                "mesh.toml:5: services[0].outlier.max_ejection_percent: 0 % is out of range 1..=100",
            ),
            (
                "outlier = { base_ejection_ms = 5000, max_ejection_ms = 1000 }\n",
                "services[0].outlier.max_ejection_ms: 1000 ms is less than base_ejection_ms (5000 ms)",
            ),
            (
                "outlier = { enabled = false, consecutive_failures = 3 }\n",
                "mesh.toml:5: services[0].outlier: enabled = false takes no other settings",
            ),
            (
                "locality = 'nearest'\n",
                "mesh.toml:5: services[0].locality: unknown variant `nearest`, expected `any` or `prefer-local`",
            ),
        ];
        for (extra, want) in cases {
            let got = parse(extra).expect_err(extra).to_string();
            assert!(got.contains(want), "{extra}: want {want}\n got {got}");
        }
    }
}
