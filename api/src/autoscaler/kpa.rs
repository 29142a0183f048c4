//! The scaling decision of Knative's KPA (pod autoscaler), as a pure function: observed
//! concurrency over a stable and a panic window in, desired instances out, with the state a
//! decision carries to the next tick (panic mode, the scale-down-delay window, when the version
//! was last active). Times are milliseconds on one monotonic clock; the state is plain data so a
//! new leader can resume from what the last one stored.
//!
//! Per tick (every 2 s), following `knative.dev/serving/pkg/autoscaler/scaling/autoscaler.go`:
//! - `ready = max(1, ready instances)`; scale-up is capped at `ceil(max_scale_up_rate × ready)`,
//!   scale-down at `floor(ready / max_scale_down_rate)`;
//! - desired from each window: `ceil(observed / target)`, where `target = concurrency ×
//!   target_utilization`, capped, then raised to `activation_scale` when there is any demand;
//! - panic mode starts when the panic-window demand reaches `panic_threshold × ready`, is extended
//!   while it stays there, and ends only after a whole stable window without it; in panic the
//!   desired count never goes down (the maximum seen in the panic is kept);
//! - a scale-down delay keeps the maximum desired of the last `scale_down_delay`;
//! - scale to zero only after `scale_to_zero_grace` without demand; then `min_scale` and
//!   `max_scale` bound the result, and before any metrics arrive the answer is `initial_scale`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Scaling settings of one function (Knative's defaults in [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Invocations one instance runs at once (the function's `concurrency`).
    pub concurrency: u32,
    /// Share of `concurrency` to aim for (0.7).
    pub target_utilization: f64,
    /// Panic when panic-window demand is at least this multiple of ready capacity (2.0 = 200 %).
    pub panic_threshold: f64,
    /// Most growth per tick, as a multiple of ready instances (1000).
    pub max_scale_up_rate: f64,
    /// Most shrinkage per tick, as a divisor of ready instances (2).
    pub max_scale_down_rate: f64,
    /// Stable window, ms (60 s).
    pub stable_window_ms: u64,
    /// Panic window, ms (6 s).
    pub panic_window_ms: u64,
    /// How long without demand before scaling to zero, ms (30 s).
    pub scale_to_zero_grace_ms: u64,
    /// Fewest instances (0 allows scale to zero).
    pub min_scale: u32,
    /// Most instances (0: no bound).
    pub max_scale: u32,
    /// Instances before any metrics arrive (1).
    pub initial_scale: u32,
    /// Fewest instances once there is any demand (1).
    pub activation_scale: u32,
    /// Keep the highest desired count of this long before scaling down, ms (0: none).
    pub scale_down_delay_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            concurrency: 10,
            target_utilization: 0.7,
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            stable_window_ms: 60_000,
            panic_window_ms: 6_000,
            scale_to_zero_grace_ms: 30_000,
            min_scale: 0,
            max_scale: 0,
            initial_scale: 1,
            activation_scale: 1,
            scale_down_delay_ms: 0,
        }
    }
}

impl Config {
    /// Concurrency one instance should carry.
    pub fn target(&self) -> f64 {
        (f64::from(self.concurrency.max(1)) * self.target_utilization).max(0.01)
    }
}

/// What a tick observed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Now, ms.
    pub now_ms: u64,
    /// Instances ready now.
    pub ready: u32,
    /// Average concurrency over the stable window; `None` before any metrics arrived.
    pub stable: Option<f64>,
    /// Average concurrency over the panic window.
    pub panic: Option<f64>,
}

/// What a decision carries to the next tick.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// Since when the version is in panic mode (last time the threshold was met), ms.
    pub panic_since_ms: Option<u64>,
    /// The highest desired count during this panic.
    pub max_panic: u32,
    /// Desired counts of the last `scale_down_delay` (time, count).
    pub delay_window: VecDeque<(u64, u32)>,
    /// Last time there was any demand, ms.
    pub last_active_ms: Option<u64>,
    /// When the autoscaler first saw the version, ms: seconds before it do not dilute the
    /// windows' averages, and the initial scale holds from then until it is reached.
    pub first_seen_ms: Option<u64>,
    /// Whether the initial scale was reached (or demand was seen) once.
    pub initial_done: bool,
}

