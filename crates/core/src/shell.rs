//! Putting a word into a shell script so that the shell reads it back as exactly that word.
//!
//! Prefer no shell at all (an argv), or a constant script that takes its data as positional
//! parameters (`sh -c 'ip link set "$1" up' sh NAME`). Where a script must be written out
//! with data in it (a generated bundle's install script), [`quote`] is the one way to do it.

/// `s` as one POSIX shell word: in single quotes, each `'` written as `'\''`. Nothing inside
/// single quotes is special to the shell (`$`, `` ` ``, `\`, `;`, newlines, globs), so the
/// word reads back as `s` exactly. `s` must not hold a NUL byte (no argv or file name can).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile words pasted into a script through `quote` come back from a real `/bin/sh`
    /// byte for byte, one argument each, and run nothing.
    #[test]
    fn hostile_words_read_back_exactly_and_run_nothing() {
        let t = tempfile::tempdir().unwrap();
        let pwned = t.path().join("pwned");
        let p = pwned.display();
        let words = [
            "a;touch /x".to_owned(),
            "$(id)".to_owned(),
            "`id`".to_owned(),
            format!("$(touch {p})"),
            format!("`touch {p}`"),
            format!("x; touch {p}"),
            format!("x' ; touch {p}; echo '"),
            format!("\"; touch {p}; \""),
            format!("x\ntouch {p}"),
            format!("x && touch {p} || touch {p}"),
            "'".to_owned(),
            "''".to_owned(),
            "\\'".to_owned(),
            "a\\".to_owned(),
            "*".to_owned(),
            "~".to_owned(),
            "$HOME".to_owned(),
            "${IFS}".to_owned(),
            "-n".to_owned(),
            "!".to_owned(),
            " spaced  out ".to_owned(),
            String::new(),
            "é ü 漢".to_owned(),
        ];
        let script: String = words
            .iter()
            .map(|w| format!("printf '%s\\0' {}\n", quote(w)))
            .collect();
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .current_dir(t.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let got: Vec<&[u8]> = out.stdout.split(|b| *b == 0).collect();
        let want: Vec<&[u8]> = words
            .iter()
            .map(|w| w.as_bytes())
            .chain([&b""[..]])
            .collect();
        assert_eq!(got, want);
        assert!(!pwned.exists(), "a quoted word ran a command");
    }

    #[test]
    fn quoting_is_plain_single_quotes() {
        assert_eq!(quote("eth0"), "'eth0'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }
}
