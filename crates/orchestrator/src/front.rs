//! The connection front of `[service.front]` (docs/postgres.md): built from the config,
//! checked before a run changes anything, paused by the switch's drain, resumed by its resume
//! (a rollback, recovery) and released after a switch that went through.
//!
//! A front left paused holds every client of the service forever, and nothing in the service
//! says so. So its state is journaled before it is paused ([`Driven`]), letting it go is
//! retried ([`RETRY`]), a run that cannot let it go fails naming the command that does, and
//! recovery of a dead run lets go a front its journal says is paused.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::time::Duration;

use patchover_front::{Front, FrontError, PgBouncer};
use patchover_net::{BoxError, Mode};
use patchover_store::{Store, StoreError};

use crate::journal::{self, FrontState};
use crate::{OrchestratorError, ServiceSettings};

/// The front the config names, if any.
pub fn of(settings: &ServiceSettings) -> Option<PgBouncer> {
    let f = settings.front.as_ref()?;
    match f.kind {
        patchover_core::FrontKind::PgBouncer => Some(PgBouncer {
            admin: f.admin,
            user: f.user.clone(),
            password: f.password.clone(),
            database: f.database.clone(),
            pause_deadline: f.pause_deadline,
        }),
    }
}

/// Before anything changes: a front belongs to a paused switch, answers, and its pools point
/// at the service address.
pub fn check(front: &dyn Front, service: SocketAddr, mode: Mode) -> Result<(), OrchestratorError> {
    if mode == Mode::Seamless {
        return Err(OrchestratorError::BadInput(format!(
            "[service.front] ({}) is paused in a paused switch; run in readdress or path mode (seamless with a front is not supported); nothing was changed",
            front.describe()
        )));
    }
    front.check(service).map(|_| ()).map_err(|e| {
        OrchestratorError::BadInput(format!(
            "{}; nothing was changed",
            patchover_core::error::chain(&e)
        ))
    })
}

/// The waits between the tries of a front's release or resume: a transient failure of its
/// admin console (a refused or cut connection, PgBouncer restarting, its `max_client_conn`
/// full) is tried again for about 9 s in all (9 tries); then the run fails naming the command
/// that lets the front go. Its clients wait all that time, so the first waits are short.
pub const RETRY: &[Duration] = &[
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
    Duration::from_secs(2),
    Duration::from_secs(2),
    Duration::from_secs(2),
];

/// How a front paused by a switch lets its clients go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetGo {
    /// After a switch that went through: `RECONNECT`, `RESUME` (onto the standby).
    Release,
    /// After a switch that rolled back: `RESUME` (on the old LC, which serves again).
    Resume,
}

impl LetGo {
    pub fn as_str(self) -> &'static str {
        match self {
            LetGo::Release => "release",
            LetGo::Resume => "resume",
        }
    }
}

/// The front as a run drives it: its state journaled (`front_paused` durable before `PAUSE`
/// is sent, `front_released` once it let its clients go; `crate::journal::FrontState`), so
/// recovery of a dead run finds a front it left paused, and its letting go retried ([`RETRY`]).
pub struct Driven<'a> {
    front: &'a dyn Front,
    journal: Option<RefCell<(&'a mut Store, i64)>>,
    /// As journaled: paused and not yet let go.
    paused: Cell<bool>,
    retry: &'a [Duration],
}

