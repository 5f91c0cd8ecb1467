use super::*;

#[test]
fn a_verdict_covers_its_message_up_to_the_budget() {
    assert_eq!(accel_verdict_split(64), (64, ACCEL_VERDICT_BYTES - 64));
    assert_eq!(
        accel_verdict_split(ACCEL_VERDICT_BYTES - 1),
        (ACCEL_VERDICT_BYTES - 1, 1)
    );
    assert_eq!(
        accel_verdict_split(ACCEL_VERDICT_BYTES),
        (ACCEL_VERDICT_BYTES, 0)
    );
    assert_eq!(
        accel_verdict_split(3 * ACCEL_VERDICT_BYTES),
        (ACCEL_VERDICT_BYTES, 0)
    );
    // A verdict always covers at least its own message (or the budget),
    // and never more than the budget in all.
    for size in [0, 1, 1000, 70_000, u32::MAX] {
        let (c, r) = accel_verdict_split(size);
        assert_eq!(c + r, ACCEL_VERDICT_BYTES);
        assert_eq!(c, size.min(ACCEL_VERDICT_BYTES));
    }
}

#[test]
fn short_connections_turn_acceleration_off_for_their_port_until_a_long_one() {
    let short = ACCEL_SHORT_CONN_NS - 1;
    let mut c = 0;
    for i in 0..ACCEL_SHORT_SKIP_AFTER {
        assert!(accel_pays(c), "after {i} short connections");
        c = accel_short_count_after(c, short);
    }
    assert!(!accel_pays(c));
    // Saturates, so one long connection always turns it back on.
    for _ in 0..100 {
        c = accel_short_count_after(c, short);
    }
    assert_eq!(c, ACCEL_SHORT_SKIP_AFTER);
    c = accel_short_count_after(c, ACCEL_SHORT_CONN_NS);
    assert_eq!(c, 0);
    assert!(accel_pays(c));
    // Short ones must be consecutive.
    let mut c = 0;
    for _ in 0..10 {
        c = accel_short_count_after(c, 1);
        c = accel_short_count_after(c, u64::MAX);
    }
    assert!(accel_pays(c));
}

#[test]
fn bulk_starts_at_the_threshold() {
    assert!(!accel_is_bulk(ACCEL_BULK_MSG_BYTES - 1));
    assert!(accel_is_bulk(ACCEL_BULK_MSG_BYTES));
}

// ------------------------------------------------- the sk_msg state machine

extern crate std;
use std::vec::Vec;

use crate::{TupleKey, AF_INET};

const NETNS: u64 = 0x1234;

/// The app's socket 10.0.0.5:40000 → the proxy at 127.0.0.1:15001, as
/// seen from the app side: the key of its peer (the proxy's socket).
fn peer() -> TupleKey {
    let mut app = [0; 16];
    app[..4].copy_from_slice(&[10, 0, 0, 5]);
    let mut lo = [0; 16];
    lo[..4].copy_from_slice(&[127, 0, 0, 1]);
    TupleKey {
        netns: NETNS,
        src: lo,
        dst: app,
        sport: 15001,
        dport: 40000,
        family: AF_INET,
        _pad: 0,
    }
}

fn own() -> TupleKey {
    peer().reversed()
}

/// One effect asked of the kernel, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fx {
    Redirect(TupleKey),
    Mark(TupleKey, u32),
    Count(u64, Reason, u64, u64),
    Apply(u32),
}

/// Records the effects; `peer_present` is what the sockhash redirect
/// returns.
struct Recorder {
    peer_present: bool,
    log: Vec<Fx>,
}

impl Recorder {
    fn new(peer_present: bool) -> Recorder {
        Recorder {
            peer_present,
            log: Vec::new(),
        }
    }

    fn take(&mut self) -> Vec<Fx> {
        core::mem::take(&mut self.log)
    }
}

impl MsgEffects for Recorder {
    fn redirect(&mut self, peer: &TupleKey) -> bool {
        self.log.push(Fx::Redirect(*peer));
        self.peer_present
    }
    fn mark_fallback(&mut self, own: &TupleKey, why: u32) {
        self.log.push(Fx::Mark(*own, why));
    }
    fn count(&mut self, netns: u64, reason: Reason, conns: u64, bytes: u64) {
        self.log.push(Fx::Count(netns, reason, conns, bytes));
    }
    fn apply_bytes(&mut self, bytes: u32) {
        self.log.push(Fx::Apply(bytes));
    }
}

const BUDGET: u32 = ACCEL_VERDICT_BYTES;

#[test]
fn the_state_keeps_its_pinned_layout() {
    // REDIRECT_ACCEL_SK's value: a pinned map of a running install is
    // layout-checked on upgrade, so none of this may move.
    assert_eq!(core::mem::size_of::<AccelSock>(), 72);
    assert_eq!(core::mem::offset_of!(AccelSock, peer), 0);
    assert_eq!(core::mem::offset_of!(AccelSock, state), 48);
    assert_eq!(core::mem::offset_of!(AccelSock, uncounted), 52);
    assert_eq!(core::mem::offset_of!(AccelSock, born_ns), 56);
    assert_eq!(core::mem::offset_of!(AccelSock, learn_port), 64);
    assert_eq!(core::mem::offset_of!(AccelSock, inserted), 66);
    // The states are also the fallback marks (a u8 in the map).
    assert_eq!(accel_state::ON, 0);
    assert_eq!(accel_state::FALLBACK_PEER_MISSING, 1);
    assert_eq!(accel_state::FALLBACK_BULK, 2);
    assert_eq!(accel_state::SKIPPED, 3);
}

