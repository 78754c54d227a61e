//! Fault injection for chaos drills: per route, delay a share of requests
//! by a duration and abort a share with a status. Off unless the route has
//! a `fault` section. As in Envoy, the delay is decided and served first,
//! then the abort; the two draws are independent.

use std::time::Duration;

use crank_api::proxy::FaultConfig;

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

/// Decides with two uniform draws in `[0, 100)`.
pub fn decide(cfg: &FaultConfig, draw_delay: f64, draw_abort: f64) -> Faults {
    Faults {
        delay: cfg
            .delay
            .as_ref()
            .filter(|d| draw_delay < d.percent)
            .map(|d| d.duration),
        abort: cfg
            .abort
            .as_ref()
            .filter(|a| draw_abort < a.percent)
            .map(|a| a.status),
    }
}

/// Decides with fresh random draws.
pub fn roll(cfg: &FaultConfig) -> Faults {
    decide(
        cfg,
        rand::random::<f64>() * 100.0,
        rand::random::<f64>() * 100.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_api::proxy::{AbortFault, DelayFault};

    fn cfg() -> FaultConfig {
        FaultConfig {
            delay: Some(DelayFault {
                percent: 5.0,
                duration: Duration::from_secs(2),
            }),
            abort: Some(AbortFault {
                percent: 1.0,
                status: 503,
            }),
        }
    }

    #[test]
    fn draws_below_the_percent_fire() {
        let c = cfg();
        assert_eq!(
            decide(&c, 4.99, 0.5),
            Faults {
                delay: Some(Duration::from_secs(2)),
                abort: Some(503)
            }
        );
        assert_eq!(decide(&c, 5.0, 1.0), Faults::default());
        assert_eq!(decide(&FaultConfig::default(), 0.0, 0.0), Faults::default());
        let zero = FaultConfig {
            abort: Some(AbortFault {
                percent: 0.0,
                status: 500,
            }),
            delay: None,
        };
        assert_eq!(decide(&zero, 0.0, 0.0), Faults::default(), "0% never fires");
    }

    #[test]
    fn shares_hold_over_many_rolls() {
        let c = cfg();
        let n = 200_000;
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..n {
            let f = roll(&c);
            delayed += usize::from(f.delay.is_some());
            aborted += usize::from(f.abort.is_some());
        }
        let d = delayed as f64 / n as f64 * 100.0;
        let a = aborted as f64 / n as f64 * 100.0;
        assert!((4.7..5.3).contains(&d), "delay share {d}%");
        assert!((0.85..1.15).contains(&a), "abort share {a}%");
    }
}
