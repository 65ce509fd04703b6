//! The helper processes of the `ns` backend (`patchover internal launch|exec|netcfg|
//! attach-disk|thaw-guard`) as values: the backend and [`crate::host::LinuxHost`] build an
//! [`LcHelper`], its [`HelperCall::command`] writes the argv, [`LcHelper::parse`] reads it back
//! in the helper process and [`LcHelper::run`] does the work (in [`crate::ns::launch`]).
//!
//! The argv format is the one earlier patchovers wrote, word for word; nothing persisted
//! depends on it (running LCs are found by init's pid and start time), but a helper started by
//! an older patchover from the same path must still read its arguments.

use std::ffi::OsString;
use std::path::PathBuf;

use patchover_core::helper::flag;
pub use patchover_core::helper::{ArgReader, HelperArgsError, HelperCall};

use crate::ns::launch::{self, NicSetup};

/// `internal exec`: runs `argv` inside the running LC whose init is `pid`, joining the cgroups
/// whose `cgroup.procs` files are given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub pid: i32,
    pub cgroup_procs: Vec<PathBuf>,
    pub argv: Vec<String>,
}

/// `internal netcfg`: configures NICs inside the network namespace of `pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netcfg {
    pub pid: i32,
    pub nics: Vec<NicSetup>,
}

/// `internal attach-disk`: mounts `source` at `target` inside the running LC of `pid`; an image
/// is loop-mounted at `image_staging` on the host first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachDisk {
    pub pid: i32,
    pub source: PathBuf,
    pub target: PathBuf,
    pub image_staging: Option<PathBuf>,
}

/// `internal thaw-guard`: writes `value` to `file` if the process that armed it dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThawGuard {
    pub file: PathBuf,
    pub value: String,
}

/// One helper process of the `ns` backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LcHelper {
    /// Creates an LC's namespaces and init; the [`launch::LaunchSpec`] comes on stdin.
    Launch,
    Exec(Exec),
    Netcfg(Netcfg),
    AttachDisk(AttachDisk),
    ThawGuard(ThawGuard),
}

const PID: &str = "a pid";

impl LcHelper {
    /// The verbs this crate's helpers answer to.
    pub const VERBS: [&'static str; 5] = ["launch", "exec", "netcfg", "attach-disk", "thaw-guard"];

    /// Reads what [`HelperCall::args`] wrote for `verb` (the words after the verb).
    pub fn parse(verb: &str, args: &[OsString]) -> Result<LcHelper, HelperArgsError> {
        let verb = Self::VERBS
            .into_iter()
            .find(|v| *v == verb)
            .ok_or_else(|| HelperArgsError::UnknownVerb {
                verb: verb.to_owned(),
                known: Self::VERBS.join(", "),
            })?;
        let mut r = ArgReader::new(verb, args)?;
        let call = match verb {
            "launch" => LcHelper::Launch,
            "exec" => {
                let pid = r.parsed("--pid", PID)?;
                let cgroup_procs = r.all("--cgroup-procs").into_iter().map(PathBuf::from);
                let argv = r
                    .rest("a command after --")?
                    .into_iter()
                    .map(|w| {
                        w.into_string().map_err(|w| HelperArgsError::Invalid {
                            verb,
                            flag: "--",
                            value: w.to_string_lossy().into_owned(),
                            expected: "UTF-8",
                        })
                    })
                    .collect::<Result<_, _>>()?;
                LcHelper::Exec(Exec {
                    pid,
                    cgroup_procs: cgroup_procs.collect(),
                    argv,
                })
            }
            "netcfg" => {
                let pid = r.parsed("--pid", PID)?;
                let nics = r.required("--nics")?;
                let nics = nics
                    .to_str()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .ok_or_else(|| HelperArgsError::Invalid {
                        verb,
                        flag: "--nics",
                        value: nics.to_string_lossy().into_owned(),
                        expected: "a JSON list of NICs",
                    })?;
                LcHelper::Netcfg(Netcfg { pid, nics })
            }
            "attach-disk" => LcHelper::AttachDisk(AttachDisk {
                pid: r.parsed("--pid", PID)?,
                source: r.required("--source")?.into(),
                target: r.required("--target")?.into(),
                image_staging: r.optional("--image-staging")?.map(PathBuf::from),
            }),
            _ => LcHelper::ThawGuard(ThawGuard {
                file: r.required("--file")?.into(),
                value: {
                    let v = r.required("--value")?;
                    r.value("--value", &v, "UTF-8")?
                },
            }),
        };
        r.finish()?;
        Ok(call)
    }

    /// Does the helper's work in this (fresh, single-threaded) process; returns its exit code.
    pub fn run(&self) -> Result<i32, String> {
        match self {
            LcHelper::Launch => Ok(launch::launch_main()),
            LcHelper::Exec(e) => launch::exec_main(e.pid, &e.cgroup_procs, &e.argv),
            LcHelper::Netcfg(n) => launch::netcfg_main(n.pid, &n.nics).map(|()| 0),
            LcHelper::AttachDisk(a) => {
                launch::attach_main(a.pid, &a.source, &a.target, a.image_staging.as_deref())
                    .map(|()| 0)
            }
            LcHelper::ThawGuard(t) => Ok(launch::thaw_guard_main(&t.file, &t.value)),
        }
    }
}

impl HelperCall for LcHelper {
    fn verb(&self) -> &'static str {
        match self {
            LcHelper::Launch => "launch",
            LcHelper::Exec(_) => "exec",
            LcHelper::Netcfg(_) => "netcfg",
            LcHelper::AttachDisk(_) => "attach-disk",
            LcHelper::ThawGuard(_) => "thaw-guard",
        }
    }

