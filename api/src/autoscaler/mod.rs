//! Autoscaling (DESIGN §6): Knative KPA semantics over the concurrency agents report, and
//! placement of the resulting instance counts on nodes. Both decisions are pure functions
//! ([`kpa::decide`], [`placement::place`]) with table-driven tests; [`run`] is the loop that
//! feeds them (every 2 s, one replica at a time under an advisory lock, state stored so a new
//! leader resumes) and writes `assignments`.
//!
//! The settings a function carries for them live here: [`Scaling`] (the KPA knobs beyond a
//! version's `min_scale`/`max_scale`) and [`PlacementRules`] (node selector, soft preferences,
//! priority class).

pub mod kpa;
pub mod placement;
pub mod run;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;

/// Most labels on a node, and most entries in a function's required or preferred labels.
pub const MAX_LABELS: usize = 32;
/// Longest label key and value.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest stable window, seconds: the recent seconds a replica keeps per version.
const RECENT_WINDOW_S: f64 = crate::nodes::stats::RECENT_SECONDS as f64;

/// A function's scaling settings (every field optional: absent means Knative's default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    /// Share of `concurrency` each instance should carry, 0.01–1.0 (default 0.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_utilization: Option<f64>,
    /// Panic when panic-window demand reaches this multiple of ready capacity, 1.1–10 (default 2.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<f64>,
    /// Most growth per tick as a multiple of ready instances, 1.1–10000 (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_scale_up_rate: Option<f64>,
    /// Most shrinkage per tick as a divisor of ready instances, 1.01–1000 (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_scale_down_rate: Option<f64>,
    /// Stable window, seconds, 6–120 (default 60; agents' seconds are kept 120 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_window_s: Option<u32>,
    /// Panic window, seconds, 1 up to the stable window (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_window_s: Option<u32>,
    /// Seconds without demand before scaling to zero, 0–3600 (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_grace_s: Option<u32>,
    /// Instances before any metrics arrive, 0–1000 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_scale: Option<u32>,
    /// Fewest instances once there is any demand, 1–1000 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_scale: Option<u32>,
    /// Keep the highest desired count of this many seconds before scaling down, 0–3600 (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay_s: Option<u32>,
}

impl Scaling {
    /// Every rule the settings break, under `field` (`scaling`).
    pub fn validate(&self, field: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut range = |name: &str, value: Option<f64>, lo: f64, hi: f64| {
            if let Some(v) = value
                && !(v.is_finite() && v >= lo && v <= hi)
            {
                errors.push(FieldError::new(
                    format!("{field}.{name}"),
                    "out_of_range",
                    format!("must be between {lo} and {hi}"),
                ));
            }
        };
        range("target_utilization", self.target_utilization, 0.01, 1.0);
        range("panic_threshold", self.panic_threshold, 1.1, 10.0);
        range("max_scale_up_rate", self.max_scale_up_rate, 1.1, 10_000.0);
        // Above 1, as Knative requires: at 1 a version could never shrink.
        range("max_scale_down_rate", self.max_scale_down_rate, 1.01, 1000.0);
        range("stable_window_s", self.stable_window_s.map(f64::from), 6.0, RECENT_WINDOW_S);
        range("panic_window_s", self.panic_window_s.map(f64::from), 1.0, RECENT_WINDOW_S);
        range("scale_to_zero_grace_s", self.scale_to_zero_grace_s.map(f64::from), 0.0, 3600.0);
        range("initial_scale", self.initial_scale.map(f64::from), 0.0, 1000.0);
        range("activation_scale", self.activation_scale.map(f64::from), 1.0, 1000.0);
        range("scale_down_delay_s", self.scale_down_delay_s.map(f64::from), 0.0, 3600.0);
        let stable = self.stable_window_s.unwrap_or(60);
        if self.panic_window_s.is_some_and(|p| p > stable) {
            errors.push(FieldError::new(
                format!("{field}.panic_window_s"),
                "longer_than_stable_window",
                "the panic window may not be longer than the stable window",
            ));
        }
        errors
    }

