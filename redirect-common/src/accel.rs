//! Acceleration's decisions, shared by the kernel programs and the host
//! tests: which connections are accelerated (short-lived ports are
//! learned and left out), and the per-socket state machine of the sk_msg
//! program ([`AccelSock`]): redirect to the peer, verdict budget, bulk
//! switch, fallback to the normal path for good. The kernel supplies the
//! effects (redirect, fallback mark, counters, budget) through
//! [`MsgEffects`], as it supplies map lookups to the other decisions
//! through [`crate::Lookup`].

use crate::{Reason, TupleKey};

/// Acceleration's bulk switch: a message of at least this many bytes
/// (one large write) moves its socket to the normal TCP path for good, so
/// bulk writers are flow-controlled by TCP again (redirected data is not,
/// docs/acceleration.md). Small request/response messages stay below it.
pub const ACCEL_BULK_MSG_BYTES: u32 = 64 * 1024;

/// Does a message of `size` bytes switch its socket to the normal path?
#[inline(always)]
pub fn accel_is_bulk(size: u32) -> bool {
    size >= ACCEL_BULK_MSG_BYTES
}

/// Bytes one acceleration verdict covers (`bpf_msg_apply_bytes`): the
/// kernel applies the sk_msg program's verdict to a socket's next messages
/// until they add up to this, without running the program. Also the
/// granularity of the ACCEL byte counters (docs/acceleration.md).
pub const ACCEL_VERDICT_BYTES: u32 = 16 * 1024;

/// A verdict made for a message of `size` bytes: the bytes of that message
/// it covers (counted at once), and the rest of its budget (counted by the
/// next verdict, which runs only once the budget is used up).
#[inline(always)]
pub fn accel_verdict_split(size: u32) -> (u32, u32) {
    let covered = if size < ACCEL_VERDICT_BYTES {
        size
    } else {
        ACCEL_VERDICT_BYTES
    };
    (covered, ACCEL_VERDICT_BYTES - covered)
}

/// Acceleration learns where it does not pay. Each accelerated connection
/// costs the kernel a psock per socket, set up in the handshake and torn
/// down at close through an RCU-deferred work item (docs/acceleration.md,
/// "Short-lived connections are left out"): for connections that live only microseconds that cost
/// is not won back, and it raises their latency tail. So each pod keeps,
/// per destination port (the original destination's port outbound, the
/// app's port for the inbound passthrough), a count of consecutive
/// connections that lived less than this; REDIRECT_ACCEL_PORTS.
pub const ACCEL_SHORT_CONN_NS: u64 = 10_000_000;

/// After this many consecutive short-lived connections to a port, new
/// connections to it are not accelerated; one connection that lives
/// longer (accelerated or not) turns acceleration back on for the port.
pub const ACCEL_SHORT_SKIP_AFTER: u32 = 4;

/// Entries of REDIRECT_ACCEL_PORTS (an LRU: the learned state is soft).
pub const MAX_ACCEL_PORTS: u32 = 16384;

/// A port's count after one of its connections closed after `lifetime_ns`.
#[inline(always)]
pub fn accel_short_count_after(count: u32, lifetime_ns: u64) -> u32 {
    if lifetime_ns >= ACCEL_SHORT_CONN_NS {
        0
    } else if count < ACCEL_SHORT_SKIP_AFTER {
        count + 1
    } else {
        ACCEL_SHORT_SKIP_AFTER
    }
}

/// Is a new connection to a port with this count accelerated?
#[inline(always)]
pub fn accel_pays(short_count: u32) -> bool {
    short_count < ACCEL_SHORT_SKIP_AFTER
}

/// [`AccelSock::state`] values. The `FALLBACK_*` ones are also the marks
/// of REDIRECT_ACCEL_FALLBACK (why a socket is on the normal path), which
/// keep a socket there across program versions.
pub mod accel_state {
    /// Messages go straight to the peer socket.
    pub const ON: u32 = 0;
    /// On the normal path for good: the peer was not in the sockhash (or
    /// the socket's storage could not be made).
    pub const FALLBACK_PEER_MISSING: u32 = 1;
    /// On the normal path for good after a bulk message.
    pub const FALLBACK_BULK: u32 = 2;
    /// An active socket left out of the sockhash (its port's connections
    /// are short-lived); its state is there only to time it.
    pub const SKIPPED: u32 = 3;
}

