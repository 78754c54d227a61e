//! Why a run failed: the exit status and the tail of stderr, mapped to a
//! [`FailureClass`] (which decides retries) and one line for humans.
//!
//! Config:
//!
//! ```yaml
//! failures:
//!   - {pattern: "license check failed", class: bad_input}
//! exit_codes: {2: bad_input}
//! ```
//!
//! Order of decision: timeout; stopped by the shim; killed by a signal;
//! config `failures`; config `exit_codes`; the built-in ffmpeg rules
//! ([`BUILTIN_RULES`], resource exhaustion before bad input); otherwise a
//! tool crash.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::job::{Failure, FailureClass};

/// How a run ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, when the tool exited.
    pub code: Option<i32>,
    /// Signal number, when the tool was killed.
    pub signal: Option<i32>,
    /// The shim killed it for going over the job's timeout.
    pub timed_out: bool,
    /// The shim killed it (cancel or shutdown), for any reason.
    pub killed_by_shim: bool,
}

/// A config rule: a stderr line matching `pattern` (a regex, matched
/// case-insensitively anywhere in the line) means `class`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRule {
    pub pattern: String,
    pub class: FailureClass,
}

/// Built-in rules for ffmpeg, as literal (case-insensitive) substrings,
/// checked in this order. Messages verified against ffmpeg 5.1 where they
/// can be produced without special hardware.
pub const BUILTIN_RULES: &[(&str, FailureClass)] = &[
    ("Cannot allocate memory", FailureClass::OutOfResources),
    ("out of memory", FailureClass::OutOfResources),
    ("No space left on device", FailureClass::OutOfResources),
    ("OpenEncodeSessionEx failed", FailureClass::OutOfResources),
    ("CUDA_ERROR_OUT_OF_MEMORY", FailureClass::OutOfResources),
    ("Too many open files", FailureClass::OutOfResources),
    (
        "Resource temporarily unavailable",
        FailureClass::OutOfResources,
    ),
    // x264's own allocator: `x264 [error]: malloc of size 429198528 failed`
    ("malloc of size", FailureClass::OutOfResources),
    // The host lacks what the job needs (no NVIDIA driver or GPU): retrying
    // here cannot help, and the input is not at fault.
    ("Cannot load libcuda", FailureClass::Internal),
    ("No NVENC capable devices found", FailureClass::Internal),
    ("no CUDA-capable device is detected", FailureClass::Internal),
    ("CUDA_ERROR_NO_DEVICE", FailureClass::Internal),
    // Specific bad-input messages before the generic ones below, so the
    // message shows the most telling line.
    (
        "Invalid data found when processing input",
        FailureClass::BadInput,
    ),
    ("No such file or directory", FailureClass::BadInput),
    (
        "Output file #0 does not contain any stream",
        FailureClass::BadInput,
    ),
    ("does not contain any stream", FailureClass::BadInput),
    ("moov atom not found", FailureClass::BadInput),
    ("Unknown encoder", FailureClass::BadInput),
    ("Unrecognized option", FailureClass::BadInput),
    ("Error opening input", FailureClass::BadInput),
    ("Invalid frame dimensions", FailureClass::BadInput),
    ("corrupt input packet", FailureClass::BadInput),
    ("No such filter", FailureClass::BadInput),
    ("Cannot parse expression", FailureClass::BadInput),
    ("Error setting option", FailureClass::BadInput),
    ("not divisible by 2", FailureClass::BadInput),
    ("Invalid argument", FailureClass::BadInput),
];

/// ffmpeg's generic closing lines: true but uninformative, shown only when
/// nothing better was printed.
const GENERIC_LINES: &[&str] = &[
    "Conversion failed!",
    "Error while processing the decoded data for stream",
    "Failed to inject frame into filter network",
    "Error reinitializing filters!",
    "Error splitting the argument list",
    "Error initializing output stream",
    "Error while decoding stream",
    "Error while filtering",
];

/// Progress and banner lines: never the reason.
const NOISE_PREFIXES: &[&str] = &[
    "Input #",
    "Output #",
    "Stream mapping:",
    "frame=",
    "size=",
    "video:",
    "Press [q]",
    "  ",
];

