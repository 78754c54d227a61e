//! The command template: an argv list, never a shell line.
//!
//! ```yaml
//! command: [ffmpeg, -hide_banner, -nostdin, -y, -i, "{input}", -vf, "scale=-2:{height}",
//!           -c:v, "{codec}", -progress, pipe:1, -nostats, "{output}"]
//! ```
//!
//! The first element is the program, taken literally. Any other element may
//! hold `{name}` placeholders for declared parameters or for the reserved
//! names `input`, `output`, `workdir` and `job_id`; `{{` and `}}` are literal
//! braces. Each template element renders to exactly one argv element, so a
//! value never splits into several arguments and no shell ever sees it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use super::params::{valid_name, ParamSchema, RESERVED_NAMES};

/// One piece of a template argument.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Param(String),
}

/// A parsed, checked command template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTemplate {
    program: String,
    args: Vec<Vec<Piece>>,
}

/// The values the shim fills in itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// The uploaded input file, when the request had a body.
    pub input: Option<PathBuf>,
    pub output: PathBuf,
    pub workdir: PathBuf,
    pub job_id: String,
}

/// A command ready to spawn: `program` plus one `OsString` per argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub program: String,
    pub args: Vec<OsString>,
}

fn parse_arg(index: usize, arg: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '}' => {
                return Err(format!(
                    "command argument {index} {arg:?}: unbalanced `}}`; write `}}}}` for a literal brace"
                ))
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => {
                            return Err(format!(
                                "command argument {index} {arg:?}: unbalanced `{{`; close the placeholder with `}}` or write `{{{{` for a literal brace"
                            ))
                        }
                        Some(c) => name.push(c),
                    }
                }
                if !valid_name(&name) {
                    return Err(format!(
                        "command argument {index} {arg:?}: `{{{name}}}` is not a placeholder (names match [a-z][a-z0-9_]*); fix the name or write `{{{{`/`}}}}` for literal braces"
                    ));
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Param(name));
            }
            c => lit.push(c),
        }
    }
    if !lit.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Literal(lit));
    }
    Ok(pieces)
}