/// The decision of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Instances wanted.
    pub desired: u32,
    /// Whether the version is in panic mode.
    pub panicking: bool,
}

fn ceil_count(x: f64) -> u32 {
    if x <= 0.0 { 0 } else { x.ceil().min(f64::from(u32::MAX)) as u32 }
}

/// One KPA tick.
pub fn decide(cfg: &Config, state: &mut State, obs: &Observation) -> Decision {
    let bound = |n: u32| {
        let n = n.max(cfg.min_scale);
        if cfg.max_scale > 0 { n.min(cfg.max_scale) } else { n }
    };
    let (Some(stable), Some(panic)) = (obs.stable, obs.panic) else {
        // No metrics yet: the initial scale (a new version, or a new leader before data).
        return Decision { desired: bound(cfg.initial_scale), panicking: false };
    };
    let ready = f64::from(obs.ready.max(1));
    let max_up = ceil_count(cfg.max_scale_up_rate * ready);
    let max_down = (ready / cfg.max_scale_down_rate).floor() as u32;
    let target = cfg.target();
    let want_stable = ceil_count(stable / target);
    let want_panic = ceil_count(panic / target);
    // Capped, then raised to the activation scale when there is any demand (as Knative does:
    // the activation scale is not held back by the rate limits).
    let activate = |want: u32, count: u32| if want > 0 { count.max(cfg.activation_scale) } else { count };
    let stable_count = activate(want_stable, want_stable.max(max_down).min(max_up));
    let panic_count = activate(want_panic, want_panic.max(max_down).min(max_up));

    // The threshold is judged on raw demand, before activation scale and rate limits.
    let over = f64::from(want_panic) / ready >= cfg.panic_threshold;
    if over {
        state.panic_since_ms = Some(obs.now_ms);
    } else if state.panic_since_ms.is_some_and(|since| since + cfg.stable_window_ms <= obs.now_ms) {
        state.panic_since_ms = None;
        state.max_panic = 0;
    }
    let panicking = state.panic_since_ms.is_some();
    let mut desired = stable_count;
    if panicking {
        state.max_panic = state.max_panic.max(panic_count).max(obs.ready);
        desired = state.max_panic;
    }

    if cfg.scale_down_delay_ms > 0 {
        state.delay_window.push_back((obs.now_ms, desired));
        while state.delay_window.front().is_some_and(|(t, _)| *t + cfg.scale_down_delay_ms <= obs.now_ms) {
            state.delay_window.pop_front();
        }
        desired = state.delay_window.iter().map(|(_, n)| *n).max().unwrap_or(desired);
    }

    // Scale to zero only after the grace period without demand.
    if stable > 0.0 || panic > 0.0 {
        state.last_active_ms = Some(obs.now_ms);
    }
    if desired == 0 && obs.ready > 0 {
        let quiet_since = state.last_active_ms.unwrap_or(0);
        if quiet_since + cfg.scale_to_zero_grace_ms > obs.now_ms {
            desired = 1;
        }
    }
    Decision { desired: bound(desired), panicking }
}

/// The average of per-second samples `(second_ms, concurrency)` over the `window_ms` before
/// `now_ms`, as Knative averages: divided by the seconds of the window that lie after the first
/// sample ever seen (`first_ms`), so a version that just started is not diluted by seconds it
/// did not exist. Seconds without a sample count as zero. `None` without any sample.
pub fn window_average(samples: &[(u64, f64)], first_ms: Option<u64>, now_ms: u64, window_ms: u64) -> Option<f64> {
    window_average_of(samples.iter().copied(), first_ms, now_ms, window_ms)
}