const MAX_MESSAGE: usize = 300;

#[derive(Debug, Clone)]
struct Rule {
    re: Regex,
    class: FailureClass,
}

/// Compiled rules: config first, then the built-ins.
#[derive(Debug, Clone)]
pub struct Classifier {
    config: Vec<Rule>,
    exit_codes: BTreeMap<i32, FailureClass>,
    builtin: Vec<Rule>,
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    })
}

fn describe_signal(sig: i32) -> String {
    match signal_name(sig) {
        Some(name) => format!("signal {sig} ({name})"),
        None => format!("signal {sig}"),
    }
}

/// `[libx264 @ 0x55d0c3a1b2c0] ` → `[libx264] `: the address is noise.
static ADDRESS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[([^\]\[@]+?) @ 0x[0-9a-fA-F]+\]").expect("valid regex"));

/// What a terminal shows of a line: the text after the last `\r`, trimmed.
fn visible(line: &str) -> &str {
    line.rsplit('\r').next().unwrap_or("").trim()
}

fn is_noise(line: &str) -> bool {
    let last = line.rsplit('\r').next().unwrap_or("");
    last.trim().is_empty() || NOISE_PREFIXES.iter().any(|p| last.starts_with(p))
}

fn is_generic(line: &str) -> bool {
    let shown = visible(line);
    GENERIC_LINES.iter().any(|g| shown.starts_with(g))
}

fn tidy(line: &str) -> String {
    let line = ADDRESS.replace_all(visible(line), "[$1]");
    if line.chars().count() > MAX_MESSAGE {
        let cut: String = line.chars().take(MAX_MESSAGE - 3).collect();
        format!("{cut}...")
    } else {
        line.into_owned()
    }
}

/// The last line worth showing: not noise, and not generic unless nothing
/// else is left.
fn best_line(tail: &[String]) -> Option<&str> {
    let meaningful = || tail.iter().rev().filter(|l| !is_noise(l));
    meaningful()
        .find(|l| !is_generic(l))
        .or_else(|| meaningful().next())
        .map(String::as_str)
}

fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern).case_insensitive(true).build()
}

impl Classifier {
    /// Compile the config rules (errors name the rule and the fix).
    pub fn new(
        rules: &[FailureRule],
        exit_codes: &BTreeMap<i32, FailureClass>,
    ) -> Result<Classifier, String> {
        let mut config = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            if r.pattern.is_empty() {
                return Err(format!(
                    "failures[{i}]: the pattern is empty and would match every line; give a regex"
                ));
            }
            let re = compile(&r.pattern).map_err(|e| {
                format!(
                    "failures[{i}]: pattern {:?} does not compile, fix the regex: {e}",
                    r.pattern
                )
            })?;
            config.push(Rule { re, class: r.class });
        }
        if exit_codes.contains_key(&0) {
            return Err(
                "exit_codes: 0 means success and cannot be a failure class; remove it".into(),
            );
        }
        let builtin = BUILTIN_RULES
            .iter()
            .map(|(p, class)| Rule {
                re: compile(&regex::escape(p)).expect("escaped literal compiles"),
                class: *class,
            })
            .collect();
        Ok(Classifier {
            config,
            exit_codes: exit_codes.clone(),
            builtin,
        })
    }

    /// The first rule (in order) that matches some line, and the line to
    /// show: the last matching line that is not one of ffmpeg's generic
    /// ones, else the last matching line.
    fn matching<'a>(rules: &[Rule], tail: &'a [String]) -> Option<(FailureClass, &'a str)> {
        rules.iter().find_map(|r| {
            let hits = || tail.iter().rev().filter(|l| r.re.is_match(l));
            hits()
                .find(|l| !is_generic(l))
                .or_else(|| hits().next())
                .map(|l| (r.class, l.as_str()))
        })
    }

    /// Classify a failed run from its exit and the last lines of stderr.
    pub fn classify(&self, exit: &ExitInfo, stderr_tail: &[String]) -> Failure {
        let fail = |class: FailureClass, message: String| Failure {
            class,
            message,
            exit_code: exit.code,
            signal: exit.signal,
        };
        let with_line = |head: String, line: Option<&str>| match line {
            Some(l) => format!("{head}: {}", tidy(l)),
            None => head,
        };
        let best = best_line(stderr_tail);
        let status = match (exit.code, exit.signal) {
            (_, Some(sig)) => format!("killed by {}", describe_signal(sig)),
            (Some(code), None) => format!("exit code {code}"),
            (None, None) => "ended without an exit code".to_string(),
        };

        if exit.timed_out {
            let message = match best {
                Some(l) => format!("timed out; last output: {}", tidy(l)),
                None => "timed out".to_string(),
            };
            return fail(FailureClass::Timeout, message);
        }
        if exit.killed_by_shim {
            return fail(
                FailureClass::Interrupted,
                format!("stopped by the shim ({status})"),
            );
        }
        if let Some(sig) = exit.signal {
            if sig == 9 {
                return fail(
                    FailureClass::OutOfResources,
                    "killed by SIGKILL, likely the OOM killer".into(),
                );
            }
            return fail(FailureClass::ToolCrash, with_line(status, best));
        }
        if let Some((class, line)) = Self::matching(&self.config, stderr_tail) {
            return fail(class, with_line(status, Some(line)));
        }
        if let Some(class) = exit.code.and_then(|c| self.exit_codes.get(&c)) {
            return fail(*class, with_line(status, best));
        }
        if let Some((class, line)) = Self::matching(&self.builtin, stderr_tail) {
            return fail(class, with_line(status, Some(line)));
        }
        fail(FailureClass::ToolCrash, with_line(status, best))
    }
}