impl<'a> Driven<'a> {
    /// `journal`: the store and the run its lines go to (none: not journaled). `paused`: the
    /// state the journal has for it now.
    pub fn new(front: &'a dyn Front, journal: Option<(&'a mut Store, i64)>, paused: bool) -> Self {
        Driven {
            front,
            journal: journal.map(RefCell::new),
            paused: Cell::new(paused),
            retry: RETRY,
        }
    }

    /// The same with other waits between tries.
    pub fn with_retry(self, retry: &'a [Duration]) -> Self {
        Driven { retry, ..self }
    }

    pub fn describe(&self) -> String {
        self.front.describe()
    }

    /// Whether the journal says it is paused and not let go.
    pub fn is_paused(&self) -> bool {
        self.paused.get()
    }

    fn record(&self, state: FrontState, detail: serde_json::Value) -> Result<(), StoreError> {
        match &self.journal {
            Some(j) => {
                let (store, run) = &mut *j.borrow_mut();
                journal::record_front(store, *run, state, &detail)
            }
            None => Ok(()),
        }
    }

    /// Journals `front_paused`, then pauses it: a front whose pause could not be journaled is
    /// not paused (a crash would leave its clients waiting with nothing saying so).
    pub fn pause(&self) -> Result<Duration, BoxError> {
        self.record(
            FrontState::Paused,
            serde_json::json!({"front": self.describe()}),
        )
        .map_err(|e| {
            format!(
                "the front {} was not paused: its state cannot be journaled: {}",
                self.describe(),
                crate::chain(&e)
            )
        })?;
        self.paused.set(true);
        Ok(self.front.pause()?)
    }

    /// One `RESUME` (the switcher's rollback, which holds new connections meanwhile).
    pub fn resume_once(&self) -> Result<bool, FrontError> {
        let was = self.front.resume()?;
        self.released(LetGo::Resume, 1, was, "switch");
        Ok(was)
    }

    /// Lets the front go as `how` says, tried again after each wait of the retry schedule; a
    /// front the journal does not have paused is tried too (an older journal's, or unknown).
    /// `by`: who, for the journal (`switch`, `recover`); `after`: what happened before, for
    /// the error. `Err`: it is still paused, with the command that lets it go.
    pub fn let_go(&self, how: LetGo, by: &str, after: &str) -> Result<usize, OrchestratorError> {
        let mut tries = 0;
        let mut waits = self.retry.iter();
        loop {
            tries += 1;
            let r = match how {
                LetGo::Release => self.front.release().map(|()| true),
                LetGo::Resume => self.front.resume(),
            };
            let e = match r {
                Ok(was) => {
                    self.released(how, tries, was, by);
                    return Ok(tries);
                }
                Err(e) => e,
            };
            tracing::warn!(front = %self.describe(), error = %crate::chain(&e), tries, "cannot {} the front", how.as_str());
            match waits.next() {
                Some(w) => std::thread::sleep(*w),
                None => return Err(self.still_paused(how, tries, after, e)),
            }
        }
    }

    /// Journals `front_released` (a journal write that fails is logged: the front is let go,
    /// and a recovery that resumes it again finds it not paused).
    fn released(&self, how: LetGo, tries: usize, was_paused: bool, by: &str) {
        if !self.paused.replace(false) {
            return;
        }
        let detail = serde_json::json!({"by": by, "action": how.as_str(), "tries": tries, "was_paused": was_paused});
        if let Err(e) = self.record(FrontState::Released, detail) {
            tracing::warn!(front = %self.describe(), error = %crate::chain(&e), "the front was let go, but the journal cannot say so");
        }
    }

    fn still_paused(
        &self,
        how: LetGo,
        tries: usize,
        after: &str,
        e: FrontError,
    ) -> OrchestratorError {
        let err = OrchestratorError::FrontPaused {
            front: self.describe(),
            after: after.to_owned(),
            what: how.as_str(),
            tries,
            command: self.front.resume_command(),
            source: Box::new(e),
        };
        tracing::error!(error = %crate::chain(&err), "the front is left paused; its clients wait");
        err
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;

    use patchover_front::{Front, FrontError};

    /// Records what was asked of it; `pause` fails when told to, `release` and `resume` the
    /// first `failures` times they are asked.
    #[derive(Default)]
    pub struct FakeFront {
        pub calls: RefCell<Vec<String>>,
        pub pause_fails: bool,
        pub paused: RefCell<bool>,
        pub failures: std::cell::Cell<usize>,
    }

    impl FakeFront {
        fn refused(&self) -> Result<(), FrontError> {
            if self.failures.get() == 0 {
                return Ok(());
            }
            self.failures.set(self.failures.get() - 1);
            Err(FrontError::Unreachable {
                front: self.describe(),
                source: Box::new(patchover_front::WireError::Protocol {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    message: "refused".into(),
                }),
            })
        }
    }

    impl Front for FakeFront {
        fn describe(&self) -> String {
            "fake front".into()
        }
        fn check(&self, service: std::net::SocketAddr) -> Result<String, FrontError> {
            self.calls.borrow_mut().push(format!("check {service}"));
            Ok("PgBouncer fake".into())
        }
        fn pause(&self) -> Result<std::time::Duration, FrontError> {
            self.calls.borrow_mut().push("pause".into());
            if self.pause_fails {
                return Err(FrontError::PauseTimeout {
                    front: self.describe(),
                    deadline: std::time::Duration::from_secs(1),
                    resumed: "it was resumed, nothing changed".into(),
                });
            }
            *self.paused.borrow_mut() = true;
            Ok(std::time::Duration::ZERO)
        }
        fn resume(&self) -> Result<bool, FrontError> {
            self.calls.borrow_mut().push("resume".into());
            self.refused()?;
            Ok(self.paused.replace(false))
        }
        fn release(&self) -> Result<(), FrontError> {
            self.calls.borrow_mut().push("release".into());
            self.refused()?;
            self.paused.replace(false);
            Ok(())
        }
        fn resume_command(&self) -> String {
            "resume-the-fake".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::fake::FakeFront;
    use super::{Driven, LetGo};
    use crate::step::fake::Bed;

    const NO_WAIT: &[Duration] = &[Duration::ZERO; 8];

    fn front_lines(bed: &Bed) -> Vec<(String, serde_json::Value)> {
        bed.store
            .steps(bed.run.id())
            .unwrap()
            .into_iter()
            .filter(|s| s.step.starts_with("front_"))
            .map(|s| (s.step, s.detail.unwrap_or_default()))
            .collect()
    }

    /// Issue 21: a release that failed was only reported (`front_released: false`) and the
    /// front's clients waited behind a paused PgBouncer. A console that refuses a few times is
    /// tried again, and the journal has the front paused before `PAUSE`, released after.
    #[test]
    fn r21_a_release_refused_a_few_times_is_retried_and_journaled() {
        let mut bed = Bed::new();
        let run = bed.run.id();
        let front = FakeFront::default();
        front.failures.set(3);
        let driven = Driven::new(&front, Some((&mut bed.store, run)), false).with_retry(NO_WAIT);
        driven.pause().unwrap();
        assert!(driven.is_paused());
        let tries = driven
            .let_go(LetGo::Release, "switch", "the switch")
            .unwrap();
        assert_eq!(tries, 4);
        assert!(!driven.is_paused());
        assert_eq!(
            *front.calls.borrow(),
            ["pause", "release", "release", "release", "release"]
        );
        let lines = front_lines(&bed);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].0, "front_paused");
        assert_eq!(lines[1].0, "front_released");
        assert_eq!(lines[1].1["tries"], 4);
        assert_eq!(lines[1].1["action"], "release");
        assert_eq!(lines[1].1["by"], "switch");
    }

    /// A front that stays refused: after its tries the run fails loudly, naming the front,
    /// what failed and the command that lets it go; the journal still says it is paused.
    #[test]
    fn r21_a_front_that_cannot_be_released_fails_with_the_command_and_stays_paused() {
        let mut bed = Bed::new();
        let run = bed.run.id();
        let front = FakeFront::default();
        front.failures.set(usize::MAX);
        let driven = Driven::new(&front, Some((&mut bed.store, run)), false).with_retry(NO_WAIT);
        driven.pause().unwrap();
        let e = driven
            .let_go(LetGo::Release, "switch", "the switch to lc2 went through")
            .unwrap_err();
        assert!(driven.is_paused());
        let text = crate::chain(&e);
        assert!(
            text.contains("the front fake front is still paused after the switch to lc2 went through, so its clients wait: its release failed 9 times; let it go with: resume-the-fake"),
            "{text}"
        );
        assert!(text.contains("refused"), "the cause: {text}");
        assert!(
            e.hint().contains("run the command in the error"),
            "{}",
            e.hint()
        );
        assert_eq!(front.calls.borrow().len(), 1 + 9);
        let lines = front_lines(&bed);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].0, "front_paused");
    }

    /// `PAUSE` is not sent unless the journal says so first (a run unknown to the journal
    /// cannot be written to).
    #[test]
    fn a_pause_that_cannot_be_journaled_is_not_sent() {
        let mut bed = Bed::new();
        let front = FakeFront::default();
        let driven = Driven::new(&front, Some((&mut bed.store, 9999)), false);
        let e = driven.pause().unwrap_err();
        assert!(
            e.to_string()
                .contains("the front fake front was not paused: its state cannot be journaled"),
            "{e}"
        );
        assert!(!driven.is_paused());
        assert!(front.calls.borrow().is_empty());
    }

    /// A resume after a rolled-back switch: journaled once, only while the journal has the
    /// front paused; a front not paused is resumed again without a line.
    #[test]
    fn a_resume_is_journaled_once_and_only_when_paused() {
        let mut bed = Bed::new();
        let run = bed.run.id();
        let front = FakeFront::default();
        let driven = Driven::new(&front, Some((&mut bed.store, run)), false).with_retry(NO_WAIT);
        assert!(driven.resume_once().is_ok());
        driven.pause().unwrap();
        front.failures.set(1);
        assert!(driven.resume_once().is_err(), "one try");
        assert!(driven.is_paused());
        assert_eq!(
            driven
                .let_go(LetGo::Resume, "switch", "rolled back")
                .unwrap(),
            1
        );
        assert_eq!(driven.let_go(LetGo::Resume, "switch", "again").unwrap(), 1);
        let states: Vec<String> = front_lines(&bed).into_iter().map(|l| l.0).collect();
        assert_eq!(states, ["front_paused", "front_released"]);
    }
}