/// The counter a message of a socket in `state` is counted under.
#[inline(always)]
pub fn accel_reason(state: u32) -> Reason {
    match state {
        accel_state::ON => Reason::AccelRedirected,
        accel_state::FALLBACK_BULK => Reason::AccelBulk,
        _ => Reason::AccelFallback,
    }
}

/// Per-socket acceleration state: the value of REDIRECT_ACCEL_SK
/// (socket-local storage). It holds the peer's key, where this socket's
/// bytes go, and how much of the last verdict's budget is not counted
/// yet. Made by sockops in the handshake (by the first message for a
/// socket an earlier version inserted), so a verdict costs one storage
/// lookup and the redirect, with no key to rebuild and no hash lookup of
/// our own. The kernel frees it with the socket. Its size is part of the
/// pinned map's layout (checked on upgrade): it never changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccelSock {
    /// The peer's sockhash key (carries the netns cookie).
    pub peer: TupleKey,
    /// An [`accel_state`] value.
    pub state: u32,
    /// Bytes of the last verdict's budget beyond the message it was made
    /// for: counted when the next verdict shows the budget was used up.
    pub uncounted: u32,
    /// Active side only (0 otherwise): when the connection was
    /// established and the port its lifetime is learned for.
    pub born_ns: u64,
    pub learn_port: u16,
    /// 1 while the socket is in REDIRECT_SOCKS (inserted by this version):
    /// its close is counted as a removal.
    pub inserted: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(core::mem::size_of::<AccelSock>() == 72);

/// The effects of one sk_msg verdict, in the order
/// [`AccelSock::on_message`] asks for them. The kernel implements them
/// with its helpers and maps; the host tests record them.
pub trait MsgEffects {
    /// Send this message to the socket keyed `peer` in REDIRECT_SOCKS
    /// (`bpf_msg_redirect_hash`); false when the peer is not there.
    fn redirect(&mut self, peer: &TupleKey) -> bool;
    /// Mark the socket keyed `own` as on the normal path for good
    /// (REDIRECT_ACCEL_FALLBACK, `why` a `FALLBACK_*` state).
    fn mark_fallback(&mut self, own: &TupleKey, why: u32);
    /// Add `conns` messages and `bytes` bytes to a counter of the pod.
    fn count(&mut self, netns: u64, reason: Reason, conns: u64, bytes: u64);
    /// This verdict covers the socket's next `bytes` bytes
    /// (`bpf_msg_apply_bytes`).
    fn apply_bytes(&mut self, bytes: u32);
}

/// What a closing socket's state asks of sockops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccelClose {
    /// The socket was in REDIRECT_SOCKS (count it out).
    pub removed: bool,
    /// The port whose short-lived count learns from this connection, and
    /// how long the connection lived.
    pub learn: Option<(u16, u64)>,
}

impl AccelSock {
    /// State for a socket sending to `peer`: nothing counted, not timed,
    /// not marked as inserted.
    #[inline(always)]
    pub fn new(peer: TupleKey, state: u32) -> Self {
        AccelSock {
            peer,
            state,
            uncounted: 0,
            born_ns: 0,
            learn_port: 0,
            inserted: 0,
            _pad: [0; 2],
        }
    }

    /// The active side of an app↔proxy connection, established at
    /// `born_ns`: accelerated when it `pays`, timed either way so its
    /// close teaches `port`. Marked inserted once sockops put it in the
    /// sockhash.
    #[inline(always)]
    pub fn active(peer: TupleKey, pays: bool, born_ns: u64, port: u16) -> Self {
        AccelSock {
            born_ns,
            learn_port: port,
            ..AccelSock::new(
                peer,
                if pays {
                    accel_state::ON
                } else {
                    accel_state::SKIPPED
                },
            )
        }
    }