    fn args(&self) -> Vec<OsString> {
        let mut a = Vec::new();
        match self {
            LcHelper::Launch => {}
            LcHelper::Exec(e) => {
                flag(&mut a, "--pid", e.pid.to_string());
                for f in &e.cgroup_procs {
                    flag(&mut a, "--cgroup-procs", f);
                }
                a.push("--".into());
                a.extend(e.argv.iter().map(OsString::from));
            }
            LcHelper::Netcfg(n) => {
                flag(&mut a, "--pid", n.pid.to_string());
                let nics = serde_json::to_string(&n.nics).expect("NICs serialize");
                flag(&mut a, "--nics", nics);
            }
            LcHelper::AttachDisk(d) => {
                flag(&mut a, "--pid", d.pid.to_string());
                flag(&mut a, "--target", &d.target);
                if let Some(s) = &d.image_staging {
                    flag(&mut a, "--image-staging", s);
                }
                flag(&mut a, "--source", &d.source);
            }
            LcHelper::ThawGuard(t) => {
                flag(&mut a, "--file", &t.file);
                flag(&mut a, "--value", &t.value);
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    fn calls() -> Vec<LcHelper> {
        vec![
            LcHelper::Launch,
            LcHelper::Exec(Exec {
                pid: 42,
                cgroup_procs: vec!["/sys/fs/cgroup/po/lc1/cgroup.procs".into()],
                argv: vec!["/bin/sh".into(), "-c".into(), "echo --pid -- x".into()],
            }),
            LcHelper::Exec(Exec {
                pid: 42,
                cgroup_procs: vec![],
                argv: vec!["true".into()],
            }),
            LcHelper::Netcfg(Netcfg {
                pid: 7,
                nics: vec![NicSetup {
                    temp_name: "pplc1n0".into(),
                    name: "eth0".into(),
                    address: Some("10.0.0.10/24".into()),
                    gateway: None,
                }],
            }),
            LcHelper::AttachDisk(AttachDisk {
                pid: 7,
                source: "/srv/d with space".into(),
                target: "/mnt".into(),
                image_staging: Some("/run/po/lc/lc1/attach".into()),
            }),
            LcHelper::AttachDisk(AttachDisk {
                pid: 7,
                source: "/srv/d".into(),
                target: "/mnt".into(),
                image_staging: None,
            }),
            LcHelper::ThawGuard(ThawGuard {
                file: "/sys/fs/cgroup/po/lc1/cgroup.freeze".into(),
                value: "0".into(),
            }),
        ]
    }

    #[test]
    fn every_call_reads_back_what_it_wrote() {
        for call in calls() {
            let cmd = call.command(Path::new("/usr/bin/patchover"));
            let argv: Vec<OsString> = cmd.get_args().map(OsString::from).collect();
            assert_eq!(argv[0], "internal");
            let verb = argv[1].to_str().unwrap();
            let back = LcHelper::parse(verb, &argv[2..]).unwrap();
            assert_eq!(back, call);
            assert_eq!(back.args(), argv[2..]);
        }
    }

    /// What patchovers before the typed calls wrote (their helpers may still be started
    /// from the same path by a process of the old version) reads the same.
    #[test]
    fn the_argv_of_earlier_patchovers_reads() {
        let e = LcHelper::parse(
            "exec",
            &words("--pid 1001 --cgroup-procs /a/cgroup.procs --cgroup-procs /b/cgroup.procs -- cat /x"),
        )
        .unwrap();
        assert_eq!(
            e.args(),
            words(
                "--pid 1001 --cgroup-procs /a/cgroup.procs --cgroup-procs /b/cgroup.procs -- cat /x"
            )
        );
        let mut n = words("--pid 9 --nics");
        n.push(r#"[{"temp_name":"t","name":"eth0","address":null,"gateway":"10.0.0.1"}]"#.into());
        assert_eq!(LcHelper::parse("netcfg", &n).unwrap().args(), n);
        let a = words("--pid 9 --target /mnt --image-staging /st --source /img");
        assert_eq!(LcHelper::parse("attach-disk", &a).unwrap().args(), a);
        let t = words("--file /c/cgroup.freeze --value 0");
        assert_eq!(LcHelper::parse("thaw-guard", &t).unwrap().args(), t);
        assert_eq!(LcHelper::parse("launch", &[]).unwrap(), LcHelper::Launch);
    }

    #[test]
    fn bad_arguments_are_refused_clearly() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "exec",
                "--pid 1 --",
                "internal exec: a command after -- is missing",
            ),
            (
                "exec",
                "--pid x -- true",
                "internal exec: --pid \"x\" is not a pid",
            ),
            ("exec", "-- true", "internal exec: --pid is missing"),
            (
                "netcfg",
                "--pid 1 --nics {",
                "internal netcfg: --nics \"{\" is not a JSON list of NICs",
            ),
            (
                "attach-disk",
                "--pid 1 --source /a --target /b --target /c",
                "internal attach-disk: --target is given more than once",
            ),
            (
                "thaw-guard",
                "--file /f --value 0 --colour red",
                "internal thaw-guard: unexpected argument \"--colour red\"",
            ),
            (
                "thaw-guard",
                "--file /f --value",
                "internal thaw-guard: --value needs a value",
            ),
            (
                "launch",
                "now",
                "internal launch: unexpected argument \"now\"",
            ),
            (
                "launch",
                "-- x",
                "internal launch: unexpected argument \"-- x\"",
            ),
        ];
        for (verb, args, want) in cases {
            let e = LcHelper::parse(verb, &words(args)).unwrap_err();
            assert_eq!(e.to_string(), *want, "{verb} {args}");
        }
        let e = LcHelper::parse("lunch", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal: unknown helper \"lunch\"; one of: launch, exec, netcfg, attach-disk, thaw-guard"
        );
    }
}