#[test]
fn each_state_counts_under_its_reason() {
    assert_eq!(accel_reason(accel_state::ON), Reason::AccelRedirected);
    assert_eq!(accel_reason(accel_state::FALLBACK_BULK), Reason::AccelBulk);
    assert_eq!(
        accel_reason(accel_state::FALLBACK_PEER_MISSING),
        Reason::AccelFallback
    );
    assert_eq!(accel_reason(accel_state::SKIPPED), Reason::AccelFallback);
}

#[test]
fn an_accelerated_socket_redirects_and_counts_each_budget_once() {
    let mut st = AccelSock::new(peer(), accel_state::ON);
    let mut fx = Recorder::new(true);
    st.on_message(100, &mut fx);
    assert_eq!(
        fx.take(),
        [
            Fx::Redirect(peer()),
            Fx::Count(NETNS, Reason::AccelRedirected, 1, 100),
            Fx::Apply(BUDGET),
        ]
    );
    assert_eq!(st.uncounted, BUDGET - 100);
    // The next verdict runs once the budget is used up: its rest is
    // counted with this message.
    st.on_message(200, &mut fx);
    assert_eq!(
        fx.take(),
        [
            Fx::Redirect(peer()),
            Fx::Count(
                NETNS,
                Reason::AccelRedirected,
                1,
                (BUDGET - 100) as u64 + 200
            ),
            Fx::Apply(BUDGET),
        ]
    );
    // A message beyond the budget: the verdict covers the budget only.
    st.on_message(3 * BUDGET, &mut fx);
    assert_eq!(
        fx.take()[1],
        Fx::Count(
            NETNS,
            Reason::AccelRedirected,
            1,
            (BUDGET - 200 + BUDGET) as u64
        )
    );
    assert_eq!(st.uncounted, 0);
    assert_eq!(st.state, accel_state::ON);
}

#[test]
fn a_bulk_message_moves_the_socket_to_the_normal_path_for_good() {
    let mut st = AccelSock::new(peer(), accel_state::ON);
    let mut fx = Recorder::new(true);
    st.on_message(100, &mut fx);
    fx.take();
    st.on_message(ACCEL_BULK_MSG_BYTES, &mut fx);
    assert_eq!(
        fx.take(),
        [
            // Not redirected: marked by its own key, the last budget's
            // rest counted where it belongs, the message as bulk.
            Fx::Mark(own(), accel_state::FALLBACK_BULK),
            Fx::Count(NETNS, Reason::AccelRedirected, 0, (BUDGET - 100) as u64),
            Fx::Count(NETNS, Reason::AccelBulk, 1, ACCEL_BULK_MSG_BYTES as u64),
        ]
    );
    assert_eq!((st.state, st.uncounted), (accel_state::FALLBACK_BULK, 0));
    // From now on every message is counted exactly, never redirected,
    // with no budget, whatever its size.
    for size in [1, 10, ACCEL_BULK_MSG_BYTES - 1, 5 * ACCEL_BULK_MSG_BYTES] {
        st.on_message(size, &mut fx);
        assert_eq!(
            fx.take(),
            [Fx::Count(NETNS, Reason::AccelBulk, 1, size as u64)]
        );
    }
}

#[test]
fn a_missing_peer_puts_the_socket_on_the_normal_path_for_good() {
    let mut st = AccelSock::new(peer(), accel_state::ON);
    let mut fx = Recorder::new(false);
    st.on_message(300, &mut fx);
    assert_eq!(
        fx.take(),
        [
            Fx::Redirect(peer()),
            Fx::Mark(own(), accel_state::FALLBACK_PEER_MISSING),
            // Nothing left of an earlier budget: no empty count.
            Fx::Count(NETNS, Reason::AccelFallback, 1, 300),
        ]
    );
    // A peer that shows up later does not bring it back: later bytes
    // could overtake the ones already on the normal path.
    fx.peer_present = true;
    st.on_message(300, &mut fx);
    assert_eq!(fx.take(), [Fx::Count(NETNS, Reason::AccelFallback, 1, 300)]);
}

#[test]
fn the_first_message_of_a_new_program_version_keeps_an_earlier_mark() {
    let st = AccelSock::first_message(peer(), None);
    assert_eq!(st, AccelSock::new(peer(), accel_state::ON));
    let mut st = AccelSock::first_message(peer(), Some(accel_state::FALLBACK_BULK as u8));
    assert_eq!(st.state, accel_state::FALLBACK_BULK);
    let mut fx = Recorder::new(true);
    st.on_message(10, &mut fx);
    assert_eq!(fx.take(), [Fx::Count(NETNS, Reason::AccelBulk, 1, 10)]);
}