    /// The passive side, already in the sockhash (its state is made in the
    /// handshake so its close is counted).
    #[inline(always)]
    pub fn passive(peer: TupleKey) -> Self {
        AccelSock {
            inserted: 1,
            ..AccelSock::new(peer, accel_state::ON)
        }
    }

    /// A socket's first message seen by this program version (the socket
    /// was inserted by an earlier one): `mark` is its REDIRECT_ACCEL_FALLBACK
    /// entry, which keeps it on the normal path if it was put there.
    #[inline(always)]
    pub fn first_message(peer: TupleKey, mark: Option<u8>) -> Self {
        let state = match mark {
            Some(why) => why as u32,
            None => accel_state::ON,
        };
        AccelSock::new(peer, state)
    }

    /// One sk_msg verdict for a message of `size` bytes (the message takes
    /// the normal path unless `fx.redirect` sent it).
    ///
    /// An accelerated socket redirects it to the peer; a bulk message, or
    /// a peer missing from the sockhash, moves the socket to the normal
    /// path for good instead. Bulk: TCP flow control holds a writer back
    /// there (the peer's sockmap queue has none), and the receiver reads
    /// what was redirected before the normal path's bytes, so the order is
    /// kept.
    ///
    /// Counting: a redirect verdict covers the next ACCEL_VERDICT_BYTES
    /// bytes, and the program runs again only once they are used up; so
    /// the last verdict's rest is counted now, under the reason it was made
    /// for, and this message (the part of it the verdict covers) at once.
    /// On the normal path the program runs for every message (bulk
    /// messages are large, so that costs little) and counts each exactly.
    #[inline(always)]
    pub fn on_message<E: MsgEffects>(&mut self, size: u32, fx: &mut E) {
        let was = self.state;
        if was == accel_state::ON {
            if accel_is_bulk(size) {
                self.leave(accel_state::FALLBACK_BULK, fx);
            } else if !fx.redirect(&self.peer) {
                self.leave(accel_state::FALLBACK_PEER_MISSING, fx);
            }
        }
        let now = self.state;
        let (covered, rest) = if now == accel_state::ON {
            accel_verdict_split(size)
        } else {
            (size, 0)
        };
        let netns = self.peer.netns;
        if now == was {
            fx.count(
                netns,
                accel_reason(was),
                1,
                self.uncounted as u64 + covered as u64,
            );
        } else {
            if self.uncounted != 0 {
                fx.count(netns, accel_reason(was), 0, self.uncounted as u64);
            }
            fx.count(netns, accel_reason(now), 1, covered as u64);
        }
        self.uncounted = rest;
        if now == accel_state::ON {
            fx.apply_bytes(ACCEL_VERDICT_BYTES);
        }
    }

    /// The socket goes to the normal path for good (`why`: FALLBACK_*); the
    /// pinned mark keeps it there across program versions (whose storage
    /// starts empty).
    #[inline(always)]
    fn leave<E: MsgEffects>(&mut self, why: u32, fx: &mut E) {
        self.state = why;
        fx.mark_fallback(&self.peer.reversed(), why);
    }

    /// The socket closed: whether to count it out of the sockhash, and
    /// what its port learns (`now_ns` is read only for a timed socket).
    /// Each happens once.
    #[inline(always)]
    pub fn on_close<F: FnOnce() -> u64>(&mut self, now_ns: F) -> AccelClose {
        let removed = self.inserted != 0;
        if removed {
            self.inserted = 0;
        }
        let mut learn = None;
        if self.learn_port != 0 {
            learn = Some((self.learn_port, now_ns().wrapping_sub(self.born_ns)));
            self.learn_port = 0;
        }
        AccelClose { removed, learn }
    }
}

/// A socket's first message when its state could not be made (the kernel
/// could not allocate it): the message takes the normal path, counted, and
/// the socket (keyed `own`) is marked to stay on it, so no later message
/// can overtake this one.
#[inline(always)]
pub fn accel_unstored_message<E: MsgEffects>(own: &TupleKey, size: u32, fx: &mut E) {
    fx.mark_fallback(own, accel_state::FALLBACK_PEER_MISSING);
    fx.count(own.netns, Reason::AccelFallback, 1, size as u64);
}

#[cfg(test)]
mod tests;
