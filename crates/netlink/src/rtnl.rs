//! Links, addresses and neighbours over rtnetlink, in any network namespace.
//!
//! The switcher changes the live path with a handful of netlink requests (attach a port to the
//! bridge, move an address, fix a neighbour entry); an LC backend creates its bridge, veth
//! pairs and taps and removes them again. The requests are sent over a netlink socket opened
//! inside the namespace they act on, so no `ip` output is ever parsed and no namespace is
//! entered by the calling thread.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use patchover_core::{Ipv4Cidr, MacAddr};
use rtnetlink::{LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns::{NetnsError, in_netns};

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("netlink")]
    Netns(#[from] NetnsError),
    #[error("netlink: cannot open a socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink: {what}")]
    Request {
        what: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("link {name:?} does not exist; check the name (host port names look like po<LC>n<i>)")]
    NoSuchLink { name: String },
    /// Its message names the tap.
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
}

impl RtnlError {
    /// The errno the kernel answered with (`EEXIST` for a name taken, `ENODEV` for a link
    /// that is gone...), if the request got that far.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            RtnlError::Netns(_) => None,
            RtnlError::Socket(e) => e.raw_os_error(),
            RtnlError::Request { source, .. } => errno(source),
            RtnlError::NoSuchLink { .. } => Some(libc::ENODEV),
            RtnlError::Tap(e) => e.raw_os_error(),
        }
    }
}

/// The errno of a netlink error answer (the kernel sends it negated).
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What the switcher needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    /// Index of the bridge (controller) the link is a port of.
    pub controller: Option<u32>,
    pub up: bool,
    pub mac: Option<MacAddr>,
}

/// An rtnetlink connection bound to one network namespace.
pub struct Rtnl {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
    /// The namespace it was opened in (`None`: the opener's).
    netns: Option<std::path::PathBuf>,
}