#[test]
fn a_socket_without_state_is_marked_and_counted_on_the_normal_path() {
    let mut fx = Recorder::new(true);
    accel_unstored_message(&own(), 500, &mut fx);
    assert_eq!(
        fx.take(),
        [
            Fx::Mark(own(), accel_state::FALLBACK_PEER_MISSING),
            Fx::Count(NETNS, Reason::AccelFallback, 1, 500),
        ]
    );
}

/// Every verdict is counted as one message, and every byte once: an
/// accelerated verdict accounts for its whole budget (counted now or by
/// the next verdict), a normal-path one for its message. Sizes and peer
/// misses from a fixed pseudo-random sequence.
#[test]
fn every_verdict_and_every_byte_is_counted_once() {
    for seed in 1..200u64 {
        let mut rng = seed;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as u32
        };
        let mut st = AccelSock::new(peer(), accel_state::ON);
        let mut fx = Recorder::new(true);
        let mut history = Vec::new();
        let (mut verdicts, mut redirected, mut normal_bytes) = (0u64, 0u64, 0u64);
        for _ in 0..50 {
            let size = match next() % 4 {
                0 => next() % (2 * ACCEL_BULK_MSG_BYTES),
                _ => next() % (2 * BUDGET),
            };
            fx.peer_present = next() % 16 != 0;
            let was_on = st.state == accel_state::ON;
            st.on_message(size, &mut fx);
            let step = fx.take();
            verdicts += 1;
            if st.state == accel_state::ON {
                redirected += 1;
                assert_eq!(step.first(), Some(&Fx::Redirect(peer())), "seed {seed}");
                assert_eq!(step.last(), Some(&Fx::Apply(BUDGET)), "seed {seed}");
            } else {
                normal_bytes += size as u64;
                assert!(!step.iter().any(|f| matches!(f, Fx::Apply(_))));
            }
            if !was_on {
                // Off for good: no redirect tried, no new mark.
                assert_eq!(step.len(), 1, "seed {seed}: {step:?}");
            }
            history.extend(step);
            let sum = |want: &dyn Fn(Reason) -> bool| {
                history.iter().fold((0u64, 0u64), |(c, b), f| match f {
                    Fx::Count(n, r, cc, bb) if *n == NETNS && want(*r) => (c + cc, b + bb),
                    _ => (c, b),
                })
            };
            let (conns, _) = sum(&|_| true);
            assert_eq!(conns, verdicts, "seed {seed}");
            let (_, on_bytes) = sum(&|r| r == Reason::AccelRedirected);
            let pending = if st.state == accel_state::ON {
                st.uncounted as u64
            } else {
                assert_eq!(st.uncounted, 0);
                0
            };
            assert_eq!(
                on_bytes + pending,
                redirected * BUDGET as u64,
                "seed {seed}"
            );
            let (_, off_bytes) = sum(&|r| r != Reason::AccelRedirected);
            assert_eq!(off_bytes, normal_bytes, "seed {seed}");
            let marks: Vec<_> = history
                .iter()
                .filter_map(|f| match f {
                    Fx::Mark(k, why) => Some((*k, *why)),
                    _ => None,
                })
                .collect();
            if st.state == accel_state::ON {
                assert!(marks.is_empty());
            } else {
                assert_eq!(marks, [(own(), st.state)], "seed {seed}");
            }
        }
    }
}

#[test]
fn a_close_counts_the_socket_out_and_teaches_its_port_once() {
    // Active side, accelerated and inserted.
    let mut st = AccelSock::active(peer(), true, 1_000, 8080);
    assert_eq!((st.state, st.inserted), (accel_state::ON, 0));
    st.inserted = 1;
    assert_eq!(
        st.on_close(|| 1_500),
        AccelClose {
            removed: true,
            learn: Some((8080, 500)),
        }
    );
    assert_eq!(
        st.on_close(|| 9_999),
        AccelClose {
            removed: false,
            learn: None,
        }
    );
    // Skipped (short-lived port): not in the sockhash, still timed.
    let mut st = AccelSock::active(peer(), false, 1_000, 8080);
    assert_eq!(st.state, accel_state::SKIPPED);
    let c = st.on_close(|| 1_000 + ACCEL_SHORT_CONN_NS);
    assert_eq!(c.learn, Some((8080, ACCEL_SHORT_CONN_NS)));
    assert!(!c.removed);
    // A clock that went backwards reads as a long life (never skips).
    let mut st = AccelSock::active(peer(), true, 2_000, 8080);
    let (_, life) = st.on_close(|| 1_000).learn.unwrap();
    assert_eq!(accel_short_count_after(ACCEL_SHORT_SKIP_AFTER, life), 0);
    // Passive side: inserted from the start, nothing to learn.
    let mut st = AccelSock::passive(peer());
    assert_eq!((st.state, st.inserted), (accel_state::ON, 1));
    assert_eq!(
        st.on_close(|| unreachable!("an untimed socket reads no clock")),
        AccelClose {
            removed: true,
            learn: None,
        }
    );
}
