//! The connection front of `[service.front]` (docs/postgres.md): built from the config,
//! checked before a run changes anything, paused by the switch's drain, resumed by its resume
//! (a rollback, recovery) and released after a switch that went through.

use std::net::SocketAddr;
use std::time::Duration;

use patchover_front::{Front, PgBouncer};
use patchover_net::Mode;

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

/// After the switch: the front reconnects and lets its clients go, tried a few times (its
/// clients wait until it works). `Err`: it could not, with what to do.
pub fn release(front: &dyn Front) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        match front.release() {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = patchover_core::error::chain(&e);
                tracing::warn!(front = %front.describe(), error = %last, attempt, "cannot release the front");
            }
        }
    }
    Err(format!(
        "{last}; its clients wait until it is resumed: run RESUME on its admin console"
    ))
}

#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;

    use patchover_front::{Front, FrontError};

    /// Records what was asked of it; `pause` fails when told to.
    #[derive(Default)]
    pub struct FakeFront {
        pub calls: RefCell<Vec<String>>,
        pub pause_fails: bool,
        pub paused: RefCell<bool>,
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
            Ok(self.paused.replace(false))
        }
        fn release(&self) -> Result<(), FrontError> {
            self.calls.borrow_mut().push("release".into());
            self.paused.replace(false);
            Ok(())
        }
    }
}
