//! Where a Rego compile error points.
//!
//! regorus reports a missing piece where the parser noticed it: at the next
//! token. When the statement ends a line (`input.x ==` then `}` on the next
//! line), that token is the first one of a later line, so the error points
//! one line below the mistake, at the `}`. [`point_at_the_gap`] moves such
//! a location to the end of the line that is missing the piece, and redraws
//! regorus's snippet (`--> file:line:col`, the source line, the caret) there.

/// `message` is regorus's compile error for the module `text`. An
/// `expecting …` error whose location is the first token of its line moves
/// to the end of the previous line with code on it; anything else is
/// returned unchanged.
pub fn point_at_the_gap(message: &str, text: &str) -> String {
    moved(message, text).unwrap_or_else(|| message.to_string())
}

fn moved(message: &str, text: &str) -> Option<String> {
    let lines: Vec<&str> = message.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("--> "))?;
    let error = lines[at..]
        .iter()
        .position(|l| l.starts_with("error: expecting "))?
        + at;
    let location = lines[at].trim_start().strip_prefix("--> ")?;
    let mut parts = location.rsplitn(3, ':');
    let col: usize = parts.next()?.parse().ok()?;
    let line: usize = parts.next()?.parse().ok()?;
    let path = parts.next()?;
    let source: Vec<&str> = text.lines().collect();
    let reported = source.get(line.checked_sub(1)?)?;
    let before: String = reported.chars().take(col.saturating_sub(1)).collect();
    if !before.trim().is_empty() {
        return None; // the token is mid-line: the location is right
    }
    let (index, code) = source[..line - 1]
        .iter()
        .enumerate()
        .rev()
        .find(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))?;
    let (new_line, new_col) = (index + 1, code.trim_end().chars().count() + 1);
    let width = new_line.to_string().len();
    let mut out: Vec<String> = lines[..at].iter().map(|l| l.to_string()).collect();
    out.push(format!("--> {path}:{new_line}:{new_col}"));
    out.push(format!("{:width$} |", ""));
    out.push(format!("{new_line} | {code}"));
    out.push(format!("{:width$} | {:>new_col$}", "", "^"));
    out.extend(lines[error..].iter().map(|l| l.to_string()));
    Some(out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regorus(line: usize, col: usize, src: &str, error: &str) -> String {
        format!(
            "\n--> /p/authz.rego:{line}:{col}\n  |\n{line} | {src}\n  | {:>col$}\nerror: {error}",
            "^"
        )
    }

    #[test]
    fn a_missing_piece_points_at_the_line_that_lacks_it() {
        let text = "package crank.authz\nallow if {\n  input.x ==\n\n  # why\n}\n";
        let got = point_at_the_gap(&regorus(6, 1, "}", "expecting expression"), text);
        assert_eq!(
            got,
            "\n--> /p/authz.rego:3:13\n  |\n3 |   input.x ==\n  |             ^\nerror: expecting expression"
        );
        let text = "package crank.authz\nallow if {\n  y := [1\n  }\n";
        let got = point_at_the_gap(
            &regorus(4, 3, "  }", "expecting `]` while parsing array"),
            text,
        );
        assert!(got.contains("authz.rego:3:10\n"), "{got}");
        assert!(
            got.ends_with("error: expecting `]` while parsing array"),
            "{got}"
        );
    }

    #[test]
    fn other_locations_are_kept() {
        let text = "package crank.authz\nallow if input.x ==== 1\n";
        // (message, why it stays)
        let cases = [
            // the token is mid-line
            regorus(2, 20, "allow if input.x ==== 1", "expecting expression"),
            // not a missing piece
            regorus(
                2,
                1,
                "allow if input.x ==== 1",
                "invalid character in string",
            ),
            // no line above
            regorus(1, 1, "package crank.authz", "expecting expression"),
            // a location past the file
            regorus(9, 1, "", "expecting expression"),
            "no location at all".to_string(),
        ];
        for m in cases {
            assert_eq!(point_at_the_gap(&m, text), m);
        }
    }
}