impl Rtnl {
    /// Opens a connection in `netns` (`None`: the caller's namespace).
    pub fn open(netns: Option<&Path>) -> Result<Rtnl, RtnlError> {
        in_netns(netns, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(RtnlError::Socket)?;
            let (conn, handle) = {
                let _guard = rt.enter();
                let (conn, handle, _) = rtnetlink::new_connection().map_err(RtnlError::Socket)?;
                (conn, handle)
            };
            rt.spawn(conn);
            Ok(Rtnl {
                rt,
                handle,
                netns: netns.map(Path::to_path_buf),
            })
        })?
    }

    fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RtnlError {
        let what = what.into();
        move |source| RtnlError::Request {
            what,
            source: Box::new(source),
        }
    }

    /// Changes an existing link as `msg` says (`RTM_NEWLINK` without `NLM_F_CREATE`: what
    /// `ip link set` sends).
    fn change(&self, msg: LinkMessage, what: String) -> Result<(), RtnlError> {
        let handle = self.handle.clone();
        self.rt
            .block_on(async move { handle.link().change(msg).execute().await })
            .map_err(Self::req(what))
    }

    /// Looks a link up by name; `Ok(None)` if it does not exist.
    pub fn link(&self, name: &str) -> Result<Option<LinkInfo>, RtnlError> {
        let handle = self.handle.clone();
        self.rt.block_on(async move {
            let mut s = handle.link().get().match_name(name.to_string()).execute();
            match s.try_next().await {
                Ok(Some(msg)) => {
                    let mut info = LinkInfo {
                        index: msg.header.index,
                        controller: None,
                        up: msg.header.flags.contains(LinkFlags::Up),
                        mac: None,
                    };
                    for a in &msg.attributes {
                        match a {
                            LinkAttribute::Controller(c) => info.controller = Some(*c),
                            LinkAttribute::Address(b) if b.len() == 6 => {
                                let mut m = [0u8; 6];
                                m.copy_from_slice(b);
                                info.mac = Some(MacAddr(m));
                            }
                            _ => {}
                        }
                    }
                    Ok(Some(info))
                }
                Ok(None) => Ok(None),
                Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
                Err(e) => Err(Self::req(format!("look up link {name:?}"))(e)),
            }
        })
    }

    /// Like [`Rtnl::link`] but a missing link is an error.
    pub fn need_link(&self, name: &str) -> Result<LinkInfo, RtnlError> {
        self.link(name)?.ok_or_else(|| RtnlError::NoSuchLink {
            name: name.to_string(),
        })
    }

    /// Makes link `index` a port of bridge `bridge` (or of none) and sets it up.
    pub fn set_controller(&self, index: u32, bridge: Option<u32>) -> Result<(), RtnlError> {
        let req = LinkUnspec::new_with_index(index);
        let req = match bridge {
            Some(b) => req.controller(b),
            None => req.nocontroller(),
        };
        self.change(req.build(), format!("set controller of link {index}"))
    }

    /// Sets link `index` up or down.
    pub fn set_up(&self, index: u32, up: bool) -> Result<(), RtnlError> {
        let req = LinkUnspec::new_with_index(index);
        let req = if up { req.up() } else { req.down() };
        self.change(req.build(), format!("set link {index} up={up}"))
    }

    /// Sets the MAC address of link `index`. The kernel then keeps it: a bridge whose address
    /// was never set takes the lowest of its ports' and changes it as ports come and go.
    pub fn set_mac(&self, index: u32, mac: MacAddr) -> Result<(), RtnlError> {
        let req = LinkUnspec::new_with_index(index).address(mac.0.to_vec());
        self.change(req.build(), format!("set the MAC of link {index} to {mac}"))
    }

    /// Sends `msg` as a new link (`RTM_NEWLINK` with `NLM_F_CREATE | NLM_F_EXCL`: a name that is
    /// taken fails with `EEXIST`).
    fn add(&self, msg: LinkMessage, what: String) -> Result<(), RtnlError> {
        let handle = self.handle.clone();
        self.rt
            .block_on(async move { handle.link().add(msg).execute().await })
            .map_err(Self::req(what))
    }

    /// Creates bridge `name`, up.
    pub fn add_bridge(&self, name: &str) -> Result<(), RtnlError> {
        let msg = LinkBridge::new(name).up().build();
        self.add(msg, format!("create bridge {name:?}"))
    }

    /// Creates the veth pair `name` and `peer`, both down; `peer` gets MAC `peer_mac`.
    pub fn add_veth(&self, name: &str, peer: &str, peer_mac: MacAddr) -> Result<(), RtnlError> {
        let peer_msg = LinkUnspec::new_with_name(peer)
            .address(peer_mac.0.to_vec())
            .build();
        let msg = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.add(
            msg,
            format!("create veth {name:?} with peer {peer:?} ({peer_mac})"),
        )
    }

    /// Creates tap device `name` (persistent, down, on no bridge) in the namespace this
    /// connection was opened in (opened with `None`: the calling thread's). Not a netlink
    /// request: see [`crate::tap`].
    pub fn add_tap(&self, name: &str) -> Result<(), RtnlError> {
        in_netns(self.netns.as_deref(), || crate::tap::create(name))??;
        Ok(())
    }

    /// Makes link `port` a port of bridge `bridge` and sets it up.
    pub fn attach(&self, port: &str, bridge: &str) -> Result<(), RtnlError> {
        let b = self.need_link(bridge)?.index;
        let msg = LinkUnspec::new_with_name(port).controller(b).up().build();
        self.change(msg, format!("plug link {port:?} into bridge {bridge:?}"))
    }

    /// Sets link `name` up.
    pub fn set_up_by_name(&self, name: &str) -> Result<(), RtnlError> {
        let msg = LinkUnspec::new_with_name(name).up().build();
        self.change(msg, format!("set link {name:?} up"))
    }

    /// Moves link `name` into the network namespace of process `pid`.
    pub fn move_to_netns_of(&self, name: &str, pid: u32) -> Result<(), RtnlError> {
        let msg = LinkUnspec::new_with_name(name).setns_by_pid(pid).build();
        self.change(
            msg,
            format!("move link {name:?} into the namespace of pid {pid}"),
        )
    }

    /// Deletes link `name` (a veth takes its peer along); `Ok(false)` if there was none.
    pub fn delete(&self, name: &str) -> Result<bool, RtnlError> {
        let handle = self.handle.clone();
        let msg = LinkUnspec::new_with_name(name).build();
        let r = self
            .rt
            .block_on(async move { handle.link().del_with_message(msg).execute().await });
        match r {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Self::req(format!("delete link {name:?}"))(e)),
        }
    }

    /// Renames link `from` to `to` (a link that is down).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), RtnlError> {
        let index = self.need_link(from)?.index;
        let msg = LinkUnspec::new_with_index(index).name(to).build();
        self.change(msg, format!("rename link {from:?} to {to:?}"))
    }

    /// Adds the default route through `gateway` on link `index`.
    pub fn add_default_route(&self, gateway: Ipv4Addr, index: u32) -> Result<(), RtnlError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        let handle = self.handle.clone();
        self.rt
            .block_on(async move { handle.route().add(msg).execute().await })
            .map_err(Self::req(format!(
                "add the default route through {gateway} on link {index}"
            )))
    }

    /// The IPv4 addresses on link `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<Ipv4Cidr>, RtnlError> {
        let handle = self.handle.clone();
        self.rt.block_on(async move {
            let mut s = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            let mut out = Vec::new();
            while let Some(msg) = s
                .try_next()
                .await
                .map_err(Self::req(format!("list addresses of link {index}")))?
            {
                if msg.header.index != index {
                    continue;
                }
                for a in &msg.attributes {
                    if let AddressAttribute::Address(IpAddr::V4(v4)) = a {
                        out.push(Ipv4Cidr {
                            addr: *v4,
                            prefix: msg.header.prefix_len,
                        });
                    }
                }
            }
            Ok(out)
        })
    }

    /// Adds `cidr` to link `index`; adding an address that is already there is fine.
    pub fn add_address(&self, index: u32, cidr: Ipv4Cidr) -> Result<(), RtnlError> {
        if self.addresses(index)?.iter().any(|a| a.addr == cidr.addr) {
            return Ok(());
        }
        let handle = self.handle.clone();
        self.rt.block_on(async move {
            handle
                .address()
                .add(index, IpAddr::V4(cidr.addr), cidr.prefix)
                .execute()
                .await
                .map_err(Self::req(format!("add {cidr} to link {index}")))
        })
    }

    /// Removes `addr` from link `index`; removing an absent address is fine.
    pub fn del_address(&self, index: u32, addr: Ipv4Addr) -> Result<(), RtnlError> {
        let handle = self.handle.clone();
        self.rt.block_on(async move {
            let mut s = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .set_address_filter(IpAddr::V4(addr))
                .execute();
            let mut msgs = Vec::new();
            while let Some(m) = s
                .try_next()
                .await
                .map_err(Self::req(format!("find {addr} on link {index}")))?
            {
                msgs.push(m);
            }
            for m in msgs {
                handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(Self::req(format!("remove {addr} from link {index}")))?;
            }
            Ok(())
        })
    }

    /// The MAC of this namespace's neighbour entry for `ip` on link `index` (any link when
    /// `None`), `None` without one or when it failed: where packets to `ip` went.
    pub fn neighbour(
        &self,
        ip: Ipv4Addr,
        index: Option<u32>,
    ) -> Result<Option<MacAddr>, RtnlError> {
        use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let handle = self.handle.clone();
        self.rt.block_on(async move {
            let mut s = handle
                .neighbours()
                .get()
                .set_address_family(netlink_packet_route::AddressFamily::Inet)
                .execute();
            let mut found = None;
            while let Some(msg) = s
                .try_next()
                .await
                .map_err(Self::req(format!("read the neighbour entry of {ip}")))?
            {
                let is_ip = msg.attributes.iter().any(|a| {
                    matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) if *v == ip)
                });
                if !is_ip
                    || index.is_some_and(|i| i != msg.header.ifindex)
                    || matches!(
                        msg.header.state,
                        NeighbourState::Failed | NeighbourState::Incomplete
                    )
                {
                    continue;
                }
                found = msg.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(b) => {
                        <[u8; 6]>::try_from(&b[..]).ok().map(MacAddr)
                    }
                    _ => None,
                });
            }
            Ok(found)
        })
    }

    /// Points the neighbour entry for `ip` on link `index` at `mac` (state STALE, so the kernel
    /// re-verifies it on use instead of trusting it forever).
    pub fn replace_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: MacAddr,
    ) -> Result<(), RtnlError> {
        let handle = self.handle.clone();
        self.rt.block_on(async move {
            handle
                .neighbours()
                .add(index, IpAddr::V4(ip))
                .link_layer_address(&mac.0)
                .state(NeighbourState::Stale)
                .replace()
                .execute()
                .await
                .map_err(Self::req(format!("point neighbour {ip} at {mac}")))
        })
    }
}