    /// The KPA settings of a version with these settings.
    /// A `max_scale` of 0 (no bound of the function's own) still stops at the platform's most
    /// instances per version, [`crate::functions::SCALE`]'s end.
    pub fn config(&self, concurrency: u32, min_scale: u32, max_scale: u32) -> kpa::Config {
        let d = kpa::Config::default();
        let max_scale = if max_scale == 0 { *crate::functions::SCALE.end() } else { max_scale };
        let ms = |s: Option<u32>, default: u64| s.map_or(default, |s| u64::from(s) * 1000);
        kpa::Config {
            concurrency,
            target_utilization: self.target_utilization.unwrap_or(d.target_utilization),
            panic_threshold: self.panic_threshold.unwrap_or(d.panic_threshold),
            max_scale_up_rate: self.max_scale_up_rate.unwrap_or(d.max_scale_up_rate),
            max_scale_down_rate: self.max_scale_down_rate.unwrap_or(d.max_scale_down_rate),
            stable_window_ms: ms(self.stable_window_s, d.stable_window_ms),
            panic_window_ms: ms(self.panic_window_s, d.panic_window_ms),
            scale_to_zero_grace_ms: ms(self.scale_to_zero_grace_s, d.scale_to_zero_grace_ms),
            min_scale,
            max_scale,
            initial_scale: self.initial_scale.unwrap_or(d.initial_scale),
            activation_scale: self.activation_scale.unwrap_or(d.activation_scale),
            scale_down_delay_ms: ms(self.scale_down_delay_s, d.scale_down_delay_ms),
        }
    }
}

/// How much a function's instances matter when capacity is short.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Prefers cheap (`pool=spot`) nodes; the first evicted when a node is short of capacity.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Placed first, on `pool=reserved` nodes when it can be; never evicted for lower priorities.
    Critical,
}

/// Where a function's instances may and should run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementRules {
    /// Labels a node must carry (a node selector), e.g. `{"accelerator": "gpu"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub required: BTreeMap<String, String>,
    /// Labels a node should carry when one with room does (soft), e.g. `{"region": "eu"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preferred: BTreeMap<String, String>,
    /// Priority class.
    #[serde(default)]
    pub priority: Priority,
}

impl PlacementRules {
    /// Every rule the placement rules break, under `field` (`placement`).
    pub fn validate(&self, field: &str) -> Vec<FieldError> {
        let mut errors = validate_labels(&self.required, &format!("{field}.required"));
        errors.extend(validate_labels(&self.preferred, &format!("{field}.preferred")));
        errors
    }
}

/// Every rule a set of labels breaks: at most [`MAX_LABELS`]; keys of letters, digits, `.`, `_`,
/// `-` and `/`, starting with a letter or digit, 1–63 characters; values the same without `/`,
/// 0–63 characters.
pub fn validate_labels(labels: &BTreeMap<String, String>, field: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if labels.len() > MAX_LABELS {
        errors.push(FieldError::new(field, "too_many", format!("at most {MAX_LABELS} labels")));
    }
    let ok = |s: &str, slash: bool| {
        s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' || (slash && b == b'/'))
            && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
    };
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || !ok(k, true) {
            errors.push(FieldError::new(
                format!("{field}.{k}"),
                "invalid_label_key",
                "label keys are 1–63 letters, digits, `.`, `_`, `-` or `/`, starting with a letter or digit",
            ));
        }
        if v.len() > MAX_LABEL_LEN || !ok(v, false) {
            errors.push(FieldError::new(
                format!("{field}.{k}"),
                "invalid_label_value",
                "label values are up to 63 letters, digits, `.`, `_` or `-`, starting with a letter or digit",
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_settings_map_onto_the_kpa_defaults() {
        let c = Scaling::default().config(10, 0, 0);
        assert_eq!(c, kpa::Config { max_scale: 1000, ..kpa::Config::default() }, "0: the platform's bound");
        let s = Scaling { stable_window_s: Some(120), panic_window_s: Some(12), ..Scaling::default() };
        let c = s.config(4, 1, 9);
        assert_eq!(
            (c.stable_window_ms, c.panic_window_ms, c.concurrency, c.min_scale, c.max_scale),
            (120_000, 12_000, 4, 1, 9)
        );
    }

    #[test]
    fn bad_scaling_settings_name_the_field() {
        let s = Scaling { target_utilization: Some(1.5), panic_window_s: Some(90), ..Scaling::default() };
        let fields: Vec<String> = s.validate("scaling").into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["scaling.target_utilization", "scaling.panic_window_s"]);
        assert!(Scaling { target_utilization: Some(f64::NAN), ..Scaling::default() }.validate("s").len() == 1);
    }

    #[test]
    fn labels_are_checked() {
        let good: BTreeMap<String, String> =
            [("pool".into(), "spot".into()), ("nimbus.dev/zone".into(), String::new())].into();
        assert!(validate_labels(&good, "labels").is_empty());
        let bad: BTreeMap<String, String> = [("-x".into(), "a".into()), ("ok".into(), "a/b".into())].into();
        let codes: Vec<String> = validate_labels(&bad, "labels").into_iter().map(|e| e.rule).collect();
        assert_eq!(codes, ["invalid_label_key", "invalid_label_value"]);
    }
}
