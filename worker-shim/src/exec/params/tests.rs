//! The schema's checks and the values' validation, case by case.

use super::*;
use serde_json::json;

const EXAMPLE: &str = r#"
params:
  height: {type: integer, min: 144, max: 2160, default: 720}
  codec:  {type: enum, values: [libx264, libx265, h264_nvenc], default: libx264}
  preset: {type: string, pattern: "^[a-z]+$", required: false, default: medium}
  crf:    {type: number, min: 0, max: 51}
  audio:  {type: boolean, default: true}
"#;

#[derive(Deserialize)]
struct Config {
    params: ParamSchema,
}

fn example() -> ParamSchema {
    serde_yaml::from_str::<Config>(EXAMPLE).unwrap().params
}

fn given(v: serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    serde_json::from_value(v).unwrap()
}

fn specs(yaml: &str) -> BTreeMap<String, ParamSpec> {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn example_config_fills_defaults_and_canonicalises() {
    let s = example();
    assert_eq!(
        s.names().collect::<Vec<_>>(),
        ["audio", "codec", "crf", "height", "preset"]
    );
    assert!(s.get("crf").unwrap().is_required());
    assert!(!s.get("height").unwrap().is_required());
    let out = s.validate(&given(json!({"crf": 23}))).unwrap();
    let want: BTreeMap<String, String> = [
        ("audio", "true"),
        ("codec", "libx264"),
        ("crf", "23"),
        ("height", "720"),
        ("preset", "medium"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(out, want);
}

#[test]
fn accepted_values_and_their_canonical_form() {
    let s = example();
    // (param, given, canonical)
    let table = [
        ("height", json!(1080), "1080"),
        ("height", json!("1080"), "1080"),
        ("height", json!(1080.0), "1080"),
        ("height", json!(144), "144"),
        ("height", json!(2160), "2160"),
        ("crf", json!(23.5), "23.5"),
        ("crf", json!("18"), "18"),
        ("crf", json!("0"), "0"),
        ("crf", json!("-0"), "0"),
        ("crf", json!(51), "51"),
        ("audio", json!(false), "false"),
        ("audio", json!("TRUE"), "true"),
        ("audio", json!("0"), "false"),
        ("audio", json!(1), "true"),
        ("codec", json!("h264_nvenc"), "h264_nvenc"),
        ("preset", json!("slow"), "slow"),
    ];
    for (param, value, want) in table {
        let mut g = given(json!({"crf": 20}));
        g.insert(param.into(), value.clone());
        let out = s
            .validate(&g)
            .unwrap_or_else(|e| panic!("{param}={value}: {e:?}"));
        assert_eq!(out[param], want, "{param}={value}");
    }
    // null means "not given": the default applies.
    let out = s
        .validate(&given(json!({"crf": 1, "height": null})))
        .unwrap();
    assert_eq!(out["height"], "720");
}

#[test]
fn refused_values_say_what_is_expected() {
    let s = example();
    let table = [
        (
            "height",
            json!("abc"),
            r#"parameter `height`: must be an integer from 144 to 2160, got "abc""#,
        ),
        (
            "height",
            json!(5000),
            "parameter `height`: must be an integer from 144 to 2160, got 5000",
        ),
        (
            "height",
            json!(720.5),
            "parameter `height`: must be an integer from 144 to 2160, got 720.5",
        ),
        (
            "height",
            json!([720]),
            "parameter `height`: must be an integer from 144 to 2160, got a list",
        ),
        (
            "crf",
            json!("NaN"),
            r#"parameter `crf`: must be a number from 0 to 51, got "NaN""#,
        ),
        (
            "crf",
            json!("inf"),
            r#"parameter `crf`: must be a number from 0 to 51, got "inf""#,
        ),
        (
            "crf",
            json!(-1),
            "parameter `crf`: must be a number from 0 to 51, got -1",
        ),
        (
            "audio",
            json!("yes please"),
            r#"parameter `audio`: must be true or false, got "yes please""#,
        ),
        (
            "codec",
            json!("libfoo"),
            r#"parameter `codec`: must be one of libx264, libx265, h264_nvenc, got "libfoo""#,
        ),
        (
            "preset",
            json!("Slow"),
            r#"parameter `preset`: must be a string matching `^[a-z]+$`, got "Slow""#,
        ),
        (
            // the pattern must match the whole value
            "preset",
            json!("slow fast"),
            r#"parameter `preset`: must be a string matching `^[a-z]+$`, got "slow fast""#,
        ),
    ];
    for (param, value, want) in table {
        let mut g = given(json!({"crf": 20}));
        g.insert(param.into(), value.clone());
        let errs = s.validate(&g).unwrap_err();
        assert_eq!(errs.len(), 1, "{param}={value}: {errs:?}");
        assert_eq!(errs[0].param, param);
        assert_eq!(errs[0].to_string(), want);
    }
}

#[test]
fn every_error_is_collected_unknown_and_missing_included() {
    let errs = example()
        .validate(&given(json!({"heigth": 1080, "codec": "libfoo"})))
        .unwrap_err();
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            r#"parameter `codec`: must be one of libx264, libx265, h264_nvenc, got "libfoo""#,
            "parameter `crf`: is required (a number from 0 to 51)",
            "unknown parameter `heigth`; declared parameters: audio, codec, crf, height, preset",
        ]
    );
    assert_eq!(errs[2].param, "heigth");
}

#[test]
fn values_a_tool_could_misread_are_refused() {
    let s = ParamSchema::new(specs(
        r#"
name:  {type: string}
short: {type: string, max_len: 4}
dash:  {type: string, allow_leading_dash: true}
gain:  {type: integer}
shift: {type: number, min: -10, max: 10, allow_leading_dash: true}
"#,
    ))
    .unwrap();
    let ok = json!({"name": "a", "short": "a", "dash": "a", "gain": 1, "shift": 0});
    let table: [(&str, serde_json::Value, Option<&str>); 11] = [
        (
            "name",
            json!("-f"),
            Some("must not start with `-` (the tool could read it as an option), got \"-f\""),
        ),
        (
            "name",
            json!("--help"),
            Some("must not start with `-` (the tool could read it as an option), got \"--help\""),
        ),
        (
            "name",
            json!("a\u{0}b"),
            Some("must not contain control characters or NUL, got \"a\\u0000b\""),
        ),
        (
            "name",
            json!("a\nb"),
            Some("must not contain control characters or NUL, got \"a\\nb\""),
        ),
        (
            "name",
            json!("x".repeat(257)),
            Some("must be at most 256 characters, got 257"),
        ),
        ("name", json!("x".repeat(256)), None),
        ("name", json!("a-b c;rm -rf /"), None),
        (
            "short",
            json!("abcde"),
            Some("must be at most 4 characters, got 5"),
        ),
        ("dash", json!("-vf"), None),
        (
            "gain",
            json!(-3),
            Some("must not start with `-` (the tool could read it as an option), got -3"),
        ),
        ("shift", json!("-2.5"), None),
    ];
    for (param, value, want) in table {
        let mut g = given(ok.clone());
        g.insert(param.into(), value.clone());
        match (s.validate(&g), want) {
            (Ok(out), None) => assert!(out.contains_key(param)),
            (Err(errs), Some(want)) => {
                assert_eq!(errs.len(), 1, "{param}={value}: {errs:?}");
                assert_eq!(errs[0].problem, want, "{param}={value}");
            }
            (got, want) => panic!("{param}={value}: got {got:?}, wanted {want:?}"),
        }
    }
}

#[test]
fn schema_mistakes_name_the_parameter_and_the_fix() {
    let table = [
        ("Height: {type: integer}", "parameter `Height`: names must match [a-z][a-z0-9_]*"),
        ("2pass: {type: boolean}", "parameter `2pass`: names must match"),
        ("input: {type: string}", "parameter `input`: `input` is reserved"),
        ("job_id: {type: string}", "parameter `job_id`: `job_id` is reserved"),
        ("p: {type: string, pattern: \"([a-z\"}", "parameter `p`: pattern does not compile"),
        ("p: {type: integer, pattern: \"[0-9]+\"}", "`pattern` applies to type string only"),
        ("p: {type: integer, min: 10, max: 1}", "parameter `p`: min (10) is greater than max (1); swap them"),
        ("p: {type: integer, min: -5}", "set `allow_leading_dash: true` or raise min to 0"),
        ("p: {type: string, min: 1}", "`min`/`max` apply to types integer and number only"),
        ("p: {type: enum}", "parameter `p`: type enum needs a non-empty `values` list"),
        ("p: {type: enum, values: [a, a]}", "enum value \"a\" is listed twice"),
        ("p: {type: string, values: [a]}", "`values` applies to type enum only"),
        ("p: {type: integer, default: 5, required: true}", "`required: true` with a default makes no sense"),
        ("p: {type: integer, min: 1, max: 9, default: 10}", "parameter `p`: default is invalid: must be an integer from 1 to 9, got 10; fix the default"),
        ("p: {type: enum, values: [a, b], default: c}", "default is invalid: must be one of a, b, got \"c\""),
        ("p: {type: string, default: [a]}", "default must be a string, number or boolean, got a list"),
        ("p: {type: string, pattern: \"[a-z]+\", default: \"-x\"}", "default is invalid: must not start with `-`"),
        ("p: {type: string, max_len: 0}", "max_len 0 would refuse every value"),
    ];
    for (yaml, want) in table {
        let err = ParamSchema::new(specs(yaml)).unwrap_err();
        assert!(err.contains(want), "{yaml}: {err}");
    }
    // Several problems are all reported.
    let err = ParamSchema::new(specs("output: {type: enum}\nA: {type: string}")).unwrap_err();
    assert_eq!(err.matches("; parameter `").count(), 2, "{err}");
    // Unknown fields in a spec are refused by the config parser.
    let e =
        serde_yaml::from_str::<BTreeMap<String, ParamSpec>>("p: {type: string, requird: false}")
            .unwrap_err();
    assert!(e.to_string().contains("unknown field `requird`"), "{e}");
    // Defaults of every type are accepted as YAML scalars.
    let ok = "a: {type: number, default: 1.5}\nb: {type: string, default: 42}\nc: {type: boolean, default: false}\nd: {type: string, required: false}";
    let s = ParamSchema::new(specs(ok)).unwrap();
    let out = s.validate(&BTreeMap::new()).unwrap();
    assert_eq!(out.get("a").map(String::as_str), Some("1.5"));
    assert_eq!(out.get("b").map(String::as_str), Some("42"));
    assert_eq!(out.get("c").map(String::as_str), Some("false"));
    assert_eq!(out.get("d"), None);
}

#[test]
fn describe_lists_every_parameter() {
    let d = example().describe();
    assert_eq!(
        d["height"],
        json!({"type": "integer", "required": false, "default": 720, "min": 144.0, "max": 2160.0, "max_len": 256})
    );
    assert_eq!(
        d["codec"]["values"],
        json!(["libx264", "libx265", "h264_nvenc"])
    );
    assert_eq!(d["crf"]["required"], true);
    assert_eq!(d["preset"]["pattern"], "^[a-z]+$");
    assert_eq!(d["audio"]["default"], true);
    let empty = ParamSchema::default();
    assert_eq!(empty.describe(), json!({}));
    let errs = empty.validate(&given(json!({"x": 1}))).unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "unknown parameter `x`; this tool declares no parameters"
    );
}