impl Default for Classifier {
    /// The built-in rules only.
    fn default() -> Self {
        Classifier::new(&[], &BTreeMap::new()).expect("built-in rules compile")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureClass::*;

    // Real ffmpeg 5.1 stderr (`-hide_banner -nostdin -y`), trimmed to the
    // lines after the banner.

    /// `-i garbage.mp4` (random bytes)
    const GARBAGE: &str = "\
[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55e263d44880] Format mov,mp4,m4a,3gp,3g2,mj2 detected only with low score of 1, misdetection possible!
[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55e263d44880] moov atom not found
garbage.mp4: Invalid data found when processing input";
    /// `-i nope.mp4`
    const MISSING: &str = "nope.mp4: No such file or directory";
    /// `-c:v libfoo`
    const ENCODER: &str = "\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'in.mp4':
  Duration: 00:00:05.00, start: 0.000000, bitrate: 319 kb/s
      encoder         : Lavc59.37.100 mpeg4
Unknown encoder 'libfoo'";
    /// `-frobnicate 3`
    const OPTION: &str = "\
Unrecognized option 'frobnicate'.
Error splitting the argument list: Option not found";
    /// `-vn -an`
    const NO_STREAM: &str = "\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'in.mp4':
Output #0, mp4, to 'o.mp4':
Output file #0 does not contain any stream";
    /// `-vf frob`
    const NO_FILTER: &str = "\
Stream mapping:
  Stream #0:0 -> #0:0 (mpeg4 (native) -> h264 (libx264))
[AVFilterGraph @ 0x55f817442e40] No such filter: 'frob'
Error reinitializing filters!
Failed to inject frame into filter network: Invalid argument
Error while processing the decoded data for stream #0:0
Conversion failed!";
    /// `-vf scale=-2:abc`
    const BAD_FILTER_ARG: &str = "\
[Parsed_scale_0 @ 0x55cd39289a80] [Eval @ 0x7ffcbafb7240] Undefined constant or missing '(' in 'abc'
[Parsed_scale_0 @ 0x55cd39289a80] Cannot parse expression for height: 'abc'
[AVFilterGraph @ 0x55cd3920fe40] Error initializing filter 'scale' with args '-2:abc'
Error reinitializing filters!
Failed to inject frame into filter network: Invalid argument
Error while processing the decoded data for stream #0:0
Conversion failed!";
    /// `-crf abc`
    const BAD_CRF: &str = "\
[libx264 @ 0x55fd6e0c0a40] [Eval @ 0x7ffe25c66c80] Undefined constant or missing '(' in 'abc'
[libx264 @ 0x55fd6e0c0a40] Unable to parse option value \"abc\"
[libx264 @ 0x55fd6e0c0a40] Error setting option crf to value abc.
Error initializing output stream 0:0 -- Error while opening encoder for output stream #0:0 - maybe incorrect parameters such as bit_rate, rate, width or height
Conversion failed!";
    /// `-c:v libx264 -vf scale=101:101`
    const ODD_SIZE: &str = "\
[libx264 @ 0x56147000d1c0] width not divisible by 2 (101x101)
Error initializing output stream 0:0 -- Error while opening encoder for output stream #0:0 - maybe incorrect parameters such as bit_rate, rate, width or height
Conversion failed!";
    /// `-xerror -i bad.ts` (an MPEG-TS with flipped bytes: a failing decode),
    /// including a `-stats` line that ends in `\r`.
    const CORRUPT: &str = "\
frame=    1 fps=0.0 q=0.0 size=       0kB time=00:00:00.00 bitrate=N/A speed=   0x    \r[mpeg4 @ 0x5603748911c0] 1. marker bit missing in 3. esc
[mpeg4 @ 0x55b1d870f040] concealing 100 DC, 100 AC, 100 MV errors in P frame
[mpegts @ 0x55b1d869f8c0] Packet corrupt (stream = 0, dts = 212400).
bad.ts: corrupt input packet in stream 0
Conversion failed!";
    /// 8K testsrc under `ulimit -v 600000`
    const NO_MEMORY: &str = "\
Stream mapping:
Error while filtering: Cannot allocate memory
Failed to inject frame into filter network: Cannot allocate memory
Error while processing the decoded data for stream #0:0
Conversion failed!";
    /// the same under `ulimit -v 400000`
    const EAGAIN: &str = "\
Error reinitializing filters!
Error while filtering: Resource temporarily unavailable
Finishing stream 0:0 without any data written to it.
[auto_scale_0 @ 0x558aa359b080] Failed to configure output pad on auto_scale_0
Error configuring filter graph
Conversion failed!";
    /// the same under `ulimit -v 800000`, with libx264
    const X264_MALLOC: &str = "\
[libx264 @ 0x560868093780] using cpu capabilities: MMX2 SSE2Fast SSSE3 SSE4.2 AVX FMA3 BMI2 AVX2 AVX512
x264 [error]: malloc of size 429198528 failed
Error initializing output stream 0:0 -- Error while opening encoder for output stream #0:0 - maybe incorrect parameters such as bit_rate, rate, width or height
Conversion failed!";
    /// output to /dev/full
    /// `-c:v h264_nvenc` on a host without the NVIDIA driver (ffmpeg 5.1).
    const NO_CUDA: &str = "\
[h264_nvenc @ 0x5612f83b77c0] Cannot load libcuda.so.1
Error initializing output stream 0:0 -- Error while opening encoder for output stream #0:0 - maybe incorrect parameters such as bit_rate, rate, width or height
[aac @ 0x5612f83b8a40] 2 frames left in the queue on closing
Conversion failed!";
    const DISK_FULL: &str = "\
[libx264 @ 0x55a213458a80] profile High, level 1.3, 4:2:0, 8-bit
Could not write header for output file #0 (incorrect codec parameters ?): No space left on device
Error initializing output stream 0:0 -- 
Conversion failed!";
    /// SIGTERM from outside: ffmpeg catches it and exits 255.
    const SIGTERM: &str = "\
[libx264 @ 0x55a2435abf00] kb/s:45.27
Exiting normally, received signal 15.";

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    fn code(c: i32) -> ExitInfo {
        ExitInfo {
            code: Some(c),
            ..ExitInfo::default()
        }
    }

    fn signal(s: i32) -> ExitInfo {
        ExitInfo {
            signal: Some(s),
            ..ExitInfo::default()
        }
    }

    #[test]
    fn real_ffmpeg_failures_with_the_builtin_rules() {
        let table = [
            (GARBAGE, BadInput, "exit code 1: garbage.mp4: Invalid data found when processing input"),
            (MISSING, BadInput, "exit code 1: nope.mp4: No such file or directory"),
            (ENCODER, BadInput, "exit code 1: Unknown encoder 'libfoo'"),
            (OPTION, BadInput, "exit code 1: Unrecognized option 'frobnicate'."),
            (NO_STREAM, BadInput, "exit code 1: Output file #0 does not contain any stream"),
            (NO_FILTER, BadInput, "exit code 1: [AVFilterGraph] No such filter: 'frob'"),
            (BAD_FILTER_ARG, BadInput, "exit code 1: [Parsed_scale_0] Cannot parse expression for height: 'abc'"),
            (BAD_CRF, BadInput, "exit code 1: [libx264] Error setting option crf to value abc."),
            (ODD_SIZE, BadInput, "exit code 1: [libx264] width not divisible by 2 (101x101)"),
            (CORRUPT, BadInput, "exit code 1: bad.ts: corrupt input packet in stream 0"),
            (NO_MEMORY, OutOfResources, "exit code 1: Failed to inject frame into filter network: Cannot allocate memory"),
            (EAGAIN, OutOfResources, "exit code 1: Error while filtering: Resource temporarily unavailable"),
            (X264_MALLOC, OutOfResources, "exit code 1: x264 [error]: malloc of size 429198528 failed"),
            (DISK_FULL, OutOfResources, "exit code 1: Could not write header for output file #0 (incorrect codec parameters ?): No space left on device"),
            (NO_CUDA, Internal, "exit code 1: [h264_nvenc] Cannot load libcuda.so.1"),
        ];
        let c = Classifier::default();
        for (stderr, class, message) in table {
            let f = c.classify(&code(1), &lines(stderr));
            assert_eq!((f.class, f.message.as_str()), (class, message), "{stderr}");
            assert_eq!((f.exit_code, f.signal), (Some(1), None));
        }
    }

    #[test]
    fn exit_status_decides_before_stderr() {
        let c = Classifier::default();
        let killed = |s| ExitInfo {
            killed_by_shim: true,
            ..signal(s)
        };
        let table = [
            (
                ExitInfo {
                    timed_out: true,
                    ..killed(9)
                },
                GARBAGE,
                Timeout,
                "timed out; last output: garbage.mp4: Invalid data found when processing input",
            ),
            (
                ExitInfo {
                    timed_out: true,
                    ..killed(9)
                },
                "",
                Timeout,
                "timed out",
            ),
            (
                killed(15),
                SIGTERM,
                Interrupted,
                "stopped by the shim (killed by signal 15 (SIGTERM))",
            ),
            (
                ExitInfo {
                    killed_by_shim: true,
                    ..code(255)
                },
                SIGTERM,
                Interrupted,
                "stopped by the shim (exit code 255)",
            ),
            (
                signal(9),
                NO_MEMORY,
                OutOfResources,
                "killed by SIGKILL, likely the OOM killer",
            ),
            (signal(11), "", ToolCrash, "killed by signal 11 (SIGSEGV)"),
            (
                signal(6),
                ODD_SIZE,
                ToolCrash,
                "killed by signal 6 (SIGABRT): [libx264] width not divisible by 2 (101x101)",
            ),
            (signal(7), "", ToolCrash, "killed by signal 7 (SIGBUS)"),
            (signal(4), "", ToolCrash, "killed by signal 4 (SIGILL)"),
            (signal(8), "", ToolCrash, "killed by signal 8 (SIGFPE)"),
            (signal(64), "", ToolCrash, "killed by signal 64"),
            (
                code(255),
                SIGTERM,
                ToolCrash,
                "exit code 255: Exiting normally, received signal 15.",
            ),
            (
                code(1),
                "Conversion failed!",
                ToolCrash,
                "exit code 1: Conversion failed!",
            ),
            (code(1), "", ToolCrash, "exit code 1"),
            (
                ExitInfo::default(),
                "",
                ToolCrash,
                "ended without an exit code",
            ),
        ];
        for (exit, stderr, class, message) in table {
            let f = c.classify(&exit, &lines(stderr));
            assert_eq!((f.class, f.message.as_str()), (class, message), "{exit:?}");
            assert_eq!((f.exit_code, f.signal), (exit.code, exit.signal));
        }
    }

    #[test]
    fn config_rules_and_exit_codes_come_before_the_builtins() {
        let rules: Vec<FailureRule> = serde_yaml::from_str(
            r#"
- {pattern: "malloc of size \\d+ failed", class: tool_crash}
- {pattern: "LICENSE EXPIRED", class: internal}
"#,
        )
        .unwrap();
        let codes: BTreeMap<i32, FailureClass> =
            serde_yaml::from_str("{2: bad_input, 3: out_of_resources}").unwrap();
        let c = Classifier::new(&rules, &codes).unwrap();
        let table = [
            (
                code(1),
                X264_MALLOC,
                ToolCrash,
                "exit code 1: x264 [error]: malloc of size 429198528 failed",
            ),
            (
                code(1),
                "error: license expired",
                Internal,
                "exit code 1: error: license expired",
            ),
            (
                code(2),
                "usage: tool [options]",
                BadInput,
                "exit code 2: usage: tool [options]",
            ),
            // exit_codes beat the built-ins, but not the config rules
            (
                code(3),
                MISSING,
                OutOfResources,
                "exit code 3: nope.mp4: No such file or directory",
            ),
            (
                code(2),
                "License expired",
                Internal,
                "exit code 2: License expired",
            ),
            (
                code(1),
                MISSING,
                BadInput,
                "exit code 1: nope.mp4: No such file or directory",
            ),
        ];
        for (exit, stderr, class, message) in table {
            let f = c.classify(&exit, &lines(stderr));
            assert_eq!((f.class, f.message.as_str()), (class, message), "{stderr}");
        }
    }

    #[test]
    fn config_mistakes_are_reported() {
        let bad = |p: &str| FailureRule {
            pattern: p.into(),
            class: BadInput,
        };
        let none = BTreeMap::new();
        let err = Classifier::new(&[bad("ok"), bad("(unclosed")], &none).unwrap_err();
        assert!(
            err.starts_with("failures[1]: pattern \"(unclosed\" does not compile"),
            "{err}"
        );
        let err = Classifier::new(&[bad("")], &none).unwrap_err();
        assert!(err.contains("failures[0]: the pattern is empty"), "{err}");
        let err = Classifier::new(&[], &[(0, BadInput)].into()).unwrap_err();
        assert!(err.contains("exit_codes: 0 means success"), "{err}");
        let e = serde_yaml::from_str::<FailureRule>("{pattern: x, class: bad_input, retry: true}")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `retry`"), "{e}");
        let e = serde_yaml::from_str::<FailureRule>("{pattern: x, class: flaky}").unwrap_err();
        assert!(e.to_string().contains("unknown variant `flaky`"), "{e}");
    }

    #[test]
    fn messages_are_one_trimmed_line() {
        let c = Classifier::default();
        let long = format!("Unknown encoder '{}'", "x".repeat(400));
        let f = c.classify(&code(1), &[long, String::new(), "   ".into()]);
        assert_eq!(f.class, BadInput);
        assert!(f.message.ends_with("..."));
        assert_eq!(f.message.chars().count(), "exit code 1: ".len() + 300);
        assert!(!f.message.contains('\n'));
        // Banner and progress lines are never the reason.
        let f = c.classify(&code(1), &lines(ENCODER)[..3]);
        assert_eq!(f.message, "exit code 1");
        // Multi-byte text is cut on a character boundary.
        let f = c.classify(&code(1), &["é".repeat(400)]);
        assert_eq!(f.message.chars().count(), "exit code 1: ".len() + 300);
    }
}
