//! Helper processes: `patchover internal <verb> …`, which patchover starts from its own binary
//! (to enter namespaces from a fresh single-threaded process, to outlive or watch the process
//! that started it).
//!
//! Each helper is a type in the crate that owns it ([`HelperCall`]); that type writes its own
//! arguments and reads them back with an [`ArgReader`], so no library code assembles or parses
//! argv strings and the binary's `internal` dispatcher only hands the words over. The argv
//! format (`--flag value` pairs, repeated flags, `-- ARGV` last) is the one older patchovers
//! wrote, so helpers started by either read the same.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

/// A call of one helper process, as a value.
pub trait HelperCall {
    /// The word after `internal`.
    fn verb(&self) -> &'static str;
    /// The arguments after the verb; the helper's `parse` reads them back.
    fn args(&self) -> Vec<OsString>;
    /// `exe internal <verb> <args…>`; the caller sets up streams, groups and environment.
    fn command(&self, exe: &Path) -> Command {
        let mut cmd = Command::new(exe);
        cmd.arg("internal").arg(self.verb()).args(self.args());
        cmd
    }
}

/// The arguments of a helper could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelperArgsError {
    #[error("internal: unknown helper {verb:?}; one of: {known}")]
    UnknownVerb { verb: String, known: String },
    #[error("internal {verb}: unexpected argument {arg:?}")]
    Unexpected { verb: &'static str, arg: String },
    #[error("internal {verb}: {flag} needs a value")]
    NoValue { verb: &'static str, flag: String },
    #[error("internal {verb}: {flag} is missing")]
    Missing {
        verb: &'static str,
        flag: &'static str,
    },
    #[error("internal {verb}: {flag} is given more than once")]
    Repeated {
        verb: &'static str,
        flag: &'static str,
    },
    #[error("internal {verb}: {flag} {value:?} is not {expected}")]
    Invalid {
        verb: &'static str,
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("internal {verb}: {rule}")]
    Rule {
        verb: &'static str,
        rule: &'static str,
    },
}

/// Reads `--flag value` pairs (also `--flag=value`) of one helper's arguments, and what
/// follows `--`. Every flag must be taken; [`ArgReader::finish`] refuses what is left.
#[derive(Debug)]
pub struct ArgReader {
    verb: &'static str,
    flags: Vec<(String, OsString)>,
    rest: Option<Vec<OsString>>,
}

impl ArgReader {
    /// Splits `args` (what follows the verb) into flags and the words after `--`.
    pub fn new(verb: &'static str, args: &[OsString]) -> Result<ArgReader, HelperArgsError> {
        let mut flags = Vec::new();
        let mut rest = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let unexpected = || HelperArgsError::Unexpected {
                verb,
                arg: a.to_string_lossy().into_owned(),
            };
            let s = a.to_str().ok_or_else(unexpected)?;
            if s == "--" {
                rest = Some(it.cloned().collect());
                break;
            }
            let Some(name) = s.strip_prefix("--").filter(|n| !n.is_empty()) else {
                return Err(unexpected());
            };
            match name.split_once('=') {
                Some((name, value)) => flags.push((name.to_owned(), value.into())),
                None => {
                    let value = it.next().ok_or_else(|| HelperArgsError::NoValue {
                        verb,
                        flag: s.to_owned(),
                    })?;
                    flags.push((name.to_owned(), value.clone()));
                }
            }
        }
        Ok(ArgReader { verb, flags, rest })
    }

    /// Takes every value of `--flag` (`flag` written with its dashes).
    pub fn all(&mut self, flag: &'static str) -> Vec<OsString> {
        let name = flag.trim_start_matches('-');
        let (mine, others) = std::mem::take(&mut self.flags)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.flags = others;
        mine.into_iter().map(|(_, v)| v).collect()
    }

    /// Takes the value of `--flag`, given at most once.
    pub fn optional(&mut self, flag: &'static str) -> Result<Option<OsString>, HelperArgsError> {
        let mut v = self.all(flag);
        match v.len() {
            0 => Ok(None),
            1 => Ok(v.pop()),
            _ => Err(HelperArgsError::Repeated {
                verb: self.verb,
                flag,
            }),
        }
    }

    /// Takes the value of `--flag`, given exactly once.
    pub fn required(&mut self, flag: &'static str) -> Result<OsString, HelperArgsError> {
        self.optional(flag)?.ok_or(HelperArgsError::Missing {
            verb: self.verb,
            flag,
        })
    }

    /// Reads a value as `T`; `expected` says what it should have been.
    pub fn value<T: FromStr>(
        &self,
        flag: &'static str,
        value: &OsStr,
        expected: &'static str,
    ) -> Result<T, HelperArgsError> {
        value
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HelperArgsError::Invalid {
                verb: self.verb,
                flag,
                value: value.to_string_lossy().into_owned(),
                expected,
            })
    }

    /// Takes `--flag`, given exactly once, read as `T`.
    pub fn parsed<T: FromStr>(
        &mut self,
        flag: &'static str,
        expected: &'static str,
    ) -> Result<T, HelperArgsError> {
        let v = self.required(flag)?;
        self.value(flag, &v, expected)
    }

    /// Takes the words after `--`, which must be there and not be empty.
    pub fn rest(&mut self, what: &'static str) -> Result<Vec<OsString>, HelperArgsError> {
        match self.rest.take() {
            Some(r) if !r.is_empty() => Ok(r),
            _ => Err(HelperArgsError::Missing {
                verb: self.verb,
                flag: what,
            }),
        }
    }

    /// A rule the arguments break (such as two flags that exclude each other).
    pub fn rule(&self, rule: &'static str) -> HelperArgsError {
        HelperArgsError::Rule {
            verb: self.verb,
            rule,
        }
    }

    /// Refuses whatever was not taken.
    pub fn finish(self) -> Result<(), HelperArgsError> {
        if let Some((name, value)) = self.flags.into_iter().next() {
            return Err(HelperArgsError::Unexpected {
                verb: self.verb,
                arg: format!("--{name} {}", value.to_string_lossy()),
            });
        }
        if let Some(rest) = self.rest {
            return Err(HelperArgsError::Unexpected {
                verb: self.verb,
                arg: format!("-- {}", os_join(&rest)),
            });
        }
        Ok(())
    }
}

