//! Progress from the tool's own output.
//!
//! For ffmpeg: the input duration comes from its stderr banner
//! (`  Duration: 00:00:05.00, start: 0.000000, bitrate: 319 kb/s`), and the
//! position from the `key=value` blocks that `-progress pipe:1` writes to
//! stdout, each ended by `progress=continue` or `progress=end`.

use serde::{Deserialize, Serialize};

use crate::job::Progress;

/// How a tool reports progress (config: `progress: ffmpeg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressKind {
    /// No progress reporting: only the job state changes.
    #[default]
    None,
    /// ffmpeg's `-progress pipe:1` on stdout plus its banner on stderr.
    Ffmpeg,
}

/// Follows one ffmpeg run's output.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FfmpegProgress {
    /// Total media duration in seconds, once known.
    duration: Option<f64>,
    /// Set by [`FfmpegProgress::set_duration`]: the banner no longer applies.
    duration_fixed: bool,
    /// Latest position seen (kept across blocks that report N/A).
    processed: Option<f64>,
    /// `speed=` of the current block.
    speed: Option<f64>,
}

/// `HH:MM:SS.frac` (hours may exceed 24), non-negative.
fn parse_clock(s: &str) -> Option<f64> {
    let mut parts = s.split(':');
    let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || [h, m]
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    if !sec.bytes().all(|b| b.is_ascii_digit() || b == b'.') || sec.is_empty() {
        return None;
    }
    let secs = h.parse::<f64>().ok()? * 3600.0
        + m.parse::<f64>().ok()? * 60.0
        + sec.parse::<f64>().ok()?;
    secs.is_finite().then_some(secs)
}

/// Microseconds as ffmpeg prints them; negative (`-9223372036854775807`)
/// and `N/A` mean "unknown".
fn parse_micros(s: &str) -> Option<f64> {
    let us = s.parse::<i64>().ok()?;
    (us >= 0).then_some(us as f64 / 1_000_000.0)
}

impl FfmpegProgress {
    /// The media duration, when known.
    pub fn duration(&self) -> Option<f64> {
        self.duration
    }

    /// Set the duration from elsewhere (a probe, a `-t` parameter); the
    /// banner is ignored from then on. Non-positive or non-finite clears it.
    pub fn set_duration(&mut self, secs: f64) {
        self.duration = (secs.is_finite() && secs > 0.0).then_some(secs);
        self.duration_fixed = true;
    }

    /// One stderr line. Picks up the first input's `Duration:`; `N/A` leaves
    /// the duration unknown.
    pub fn feed_stderr_line(&mut self, line: &str) {
        if self.duration_fixed || self.duration.is_some() {
            return;
        }
        // Stats lines end in `\r`, not `\n`: look at each segment.
        for seg in line.split('\r') {
            let Some(rest) = seg.trim_start().strip_prefix("Duration:") else {
                continue;
            };
            let value = rest.split(',').next().unwrap_or("").trim();
            if let Some(d) = parse_clock(value).filter(|d| *d > 0.0) {
                self.duration = Some(d);
                return;
            }
        }
    }

