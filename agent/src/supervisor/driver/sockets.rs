//! The services' listening sockets (`[[sockets]]`): bound by the agent before a spec that
//! needs them is accepted, handed to every instance, kept across instance restarts, rollouts
//! and agent restarts (taken back from a running instance), closed once nothing uses them.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::Driver;
use super::slots::Service;
use crate::runtime::listen_fd_in_init;
use crate::spec::{ListenAddr, ServiceSpec};
use crate::supervisor::SupervisorError;

/// Listening sockets by address.
pub(super) type SocketMap = BTreeMap<String, (ListenAddr, Arc<OwnedFd>)>;

/// How many listening sockets of an init are looked at when taking one back.
const MAX_SOCKETS_TAKEN_BACK: usize = 16;

impl Driver {
    /// The listening sockets for `spec`, by address: the service's own where it has one on
    /// the address (the very same socket, so no connection is refused across a rollout),
    /// new ones bound for new addresses.
    pub(super) fn sockets_for(&self, spec: &ServiceSpec) -> Result<SocketMap, SupervisorError> {
        let current = self.services.get(&spec.name);
        spec.sockets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = s.listen.to_string();
                if let Some(fd) = current.and_then(|svc| svc.sockets.get(&key)) {
                    return Ok((key, fd.clone()));
                }
                self.deps
                    .sockets
                    .bind_socket(&s.listen)
                    .map(|fd| (key, (s.listen.clone(), Arc::new(fd))))
                    .map_err(|source| SupervisorError::Listen {
                        index: i,
                        listen: s.listen.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// Close the sockets neither the target spec nor any instance uses any more.
    pub(super) fn prune_sockets(&mut self, name: &str) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let used: BTreeSet<String> = std::iter::once(&svc.d.spec)
            .chain(svc.instances().map(|i| &i.spec))
            .flat_map(|s| s.sockets.iter().map(|k| k.listen.to_string()))
            .collect();
        let unused: Vec<String> = svc
            .sockets
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        for key in unused {
            if let Some((listen, _)) = svc.sockets.remove(&key) {
                tracing::info!(service = %name, listen = %listen, "socket no longer used: closed");
                self.deps.sockets.unlink_socket(&listen);
            }
        }
    }

    /// After a restart: every service's sockets (of its target spec and of the specs its
    /// instances run), taken back from its running instances where they hold them (the same
    /// sockets, never a second one on the address), else bound.
    pub(super) fn acquire_sockets(&mut self) {
        for name in self.services.names() {
            let Some(svc) = self.services.get(&name) else {
                continue;
            };
            let mut sockets = SocketMap::new();
            for (key, listen) in wanted_sockets(svc) {
                let fd = match self.take_back(svc, &listen) {
                    Some(fd) => {
                        tracing::info!(service = %name, listen = %listen, "took the listening socket back from a running instance");
                        Ok(fd)
                    }
                    None => self.deps.sockets.bind_socket(&listen),
                };
                match fd {
                    Ok(fd) => {
                        sockets.insert(key, (listen, Arc::new(fd)));
                    }
                    Err(e) => {
                        tracing::error!(service = %name, listen = %listen, error = %e, "cannot listen; instances cannot start");
                    }
                }
            }
            if let Some(svc) = self.services.get_mut(&name) {
                svc.sockets = sockets;
            }
        }
    }

    /// The socket on `listen` a running instance of `svc` holds, when one does.
    fn take_back(&self, svc: &Service, listen: &ListenAddr) -> Option<OwnedFd> {
        svc.slots
            .values()
            .filter(|s| s.instance.spec.sockets.iter().any(|k| k.listen == *listen))
            .filter_map(|s| s.live.as_ref())
            .find_map(|l| {
                (0..MAX_SOCKETS_TAKEN_BACK).find_map(|j| {
                    self.deps
                        .sockets
                        .take_socket(&l.process, listen_fd_in_init(j), listen)
                        .ok()
                })
            })
    }
}

/// The addresses of a service's target spec and of every spec its instances run.
fn wanted_sockets(svc: &Service) -> BTreeMap<String, ListenAddr> {
    std::iter::once(&svc.d.spec)
        .chain(svc.instances().map(|i| &i.spec))
        .flat_map(|spec| &spec.sockets)
        .map(|s| (s.listen.to_string(), s.listen.clone()))
        .collect()
}
