//! [`InLc`] for `ns` LCs: one worker thread in the LC's network namespace, and the netlink and
//! packet sockets it opened there, kept for the next call.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use patchover_core::{Ipv4Cidr, MacAddr};

use super::{HttpAnswer, InLc, InLcError};
use crate::diag::run_in;
use crate::garp::Sender;
use crate::netns::{Drain, NsWorker};
use crate::rtnl::Rtnl;

/// A network namespace, entered once.
pub struct NsLc {
    path: PathBuf,
    worker: NsWorker,
    rtnl: OnceLock<Rtnl>,
    links: Mutex<HashMap<String, u32>>,
    senders: Mutex<HashMap<String, Arc<Sender>>>,
    /// The connections a drain follows (`busy_tcp_connections`).
    drain: Arc<Mutex<Drain>>,
}

impl NsLc {
    /// Starts a worker thread in `path`.
    pub fn open(path: &Path) -> Result<NsLc, InLcError> {
        Ok(NsLc {
            path: path.to_path_buf(),
            worker: NsWorker::start(Some(path))?,
            rtnl: OnceLock::new(),
            links: Mutex::new(HashMap::new()),
            senders: Mutex::new(HashMap::new()),
            drain: Arc::new(Mutex::new(Drain::default())),
        })
    }

    fn rtnl(&self) -> Result<&Rtnl, InLcError> {
        if let Some(r) = self.rtnl.get() {
            return Ok(r);
        }
        // Opened on the worker: the socket belongs to the namespace, no second thread joins it.
        let r = self.worker.run(|| Rtnl::open(None))??;
        Ok(self.rtnl.get_or_init(|| r))
    }

    /// The netlink handle and the index of `iface`.
    fn link(&self, iface: &str) -> Result<(&Rtnl, u32), InLcError> {
        let r = self.rtnl()?;
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = links.get(iface) {
            return Ok((r, *i));
        }
        let i = r.need_link(iface)?.index;
        links.insert(iface.to_string(), i);
        Ok((r, i))
    }

    fn sender(&self, iface: &str) -> Result<Arc<Sender>, InLcError> {
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = senders.get(iface) {
            return Ok(s.clone());
        }
        let (ns, name) = (Some(self.path.clone()), iface.to_string());
        let s = Arc::new(self.worker.run(move || Sender::open_here(ns, &name))??);
        senders.insert(iface.to_string(), s.clone());
        Ok(s)
    }
}

impl InLc for NsLc {
    fn describe(&self) -> String {
        format!("network namespace {}", self.path.display())
    }

    fn prepare(&self, iface: &str, addresses: bool, announce: bool) -> Result<(), InLcError> {
        if addresses {
            self.link(iface)?;
        }
        if announce {
            self.sender(iface)?;
        }
        Ok(())
    }

    fn addresses(&self, iface: &str) -> Result<Vec<Ipv4Cidr>, InLcError> {
        let (r, i) = self.link(iface)?;
        Ok(r.addresses(i)?)
    }

    fn add_address(&self, iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError> {
        let (r, i) = self.link(iface)?;
        Ok(r.add_address(i, cidr)?)
    }

    fn del_address(&self, iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError> {
        let (r, i) = self.link(iface)?;
        Ok(r.del_address(i, cidr.addr)?)
    }

    fn announce(
        &self,
        iface: &str,
        mac: MacAddr,
        ip: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> Result<u32, InLcError> {
        let s = self.sender(iface)?;
        let mut sent = 0;
        for i in 0..count {
            s.send(mac, ip)?;
            sent += 1;
            if i + 1 < count {
                std::thread::sleep(interval);
            }
        }
        tracing::debug!(%ip, %mac, iface, sent, "gratuitous ARP sent");
        Ok(sent)
    }

    fn http_get(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpAnswer, InLcError> {
        let p = path.to_string();
        self.worker
            .run(move || crate::health::http_get_here(addr, &p, timeout, None))?
            .map_err(|source| InLcError::Http {
                addr,
                path: path.to_string(),
                source,
            })
    }

    fn https_get(
        &self,
        addr: SocketAddr,
        path: &str,
        trust: &patchover_core::TlsTrust,
        timeout: Duration,
    ) -> Result<HttpAnswer, InLcError> {
        let (p, t) = (path.to_string(), trust.clone());
        self.worker
            .run(move || crate::tls::get(&t, addr, &p, timeout, None))?
            .map_err(|source| InLcError::Https {
                addr,
                path: path.to_string(),
                source,
            })
    }

    fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<(), InLcError> {
        self.worker
            .run(move || crate::health::connect_here(addr, timeout))?
            .map_err(|source| InLcError::Connect { addr, source })
    }

    fn busy_tcp_connections(&self, port: u16) -> Result<usize, InLcError> {
        let drain = self.drain.clone();
        Ok(self.worker.run(move || {
            drain
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll_here(port)
        })?)
    }

    fn network_state(&self, iface: &str, port: u16) -> String {
        let ns = Some(self.path.as_path());
        let sport = format!(":{port}");
        [
            run_in(
                ns,
                "addresses",
                "ip",
                &["-o", "-4", "addr", "show", "dev", iface],
            ),
            run_in(ns, "neighbours", "ip", &["neigh", "show", "dev", iface]),
            run_in(ns, "listening", "ss", &["-Htln", "sport", "=", &sport]),
        ]
        .join("; ")
    }
}