fn os_join(words: &[OsString]) -> String {
    words
        .iter()
        .map(|w| w.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `--flag value` as two words, for [`HelperCall::args`].
pub fn flag(args: &mut Vec<OsString>, flag: &'static str, value: impl Into<OsString>) {
    args.push(flag.into());
    args.push(value.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn flags_repeated_flags_and_the_rest() {
        let mut r = ArgReader::new("t", &words("--a 1 --b=x --b y -- sh -c --a")).unwrap();
        assert_eq!(r.parsed::<u32>("--a", "a number").unwrap(), 1);
        assert_eq!(r.all("--b"), words("x y"));
        assert_eq!(r.rest("ARGV").unwrap(), words("sh -c --a"));
        r.finish().unwrap();
    }

    #[test]
    fn what_is_not_taken_is_refused() {
        let r = ArgReader::new("t", &words("--a 1")).unwrap();
        assert_eq!(
            r.finish().unwrap_err().to_string(),
            "internal t: unexpected argument \"--a 1\""
        );
        let r = ArgReader::new("t", &words("-- x")).unwrap();
        assert!(r.finish().is_err());
    }

    #[test]
    fn bad_words_are_refused_clearly() {
        let e = ArgReader::new("t", &words("stray")).unwrap_err();
        assert_eq!(e.to_string(), "internal t: unexpected argument \"stray\"");
        let e = ArgReader::new("t", &words("--a")).unwrap_err();
        assert_eq!(e.to_string(), "internal t: --a needs a value");
        let mut r = ArgReader::new("t", &words("--a x --b 1 --b 2")).unwrap();
        assert_eq!(
            r.parsed::<i32>("--a", "a pid").unwrap_err().to_string(),
            "internal t: --a \"x\" is not a pid"
        );
        assert_eq!(
            r.optional("--b").unwrap_err(),
            HelperArgsError::Repeated {
                verb: "t",
                flag: "--b"
            }
        );
        assert_eq!(
            r.required("--c").unwrap_err().to_string(),
            "internal t: --c is missing"
        );
        assert!(r.rest("ARGV").is_err());
    }

    #[test]
    fn the_command_is_exe_internal_verb_args() {
        struct T;
        impl HelperCall for T {
            fn verb(&self) -> &'static str {
                "t"
            }
            fn args(&self) -> Vec<OsString> {
                words("--a 1")
            }
        }
        let cmd = T.command(Path::new("/bin/po"));
        assert_eq!(cmd.get_program(), "/bin/po");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["internal", "t", "--a", "1"]);
    }
}