    /// One stdout line of `-progress pipe:1`. Returns the progress at the end
    /// of each block (the `progress=` line); malformed lines are ignored.
    pub fn feed_stdout_line(&mut self, line: &str) -> Option<Progress> {
        let (key, value) = line.trim().split_once('=')?;
        let value = value.trim();
        match key.trim() {
            "out_time_us" | "out_time_ms" => {
                // ffmpeg writes microseconds under both names.
                if let Some(s) = parse_micros(value) {
                    self.processed = Some(s);
                }
            }
            "out_time" => {
                if let Some(s) = parse_clock(value) {
                    self.processed = Some(s);
                }
            }
            "speed" => {
                self.speed = value
                    .strip_suffix('x')
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|v| v.is_finite() && *v >= 0.0);
            }
            "progress" => {
                let end = match value {
                    "continue" => false,
                    "end" => true,
                    _ => return None,
                };
                let percent = if end {
                    Some(100.0)
                } else {
                    match (self.processed, self.duration) {
                        (Some(p), Some(d)) => Some((p / d * 100.0).clamp(0.0, 100.0)),
                        _ => None,
                    }
                };
                let progress = Progress {
                    percent,
                    processed_seconds: self.processed,
                    speed: self.speed.take(),
                };
                return Some(progress);
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real ffmpeg 5.1 stderr banner (`-hide_banner`), 5 s mpeg4 input.
    const BANNER_5S: &str = "\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'in.mp4':
  Metadata:
    major_brand     : isom
    encoder         : Lavf59.27.100
  Duration: 00:00:05.00, start: 0.000000, bitrate: 319 kb/s
  Stream #0:0[0x1](und): Video: mpeg4 (Simple Profile) (mp4v / 0x7634706D), yuv420p, 320x240 [SAR 1:1 DAR 4:3], 317 kb/s, 25 fps, 25 tbr, 12800 tbn (default)
Stream mapping:
  Stream #0:0 -> #0:0 (mpeg4 (native) -> mpeg4 (native))
Output #0, mp4, to 'out.mp4':
";

    /// Real `-progress pipe:1` output of that 5 s input (two blocks).
    const PROGRESS_5S: &str = "\
frame=1
fps=0.00
stream_0_0_q=3.8
bitrate=4512.8kbits/s
total_size=44
out_time_us=78
out_time_ms=78
out_time=00:00:00.000078
dup_frames=0
drop_frames=0
speed=0.127x
progress=continue
frame=125
fps=0.00
stream_0_0_q=2.0
bitrate= 201.4kbits/s
total_size=124864
out_time_us=4960078
out_time_ms=4960078
out_time=00:00:04.960078
dup_frames=0
drop_frames=0
speed=92.2x
progress=end
";

    /// Real output of a `-re` lavfi source: `Duration: N/A` on stderr,
    /// `speed=N/A` then padded `speed=   0x` on stdout (libx264 lookahead).
    const BANNER_NA: &str = "Input #0, lavfi, from 'testsrc=duration=2:size=160x120:rate=25':\n  Duration: N/A, start: 0.000000, bitrate: N/A\n";
    const PROGRESS_LIVE: &str = "\
frame=1
out_time_us=0
out_time_ms=0
out_time=00:00:00.000000
speed=N/A
progress=continue
frame=6
out_time_us=0
out_time_ms=0
out_time=00:00:00.000000
speed=   0x
progress=continue
out_time_us=1000078
out_time_ms=1000078
out_time=00:00:01.000078
speed=0.994x
progress=continue
";

    fn run(p: &mut FfmpegProgress, stdout: &str) -> Vec<Progress> {
        stdout
            .lines()
            .filter_map(|l| p.feed_stdout_line(l))
            .collect()
    }

    fn approx(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-6)
    }

    #[test]
    fn real_ffmpeg_run_with_known_duration() {
        let mut p = FfmpegProgress::default();
        BANNER_5S.lines().for_each(|l| p.feed_stderr_line(l));
        assert_eq!(p.duration(), Some(5.0));
        let got = run(&mut p, PROGRESS_5S);
        assert_eq!(got.len(), 2);
        assert!(approx(got[0].processed_seconds, 0.000078));
        assert!(approx(got[0].percent, 0.00156));
        assert!(approx(got[0].speed, 0.127));
        assert!(approx(got[1].processed_seconds, 4.960078));
        assert_eq!(got[1].percent, Some(100.0), "progress=end is 100%");
        assert!(approx(got[1].speed, 92.2));
    }

    #[test]
    fn real_ffmpeg_run_with_unknown_duration() {
        let mut p = FfmpegProgress::default();
        BANNER_NA.lines().for_each(|l| p.feed_stderr_line(l));
        assert_eq!(p.duration(), None);
        let got = run(&mut p, PROGRESS_LIVE);
        let want = [
            (Some(0.0), None),
            (Some(0.0), Some(0.0)),
            (Some(1.000078), Some(0.994)),
        ];
        assert_eq!(got.len(), want.len());
        for (g, (processed, speed)) in got.iter().zip(want) {
            assert_eq!(g.percent, None);
            assert_eq!(g.processed_seconds, processed);
            assert_eq!(g.speed, speed);
        }
        assert_eq!(
            p.feed_stdout_line("progress=end").unwrap().percent,
            Some(100.0)
        );
    }

    #[test]
    fn set_duration_wins_over_the_banner() {
        let mut p = FfmpegProgress::default();
        p.set_duration(2.0);
        BANNER_5S.lines().for_each(|l| p.feed_stderr_line(l));
        assert_eq!(p.duration(), Some(2.0));
        // Past the duration (e.g. `-t` shorter than the input): clamped.
        let got = run(&mut p, "out_time_us=3000000\nprogress=continue\n");
        assert_eq!(got[0].percent, Some(100.0));
        p.set_duration(0.0);
        assert_eq!(p.duration(), None);
    }

    #[test]
    fn duration_lines() {
        let table = [
            ("  Duration: 00:00:05.00, start: 0.000000, bitrate: 319 kb/s", Some(5.0)),
            ("  Duration: 01:02:03.50, start: 0.000000, bitrate: 4000 kb/s", Some(3723.5)),
            ("  Duration: 00:00:00.00, start: 0.000000, bitrate: N/A", None),
            ("  Duration: N/A, start: 0.000000, bitrate: N/A", None),
            ("frame=  1 fps=0.0 q=0.0 size=0kB time=00:00:00.00\r  Duration: 00:00:10.00, start: 0", Some(10.0)),
            ("Duration: garbage", None),
            ("    encoder         : Lavf59.27.100", None),
        ];
        for (line, want) in table {
            let mut p = FfmpegProgress::default();
            p.feed_stderr_line(line);
            assert_eq!(p.duration(), want, "{line:?}");
        }
        // The first input's duration is kept.
        let mut p = FfmpegProgress::default();
        p.feed_stderr_line("  Duration: 00:00:05.00, start: 0.000000");
        p.feed_stderr_line("  Duration: 00:01:00.00, start: 0.000000");
        assert_eq!(p.duration(), Some(5.0));
    }

    #[test]
    fn malformed_and_unknown_values_are_ignored() {
        // (stdout lines, processed_seconds, speed) of the block they end
        let table: [(&str, Option<f64>, Option<f64>); 9] = [
            ("out_time_us=-9223372036854775807\nout_time_ms=-9223372036854775807\nout_time=-2562047788:00:54.775807\nspeed=N/A", None, None),
            ("out_time_us=N/A\nout_time_ms=N/A\nout_time=N/A\nspeed=N/A", None, None),
            ("out_time_ms=2500000", Some(2.5), None),
            ("out_time=00:01:30.250000", Some(90.25), None),
            ("out_time=1:2", None, None),
            ("garbage\n=\nout_time_us\nspeed=fast", None, None),
            ("speed=1.5x", None, Some(1.5)),
            ("speed=-1x", None, None),
            ("speed=nanx", None, None),
        ];
        for (lines, processed, speed) in table {
            let mut p = FfmpegProgress::default();
            p.set_duration(10.0);
            let got = run(&mut p, &format!("{lines}\nprogress=continue"));
            assert_eq!(got.len(), 1, "{lines:?}");
            assert_eq!(got[0].processed_seconds, processed, "{lines:?}");
            assert_eq!(got[0].speed, speed, "{lines:?}");
        }
        // An unknown progress= value ends nothing.
        let mut p = FfmpegProgress::default();
        assert_eq!(p.feed_stdout_line("progress=maybe"), None);
        // A block reporting N/A keeps the last known position.
        let got = run(
            &mut p,
            "out_time_us=1000000\nprogress=continue\nout_time_us=N/A\nprogress=continue",
        );
        assert_eq!(got[1].processed_seconds, Some(1.0));
    }

    #[test]
    fn progress_kind_from_config() {
        for (yaml, want) in [
            ("none", ProgressKind::None),
            ("ffmpeg", ProgressKind::Ffmpeg),
        ] {
            assert_eq!(serde_yaml::from_str::<ProgressKind>(yaml).unwrap(), want);
        }
        assert!(serde_yaml::from_str::<ProgressKind>("FFmpeg").is_err());
        assert_eq!(ProgressKind::default(), ProgressKind::None);
    }
}
