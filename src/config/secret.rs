//! Errors about the files that hold secrets (the tokens file, `tracing.headers_file`): they name
//! the file, the line and the column, and what is wrong, never what the file says there. In
//! Kubernetes such an error goes to the pod's log, where a mistyped `authorization = Bearer ...`
//! line must not leave its token behind.

/// `error` as "line L, column C: what is wrong", with every value the message quotes left out.
///
/// toml's own parse messages describe the syntax ("string values must be quoted"); serde's type
/// messages quote the value they found (`invalid type: string "s3cr3t", expected ...`), so the
/// part between the colon and ", expected" is dropped, and so is an unknown variant's name.
pub fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().lines().next().unwrap_or_default();
    let message = match message.split_once(':') {
        Some((what @ ("invalid type" | "invalid value"), rest)) => match rest.split_once(", ") {
            Some((_, expected)) => format!("{what}, {expected}"),
            None => what.to_owned(),
        },
        _ if message.starts_with("unknown variant") => match message.split_once(", ") {
            Some((_, expected)) => format!("unknown variant, {expected}"),
            None => "unknown variant".to_owned(),
        },
        _ => message.to_owned(),
    };
    match error.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..])
                .chars()
                .count()
                + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "the fields are there to be deserialized")]
    struct Entry {
        name: String,
        level: Level,
        count: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Level {
        Low,
    }

    fn parse_table(text: &str) -> String {
        toml_error(text, &text.parse::<toml::Table>().unwrap_err())
    }

    fn parse_entry(text: &str) -> String {
        toml_error(text, &toml::from_str::<Entry>(text).unwrap_err())
    }

    #[test]
    fn syntax_errors_say_where_and_what_never_the_value() {
        let shown = parse_table("# headers\nauthorization = Bearer s3cr3t\n");
        assert_eq!(
            shown,
            "line 2, column 17: string values must be quoted, expected literal string"
        );
        let shown = parse_table("x = 1\napi-key = \"s3cr3t\n");
        assert!(shown.starts_with("line 2, column "), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn type_errors_drop_the_value_they_quote() {
        for (text, expected) in [
            (
                "name = 1234567\nlevel = \"low\"\ncount = 1\n",
                "line 1, column 8: invalid type, expected a string",
            ),
            (
                "name = \"n\"\nlevel = \"s3cr3t\"\ncount = 1\n",
                "line 2, column 9: unknown variant, expected `low`",
            ),
            (
                "name = \"n\"\nlevel = \"low\"\ncount = \"s3cr3t\"\n",
                "line 3, column 9: invalid type, expected u32",
            ),
        ] {
            let shown = parse_entry(text);
            assert_eq!(shown, expected, "{text:?}");
        }
        // Keys are not secrets: an unknown one is named.
        let shown = parse_entry("name = \"n\"\nlevel = \"low\"\ncount = 1\nsha265 = \"x\"\n");
        assert!(
            shown.starts_with("line 4, column 1: unknown field `sha265`"),
            "{shown}"
        );
    }
}