impl CommandTemplate {
    /// Parse and check a template against the parameter schema.
    pub fn parse(argv: &[String], schema: &ParamSchema) -> Result<CommandTemplate, String> {
        let Some((program, rest)) = argv.split_first() else {
            return Err("command is empty; give at least the program, e.g. [ffmpeg, ...]".into());
        };
        let program_pieces = parse_arg(0, program)?;
        let program = match program_pieces.as_slice() {
            [Piece::Literal(p)] if !p.is_empty() => p.clone(),
            [Piece::Literal(_)] => {
                return Err("command argument 0 (the program) is empty; name the program".into())
            }
            _ => {
                return Err(format!(
                    "command argument 0 {program:?} (the program) must be a literal name or path, without placeholders"
                ))
            }
        };
        let is_shell = matches!(
            std::path::Path::new(&program)
                .file_name()
                .and_then(|n| n.to_str()),
            Some("sh" | "bash" | "dash" | "zsh" | "ksh" | "ash")
        );
        let mut args = Vec::with_capacity(rest.len());
        for (i, arg) in rest.iter().enumerate() {
            let index = i + 1;
            let pieces = parse_arg(index, arg)?;
            let script_text = is_shell && i > 0 && rest[i - 1] == "-c";
            if script_text && pieces.iter().any(|p| matches!(p, Piece::Param(_))) {
                return Err(format!(
                    "command argument {index} is the script of `{program} -c` and has a placeholder, which would splice a value into shell code; pass values as positional arguments instead: [{program}, -c, 'tool \"$1\"', {program}, \"{{param}}\"]"
                ));
            }
            for piece in &pieces {
                let Piece::Param(name) = piece else { continue };
                if RESERVED_NAMES.contains(&name.as_str()) {
                    continue;
                }
                let Some(spec) = schema.get(name) else {
                    let declared: Vec<&str> = schema.names().collect();
                    let declared = if declared.is_empty() {
                        "none".to_string()
                    } else {
                        declared.join(", ")
                    };
                    return Err(format!(
                        "command argument {index} {arg:?}: unknown placeholder `{{{name}}}`; declare `{name}` under params (declared: {declared}) or use one of {}",
                        RESERVED_NAMES.join(", ")
                    ));
                };
                if !spec.is_required() && spec.default.is_none() {
                    return Err(format!(
                        "command argument {index} {arg:?}: `{{{name}}}` refers to an optional parameter without a default, which could leave it empty; give `{name}` a default or make it required"
                    ));
                }
            }
            args.push(pieces);
        }
        Ok(CommandTemplate { program, args })
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    /// Whether any argument uses `{name}` (a parameter or a reserved name).
    pub fn uses(&self, name: &str) -> bool {
        self.args
            .iter()
            .flatten()
            .any(|p| matches!(p, Piece::Param(n) if n == name))
    }

    /// Whether the tool takes an input file (`{input}` appears).
    pub fn uses_input(&self) -> bool {
        self.uses("input")
    }

    /// Fill the template in. `params` are validated values (see
    /// [`ParamSchema::validate`]).
    pub fn render(
        &self,
        params: &BTreeMap<String, String>,
        reserved: &Reserved,
    ) -> Result<Rendered, String> {
        let mut args = Vec::with_capacity(self.args.len());
        for pieces in &self.args {
            let mut arg = OsString::new();
            for piece in pieces {
                match piece {
                    Piece::Literal(s) => arg.push(s),
                    Piece::Param(name) => match name.as_str() {
                        "input" => match &reserved.input {
                            Some(p) => arg.push(p),
                            None => {
                                return Err(
                                    "this tool needs an input file; send it as the request body"
                                        .into(),
                                )
                            }
                        },
                        "output" => arg.push(&reserved.output),
                        "workdir" => arg.push(&reserved.workdir),
                        "job_id" => arg.push(&reserved.job_id),
                        _ => match params.get(name) {
                            Some(v) => arg.push(v),
                            None => {
                                return Err(format!(
                                    "parameter `{name}` has no value; validate the parameters before rendering"
                                ))
                            }
                        },
                    },
                }
            }
            args.push(arg);
        }
        Ok(Rendered {
            program: self.program.clone(),
            args,
        })
    }
}

fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+=/.,:@%^".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The command as one shell-quoted line, for logs only (it is never run by a
/// shell). Non-UTF-8 bytes show as U+FFFD.
pub fn display(rendered: &Rendered) -> String {
    std::iter::once(quote(&rendered.program))
        .chain(rendered.args.iter().map(|a| quote(&a.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::params::ParamSpec;

    fn schema() -> ParamSchema {
        let specs: BTreeMap<String, ParamSpec> = serde_yaml::from_str(
            r#"
height: {type: integer, min: 144, max: 2160, default: 720}
codec:  {type: enum, values: [libx264, libx265, h264_nvenc], default: libx264}
title:  {type: string}
note:   {type: string, required: false}
"#,
        )
        .unwrap();
        ParamSchema::new(specs).unwrap()
    }

    fn argv(yaml: &str) -> Vec<String> {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn reserved(input: Option<&str>) -> Reserved {
        Reserved {
            input: input.map(PathBuf::from),
            output: PathBuf::from("/work/jobs/j1/out.mp4"),
            workdir: PathBuf::from("/work/jobs/j1"),
            job_id: "j1".into(),
        }
    }

    const FFMPEG: &str = r#"[ffmpeg, -hide_banner, -nostdin, -y, -i, "{input}", -vf, "scale=-2:{height}", -c:v, "{codec}", -progress, pipe:1, -nostats, "{output}"]"#;

    #[test]
    fn renders_the_ffmpeg_example_one_element_per_argument() {
        let t = CommandTemplate::parse(&argv(FFMPEG), &schema()).unwrap();
        assert!(t.uses_input());
        assert!(!t.uses("title"));
        let params = schema()
            .validate(&[("title".to_string(), "x".into())].into())
            .unwrap();
        let r = t
            .render(&params, &reserved(Some("/work/jobs/j1/in put.mov")))
            .unwrap();
        assert_eq!(r.program, "ffmpeg");
        let args: Vec<_> = r.args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-hide_banner",
                "-nostdin",
                "-y",
                "-i",
                "/work/jobs/j1/in put.mov",
                "-vf",
                "scale=-2:720",
                "-c:v",
                "libx264",
                "-progress",
                "pipe:1",
                "-nostats",
                "/work/jobs/j1/out.mp4",
            ]
        );
        assert_eq!(
            display(&r),
            "ffmpeg -hide_banner -nostdin -y -i '/work/jobs/j1/in put.mov' -vf scale=-2:720 -c:v libx264 -progress pipe:1 -nostats /work/jobs/j1/out.mp4"
        );
    }

    #[test]
    fn values_never_split_or_reach_a_shell() {
        let t = CommandTemplate::parse(
            &argv(r#"[tool, "--title={title}", "{title}", "{{literal}}", "{workdir}/{job_id}.log", "}}{{"]"#),
            &schema(),
        )
        .unwrap();
        assert!(!t.uses_input());
        let hostile = "a b; rm -rf / $(id) 'q' \"d\"";
        let params = [("title".to_string(), hostile.to_string())].into();
        let r = t.render(&params, &reserved(None)).unwrap();
        assert_eq!(r.args.len(), 5);
        assert_eq!(r.args[0], OsString::from(format!("--title={hostile}")));
        assert_eq!(r.args[1], OsString::from(hostile));
        assert_eq!(r.args[2], OsString::from("{literal}"));
        assert_eq!(r.args[3], OsString::from("/work/jobs/j1/j1.log"));
        assert_eq!(r.args[4], OsString::from("}{"));
        assert_eq!(
            display(&r),
            r#"tool '--title=a b; rm -rf / $(id) '\''q'\'' "d"' 'a b; rm -rf / $(id) '\''q'\'' "d"' '{literal}' /work/jobs/j1/j1.log '}{'"#
        );
    }

    #[test]
    fn template_mistakes_name_the_argument_and_the_fix() {
        let table = [
            ("[]", "command is empty"),
            (r#"["", -i]"#, "command argument 0 (the program) is empty"),
            (r#"["{codec}", -i]"#, "command argument 0 \"{codec}\" (the program) must be a literal"),
            (r#"[ffmpeg, -c:v, "{codex}"]"#, "command argument 2 \"{codex}\": unknown placeholder `{codex}`; declare `codex` under params (declared: codec, height, note, title) or use one of input, output, workdir, job_id"),
            (r#"[ffmpeg, "scale=-2:{height"]"#, "command argument 1 \"scale=-2:{height\": unbalanced `{`; close the placeholder with `}` or write `{{` for a literal brace"),
            (r#"[ffmpeg, x, "a}b"]"#, "command argument 2 \"a}b\": unbalanced `}`; write `}}` for a literal brace"),
            (r#"[ffmpeg, "{a{b}}"]"#, "unbalanced `{`"),
            (r#"[ffmpeg, "{Height}"]"#, "command argument 1 \"{Height}\": `{Height}` is not a placeholder"),
            (r#"[ffmpeg, "{}"]"#, "`{}` is not a placeholder"),
            (r#"[ffmpeg, "--note={note}"]"#, "command argument 1 \"--note={note}\": `{note}` refers to an optional parameter without a default, which could leave it empty; give `note` a default or make it required"),
            (r#"[sh, -c, "ffmpeg -vf scale=-2:{height}"]"#, "command argument 2 is the script of `sh -c` and has a placeholder, which would splice a value into shell code"),
            (r#"[/bin/bash, -c, "echo {output}"]"#, "script of `/bin/bash -c`"),
        ];
        for (yaml, want) in table {
            let err = CommandTemplate::parse(&argv(yaml), &schema()).unwrap_err();
            assert!(err.contains(want), "{yaml}:\n got  {err}\n want {want}");
        }
    }

    #[test]
    fn a_shell_gets_values_as_positional_arguments_only() {
        let t = CommandTemplate::parse(
            &argv(r#"[sh, -c, 'ffmpeg -vf "scale=-2:$1" "$2"', sh, "{height}", "{output}"]"#),
            &schema(),
        )
        .unwrap();
        let params = schema()
            .validate(&[("title".to_string(), "x".into())].into())
            .unwrap();
        let r = t.render(&params, &reserved(Some("/in"))).unwrap();
        assert_eq!(
            r.args[1], "ffmpeg -vf \"scale=-2:$1\" \"$2\"",
            "the script stays literal"
        );
    }

    #[test]
    fn render_refuses_what_it_cannot_fill() {
        let t = CommandTemplate::parse(&argv(FFMPEG), &schema()).unwrap();
        let params = schema()
            .validate(&[("title".to_string(), "x".into())].into())
            .unwrap();
        assert_eq!(
            t.render(&params, &reserved(None)).unwrap_err(),
            "this tool needs an input file; send it as the request body"
        );
        let err = t
            .render(&BTreeMap::new(), &reserved(Some("/in")))
            .unwrap_err();
        assert!(err.starts_with("parameter `height` has no value"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_paths_pass_through_unchanged() {
        use std::os::unix::ffi::OsStringExt;
        let t =
            CommandTemplate::parse(&argv(r#"[cat, "{input}"]"#), &ParamSchema::default()).unwrap();
        let raw = b"/tmp/\xffin".to_vec();
        let mut res = reserved(None);
        res.input = Some(PathBuf::from(OsString::from_vec(raw.clone())));
        let r = t.render(&BTreeMap::new(), &res).unwrap();
        assert_eq!(r.args[0].clone().into_vec(), raw);
        assert_eq!(display(&r), "cat '/tmp/\u{fffd}in'");
    }
}