/// [`window_average`] over samples given in time order by an iterator (so that a caller can
/// append a sample without copying the series).
pub fn window_average_of(
    samples: impl Iterator<Item = (u64, f64)>,
    first_ms: Option<u64>,
    now_ms: u64,
    window_ms: u64,
) -> Option<f64> {
    let first = first_ms?;
    let start = now_ms.saturating_sub(window_ms).max(first);
    let seconds = ((now_ms.saturating_sub(start)) / 1000).max(1) as f64;
    let sum: f64 = samples.filter(|(t, _)| *t >= start && *t < now_ms).map(|(_, c)| c).sum();
    Some(sum / seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row: settings changed from the defaults, the state before, the observation, and the
    /// expected (desired, panicking) with the state after where it matters.
    struct Row {
        name: &'static str,
        cfg: Config,
        state: State,
        now_s: u64,
        ready: u32,
        stable: Option<f64>,
        panic: Option<f64>,
        want: (u32, bool),
    }

    fn row(
        name: &'static str,
        now_s: u64,
        ready: u32,
        stable: Option<f64>,
        panic: Option<f64>,
        want: (u32, bool),
    ) -> Row {
        Row { name, cfg: Config::default(), state: State::default(), now_s, ready, stable, panic, want }
    }

    fn check(rows: Vec<Row>) {
        for mut r in rows {
            let obs = Observation { now_ms: r.now_s * 1000, ready: r.ready, stable: r.stable, panic: r.panic };
            let d = decide(&r.cfg, &mut r.state, &obs);
            assert_eq!((d.desired, d.panicking), r.want, "{}", r.name);
        }
    }

    #[test]
    fn the_kpa_table() {
        // Target per instance with the defaults: 10 × 0.7 = 7.
        let panicking_since =
            |s: u64, max: u32| State { panic_since_ms: Some(s * 1000), max_panic: max, ..State::default() };
        let active_at = |s: u64| State { last_active_ms: Some(s * 1000), ..State::default() };
        let cfg = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c
        };
        check(vec![
            row("no metrics: the initial scale", 0, 0, None, None, (1, false)),
            Row {
                cfg: cfg(|c| c.initial_scale = 3),
                ..row("no metrics: a chosen initial scale", 0, 0, None, None, (3, false))
            },
            Row {
                cfg: cfg(|c| c.initial_scale = 0),
                ..row("initial scale 0 is allowed", 0, 0, None, None, (0, false))
            },
            row("steady at target: keep", 100, 2, Some(14.0), Some(14.0), (2, false)),
            row("just above target rounds up", 100, 2, Some(14.1), Some(14.1), (3, false)),
            row("demand grows below the panic threshold", 100, 2, Some(21.0), Some(20.0), (3, false)),
            row("scale-up capped at 1000x ready", 100, 1, Some(70_000.0), Some(1.0), (1000, false)),
            row("scale-down capped at half of ready", 100, 10, Some(7.0), Some(7.0), (5, false)),
            row("scale-down of 3 ready floors at 1", 100, 3, Some(0.5), Some(0.5), (1, false)),
            row("panic entry at 2x capacity", 100, 2, Some(14.0), Some(28.0), (4, true)),
            row("just under 2x capacity: no panic", 100, 3, Some(14.0), Some(35.0), (2, false)),
            row("panic from zero ready counts ready as 1", 100, 0, Some(7.0), Some(14.0), (2, true)),
            Row {
                state: panicking_since(95, 8),
                ..row("in panic: no scale-down below the panic max", 100, 8, Some(7.0), Some(7.0), (8, true))
            },
            Row {
                state: panicking_since(95, 4),
                ..row("in panic: grows with panic demand", 100, 4, Some(7.0), Some(70.0), (10, true))
            },
            Row {
                state: panicking_since(41, 8),
                ..row("panic ends only after a full stable window", 100, 8, Some(7.0), Some(7.0), (8, true))
            },
            Row {
                state: panicking_since(40, 8),
                ..row("a full stable window without threshold ends panic", 100, 8, Some(7.0), Some(7.0), (4, false))
            },
            Row {
                state: active_at(90),
                ..row("no demand within the grace: keep one", 100, 1, Some(0.0), Some(0.0), (1, false))
            },
            Row {
                state: active_at(70),
                ..row("no demand past the grace: to zero", 100, 1, Some(0.0), Some(0.0), (0, false))
            },
            row("already at zero with no demand stays at zero", 100, 0, Some(0.0), Some(0.0), (0, false)),
            row("demand at zero ready activates", 100, 0, Some(0.5), Some(0.5), (1, false)),
            Row {
                cfg: cfg(|c| c.activation_scale = 3),
                ..row("activation scale on any demand", 100, 0, Some(0.5), Some(0.5), (3, false))
            },
            Row {
                cfg: cfg(|c| c.activation_scale = 3),
                state: active_at(0),
                ..row("activation scale does not hold without demand", 100, 3, Some(0.0), Some(0.0), (1, false))
            },
            Row {
                cfg: cfg(|c| c.min_scale = 2),
                ..row("min scale keeps provisioned instances", 100, 2, Some(0.0), Some(0.0), (2, false))
            },
            Row { cfg: cfg(|c| c.max_scale = 5), ..row("max scale caps", 100, 4, Some(70.0), Some(70.0), (5, true)) },
            Row {
                cfg: cfg(|c| c.concurrency = 100),
                ..row("a bigger concurrency needs fewer instances", 100, 2, Some(140.0), Some(140.0), (2, false))
            },
            Row {
                cfg: cfg(|c| c.target_utilization = 1.0),
                ..row("utilization 100 %", 100, 2, Some(20.0), Some(20.0), (2, false))
            },
            Row {
                cfg: cfg(|c| c.max_scale_down_rate = 10.0),
                ..row("a faster scale-down rate", 100, 10, Some(7.0), Some(7.0), (1, false))
            },
        ]);
    }

    #[test]
    fn scale_down_delay_holds_the_maximum_of_the_window() {
        let cfg = Config { scale_down_delay_ms: 10_000, max_scale_down_rate: 100.0, ..Config::default() };
        let mut state = State::default();
        let mut at = |s: u64, ready: u32, c: f64| {
            let obs = Observation { now_ms: s * 1000, ready, stable: Some(c), panic: Some(c) };
            decide(&cfg, &mut state, &obs).desired
        };
        assert_eq!(at(0, 5, 35.0), 5);
        assert_eq!(at(2, 5, 7.0), 5, "held at the window's maximum");
        assert_eq!(at(8, 5, 7.0), 5);
        assert_eq!(at(10, 5, 7.0), 1, "the 5 left the 10 s window");
    }

    #[test]
    fn panic_state_carries_across_ticks_like_knative() {
        let cfg = Config::default();
        let mut state = State::default();
        let mut tick = |s: u64, ready: u32, stable: f64, panic: f64| {
            let obs = Observation { now_ms: s * 1000, ready, stable: Some(stable), panic: Some(panic) };
            decide(&cfg, &mut state, &obs)
        };
        assert_eq!(tick(0, 1, 7.0, 7.0), Decision { desired: 1, panicking: false });
        assert_eq!(tick(2, 1, 10.0, 70.0), Decision { desired: 10, panicking: true }, "burst: panic");
        assert_eq!(tick(4, 10, 20.0, 14.0), Decision { desired: 10, panicking: true }, "demand falls: hold");
        assert_eq!(tick(61, 10, 14.0, 14.0), Decision { desired: 10, panicking: true }, "59 s after: still");
        assert_eq!(tick(62, 10, 14.0, 14.0), Decision { desired: 5, panicking: false }, "a stable window later");
    }

    #[test]
    fn window_averages_do_not_dilute_a_young_version() {
        let samples = [(0, 10.0), (1000, 10.0), (2000, 10.0)];
        assert_eq!(window_average(&samples, Some(0), 3000, 60_000), Some(10.0));
        assert_eq!(window_average(&samples, None, 3000, 60_000), None);
        // An old version: the whole window counts, seconds without a sample are zero.
        let old = [(58_000, 30.0), (59_000, 30.0)];
        assert_eq!(window_average(&old, Some(0), 60_000, 6_000), Some(10.0));
        assert_eq!(window_average(&old, Some(0), 120_000, 60_000), Some(0.0), "nothing in the window");
    }
}
