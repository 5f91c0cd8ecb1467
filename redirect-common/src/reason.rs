//! Stable reason codes: one per rule/decision, used as counter keys.
//! A retired code is never reused.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    // Outbound (OUTPUT chain), one per new TCP connection.
    OutCaptured = 1,
    OutCapturedPort = 2,
    OutProxyToSelf = 3,
    OutExcludedPort = 4,
    OutPassthrough = 5,
    OutProxyUid = 6,
    OutProxyGid = 7,
    OutAppLocal = 8,
    OutLoopback = 9,
    OutExcludedCidr = 10,
    OutNotIncluded = 11,
    OutNotTcp = 12,
    OutExcludedInterface = 13,
    /// IPv6 while the pod's IPv6 is not captured (`flags::IPV6_OFF`).
    OutIpv6NotCaptured = 14,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`: the process's group is not listed.
    OutOwnerGroupNotIncluded = 17,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`: the process's group is listed.
    OutOwnerGroupExcluded = 18,
    // Original destination answers (SO_ORIGINAL_DST, getpeername).
    OrigDstOutbound = 20,
    OrigDstInbound = 21,
    OrigDstMissing = 22,
    PeerNameRewritten = 23,
    // Errors.
    ErrOrigMapFull = 30,
    ErrTupleMapFull = 31,
    ErrListenerMapFull = 32,
    ErrSockMapFull = 33,
    ErrLocalMapFull = 34,
    ErrVirtNatFull = 35,
    ErrSourceBind = 36,
    /// A trace event found the ring buffer full (the tracer read too
    /// slowly): dropped.
    ErrTraceLost = 37,
    // Inbound (PREROUTING chain), one per new TCP connection from outside.
    InCaptured = 40,
    InExcludedPort = 41,
    InNotIncluded = 42,
    InNoListener = 43,
    InTunnelPort = 44,
    InListenerRegistered = 45,
    InExcludedInterface = 46,
    // From a VM behind a `-k` interface (tc on that interface).
    InVirtCaptured = 47,
    InVirtNotIncluded = 48,
    InVirtDropped = 49,
    // Acceleration (sockops + sk_msg).
    AccelInserted = 50,
    AccelRedirected = 51,
    AccelFallback = 52,
    AccelBulk = 53,
    AccelSkippedShort = 54,
    AccelRemoved = 55,
    // DNS capture (ISTIO_OUTPUT_DNS): UDP datagrams (sendmsg) and connects
    // (connect, UDP and TCP) to port 53, and the replies the app reads.
    DnsCapturedUdp = 60,
    DnsCapturedTcp = 61,
    DnsNotNameserver = 62,
    DnsReplyRewritten = 63,
    // IPv6 not captured (`flags::IPV6_OFF`): inbound, and from a VM.
    InIpv6NotCaptured = 70,
    InVirtIpv6NotCaptured = 71,
}

/// The groups of `redirect stats`, in display order: the two iptables
/// chains istio-init fills (OUTPUT → ISTIO_OUTPUT, PREROUTING →
/// ISTIO_INBOUND), the PREROUTING rules of `-k` interfaces, the DNS chain
/// (ISTIO_OUTPUT_DNS), then ours. Which reasons a chain holds, and in
/// which order, is defined here and only here ([`Chain::reasons`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    Output,
    Prerouting,
    Vm,
    Dns,
    OrigDst,
    Accel,
    Errors,
}

impl Chain {
    pub const ALL: [Chain; 7] = [
        Chain::Output,
        Chain::Prerouting,
        Chain::Vm,
        Chain::Dns,
        Chain::OrigDst,
        Chain::Accel,
        Chain::Errors,
    ];

    /// Stable machine name (JSON `chain`, metrics label, `stats --chain`).
    pub const fn name(self) -> &'static str {
        match self {
            Chain::Output => "OUTPUT",
            Chain::Prerouting => "PREROUTING",
            Chain::Vm => "VM",
            Chain::Dns => "DNS",
            Chain::OrigDst => "ORIGINAL_DST",
            Chain::Accel => "ACCEL",
            Chain::Errors => "ERRORS",
        }
    }

    /// What the chain's rows count and which programs count them.
    pub const fn title(self) -> &'static str {
        match self {
            Chain::Output => "ISTIO_OUTPUT; cgroup/connect4, cgroup/connect6: new TCP connections made in the pod",
            Chain::Prerouting => "ISTIO_INBOUND; sk_lookup in the pod netns: new TCP connections from outside",
            Chain::Vm => "PREROUTING -i <-k interface> -j ISTIO_REDIRECT; tc on those interfaces: new TCP connections a VM opens",
            Chain::Dns => "ISTIO_OUTPUT_DNS; cgroup/sendmsg, connect: UDP datagrams and connects to port 53; cgroup/recvmsg: replies",
            Chain::OrigDst => "cgroup/getsockopt SO_ORIGINAL_DST, cgroup/getpeername: calls answered or not",
            Chain::Accel => "sockops + sk_msg between app and proxy: sockets, connections, sk_msg verdicts or messages",
            Chain::Errors => "map updates and helper calls that failed",
        }
    }

    /// The chain's rows, in the order of the rules they stand for.
    pub const fn reasons(self) -> &'static [Reason] {
        match self {
            Chain::Output => &[
                Reason::OutIpv6NotCaptured,
                Reason::OutExcludedInterface,
                Reason::OutExcludedPort,
                Reason::OutPassthrough,
                Reason::OutProxyToSelf,
                Reason::OutAppLocal,
                Reason::OutProxyUid,
                Reason::OutProxyGid,
                Reason::OutOwnerGroupNotIncluded,
                Reason::OutOwnerGroupExcluded,
                Reason::OutLoopback,
                Reason::OutExcludedCidr,
                Reason::OutCapturedPort,
                Reason::OutCaptured,
                Reason::OutNotIncluded,
                Reason::OutNotTcp,
            ],
            Chain::Prerouting => &[
                Reason::InIpv6NotCaptured,
                Reason::InExcludedInterface,
                Reason::InTunnelPort,
                Reason::InExcludedPort,
                Reason::InCaptured,
                Reason::InNotIncluded,
                Reason::InNoListener,
                Reason::InListenerRegistered,
            ],
            Chain::Vm => &[
                Reason::InVirtIpv6NotCaptured,
                Reason::InVirtCaptured,
                Reason::InVirtNotIncluded,
                Reason::InVirtDropped,
            ],
            Chain::Dns => &[
                Reason::DnsCapturedUdp,
                Reason::DnsCapturedTcp,
                Reason::DnsNotNameserver,
                Reason::DnsReplyRewritten,
            ],
            Chain::OrigDst => &[
                Reason::OrigDstOutbound,
                Reason::OrigDstInbound,
                Reason::OrigDstMissing,
                Reason::PeerNameRewritten,
            ],
            Chain::Accel => &[
                Reason::AccelInserted,
                Reason::AccelRemoved,
                Reason::AccelRedirected,
                Reason::AccelFallback,
                Reason::AccelBulk,
                Reason::AccelSkippedShort,
            ],
            Chain::Errors => &[
                Reason::ErrOrigMapFull,
                Reason::ErrTupleMapFull,
                Reason::ErrListenerMapFull,
                Reason::ErrSockMapFull,
                Reason::ErrLocalMapFull,
                Reason::ErrSourceBind,
                Reason::ErrVirtNatFull,
                Reason::ErrTraceLost,
            ],
        }
    }
}

impl Reason {
    pub const ALL: [Reason; 50] = [
        Reason::OutCaptured,
        Reason::OutCapturedPort,
        Reason::OutProxyToSelf,
        Reason::OutExcludedPort,
        Reason::OutPassthrough,
        Reason::OutProxyUid,
        Reason::OutProxyGid,
        Reason::OutAppLocal,
        Reason::OutLoopback,
        Reason::OutExcludedCidr,
        Reason::OutNotIncluded,
        Reason::OutNotTcp,
        Reason::OutExcludedInterface,
        Reason::OutOwnerGroupNotIncluded,
        Reason::OutOwnerGroupExcluded,
        Reason::OutIpv6NotCaptured,
        Reason::OrigDstOutbound,
        Reason::OrigDstInbound,
        Reason::OrigDstMissing,
        Reason::PeerNameRewritten,
        Reason::ErrOrigMapFull,
        Reason::ErrTupleMapFull,
        Reason::ErrListenerMapFull,
        Reason::ErrSockMapFull,
        Reason::ErrLocalMapFull,
        Reason::ErrSourceBind,
        Reason::ErrVirtNatFull,
        Reason::ErrTraceLost,
        Reason::InCaptured,
        Reason::InExcludedPort,
        Reason::InNotIncluded,
        Reason::InNoListener,
        Reason::InTunnelPort,
        Reason::InListenerRegistered,
        Reason::InExcludedInterface,
        Reason::InVirtCaptured,
        Reason::InVirtNotIncluded,
        Reason::InVirtDropped,
        Reason::AccelInserted,
        Reason::AccelRemoved,
        Reason::AccelRedirected,
        Reason::AccelFallback,
        Reason::AccelBulk,
        Reason::AccelSkippedShort,
        Reason::DnsCapturedUdp,
        Reason::DnsCapturedTcp,
        Reason::DnsNotNameserver,
        Reason::DnsReplyRewritten,
        Reason::InIpv6NotCaptured,
        Reason::InVirtIpv6NotCaptured,
    ];

    pub fn from_u32(v: u32) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| *r as u32 == v)
    }

    /// The chain whose [`Chain::reasons`] list this reason.
    pub const fn chain(self) -> Chain {
        let mut c = 0;
        while c < Chain::ALL.len() {
            let rs = Chain::ALL[c].reasons();
            let mut i = 0;
            while i < rs.len() {
                if rs[i] as u32 == self as u32 {
                    return Chain::ALL[c];
                }
                i += 1;
            }
            c += 1;
        }
        // Unreachable: `every_reason_is_in_one_chain` checks the lists.
        Chain::Errors
    }

    /// Does the row count bytes as well as connections? Redirected
    /// outbound connections get the bytes of both directions added when
    /// the app's socket closes; the sk_msg rows count the bytes of their
    /// verdicts or messages. Every other row counts connections or calls
    /// only.
    pub const fn counts_bytes(self) -> bool {
        matches!(
            self,
            Reason::OutCaptured
                | Reason::OutCapturedPort
                | Reason::OutProxyToSelf
                | Reason::DnsCapturedTcp
                | Reason::AccelRedirected
                | Reason::AccelFallback
                | Reason::AccelBulk
        )
    }

    /// iptables-style target: what happened to the connection.
    pub const fn target(self) -> &'static str {
        match self {
            Reason::OutCaptured | Reason::OutCapturedPort => "REDIRECT",
            Reason::OutProxyToSelf | Reason::InCaptured | Reason::InVirtCaptured => "REDIRECT",
            Reason::DnsCapturedUdp | Reason::DnsCapturedTcp => "REDIRECT",
            Reason::DnsReplyRewritten => "ANSWER",
            Reason::InNoListener | Reason::ErrOrigMapFull => "REJECT",
            Reason::InVirtDropped | Reason::ErrVirtNatFull => "DROP",
            Reason::OrigDstOutbound | Reason::OrigDstInbound | Reason::PeerNameRewritten => {
                "ANSWER"
            }
            Reason::OrigDstMissing => "MISSING",
            Reason::InListenerRegistered => "LISTEN",
            Reason::ErrTupleMapFull
            | Reason::ErrListenerMapFull
            | Reason::ErrSockMapFull
            | Reason::ErrLocalMapFull
            | Reason::ErrSourceBind
            | Reason::ErrTraceLost => "ERROR",
            Reason::AccelInserted => "SOCKMAP",
            Reason::AccelRedirected => "REDIRECT",
            Reason::AccelFallback => "PASS",
            Reason::AccelBulk => "PASS",
            Reason::AccelSkippedShort => "RETURN",
            Reason::AccelRemoved => "SOCKMAP",
            _ => "RETURN",
        }
    }

    /// Stable machine name (JSON output, metrics labels).
    pub const fn name(self) -> &'static str {
        match self {
            Reason::OutCaptured => "captured",
            Reason::OutCapturedPort => "captured_include_port",
            Reason::OutProxyToSelf => "proxy_to_self_inbound",
            Reason::OutExcludedPort => "skip_excluded_port",
            Reason::OutPassthrough => "skip_passthrough_127_0_0_6",
            Reason::OutProxyUid => "skip_proxy_uid",
            Reason::OutProxyGid => "skip_proxy_gid",
            Reason::OutAppLocal => "skip_app_to_local",
            Reason::OutLoopback => "skip_loopback",
            Reason::OutExcludedCidr => "skip_excluded_cidr",
            Reason::OutNotIncluded => "skip_not_included",
            Reason::OutNotTcp => "skip_not_tcp",
            Reason::OutExcludedInterface => "skip_excluded_interface",
            Reason::OutOwnerGroupNotIncluded => "skip_owner_group_not_included",
            Reason::OutOwnerGroupExcluded => "skip_owner_group_excluded",
            Reason::OutIpv6NotCaptured => "skip_ipv6_not_captured",
            Reason::DnsCapturedUdp => "captured_udp",
            Reason::DnsCapturedTcp => "captured_tcp",
            Reason::DnsNotNameserver => "skip_not_nameserver",
            Reason::DnsReplyRewritten => "reply_from_nameserver",
            Reason::OrigDstOutbound => "orig_dst_outbound",
            Reason::OrigDstInbound => "orig_dst_inbound",
            Reason::OrigDstMissing => "orig_dst_missing",
            Reason::PeerNameRewritten => "getpeername_rewritten",
            Reason::ErrOrigMapFull => "error_orig_map_full",
            Reason::ErrTupleMapFull => "error_tuple_map_full",
            Reason::ErrListenerMapFull => "error_listener_map_full",
            Reason::ErrSockMapFull => "error_sockmap_update",
            Reason::ErrLocalMapFull => "error_local_map_full",
            Reason::ErrSourceBind => "error_source_bind",
            Reason::ErrVirtNatFull => "error_vm_tuple_map_full",
            Reason::ErrTraceLost => "trace_events_lost",
            Reason::AccelInserted => "sockets_inserted",
            Reason::AccelRedirected => "messages_redirected",
            Reason::AccelFallback => "messages_fallback",
            Reason::AccelBulk => "messages_bulk",
            Reason::AccelSkippedShort => "connections_short_skipped",
            Reason::AccelRemoved => "sockets_removed",
            Reason::InCaptured => "captured",
            Reason::InExcludedPort => "skip_excluded_port",
            Reason::InNotIncluded => "skip_not_included",
            Reason::InNoListener => "no_listener",
            Reason::InTunnelPort => "skip_tunnel_port",
            Reason::InListenerRegistered => "listener_registered",
            Reason::InExcludedInterface => "skip_excluded_interface",
            Reason::InVirtCaptured => "captured",
            Reason::InVirtNotIncluded => "skip_not_included",
            Reason::InVirtDropped => "dropped",
            Reason::InIpv6NotCaptured => "skip_ipv6_not_captured",
            Reason::InVirtIpv6NotCaptured => "skip_ipv6_not_captured",
        }
    }

    /// Human description, the iptables rule it stands for.
    pub const fn describe(self) -> &'static str {
        match self {
            Reason::OutCaptured => "captured -> outbound port (-i)",
            Reason::OutCapturedPort => "captured -> outbound port (-q port)",
            Reason::OutProxyToSelf => {
                "proxy to own non-127.0.0.1 address -> inbound port (rules 2/5)"
            }
            Reason::OutExcludedPort => "excluded port (-o)",
            Reason::OutPassthrough => "source 127.0.0.6/::6 via lo (rule 1)",
            Reason::OutProxyUid => "proxy uid (rule 4)",
            Reason::OutProxyGid => "proxy gid (rule 7)",
            Reason::OutAppLocal => "app to local address via lo (rules 3/6)",
            Reason::OutLoopback => "destination 127.0.0.1/::1 (rule 8)",
            Reason::OutExcludedCidr => "excluded CIDR (-x)",
            Reason::OutNotIncluded => "not included (-i)",
            Reason::OutNotTcp => "not TCP (nor UDP port 53 with --redirect-dns)",
            Reason::OutOwnerGroupNotIncluded => "owner group not in ISTIO_OUTBOUND_OWNER_GROUPS",
            Reason::OutOwnerGroupExcluded => "owner group in ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            Reason::OutExcludedInterface => "routed out of an excluded interface (-c)",
            Reason::OutIpv6NotCaptured => IPV6_NOT_CAPTURED,
            Reason::DnsCapturedUdp => {
                "UDP to a nameserver -> DNS proxy :15053 (per datagram or connect)"
            }
            Reason::DnsCapturedTcp => "TCP to a nameserver -> DNS proxy :15053",
            Reason::DnsNotNameserver => "UDP port 53 to another address (not captured)",
            Reason::DnsReplyRewritten => "reply read as from the nameserver asked (recvmsg)",
            Reason::OrigDstOutbound => "SO_ORIGINAL_DST answered (outbound)",
            Reason::OrigDstInbound => "SO_ORIGINAL_DST answered (inbound)",
            Reason::OrigDstMissing => "SO_ORIGINAL_DST asked, no record",
            Reason::PeerNameRewritten => "getpeername shows original peer",
            Reason::ErrOrigMapFull => "original-destination map full (connect refused, EPERM)",
            Reason::ErrTupleMapFull => "tuple map full (proxy gets no SO_ORIGINAL_DST)",
            Reason::ErrListenerMapFull => "listener map update failed",
            Reason::ErrSockMapFull => "acceleration sockhash update failed (normal path used)",
            Reason::ErrLocalMapFull => {
                "local IPv6 connection map full (local sources trusted until room)"
            }
            Reason::ErrSourceBind => {
                "pod source address not bound (the proxy sees a loopback source)"
            }
            Reason::ErrVirtNatFull => "tuple map full (a VM's connection dropped, the VM retries)",
            Reason::ErrTraceLost => {
                "trace events lost (ring buffer full: the tracer read too slowly)"
            }
            Reason::AccelInserted => "app/proxy sockets put in the sockhash",
            Reason::AccelRedirected => {
                "sent straight to the peer socket (sk_msg verdicts, each for up to 16 KiB)"
            }
            Reason::AccelFallback => "messages on the normal path (peer not accelerated)",
            Reason::AccelBulk => "messages on the normal path after a bulk message (≥ 64 KiB)",
            Reason::AccelSkippedShort => {
                "connections not accelerated: their port's last 4 connections lived < 10 ms"
            }
            Reason::AccelRemoved => "app/proxy sockets out of the sockhash again (closed)",
            Reason::InCaptured => "captured -> inbound port",
            Reason::InExcludedPort => "excluded port (-d)",
            Reason::InNotIncluded => "not included (-b)",
            Reason::InNoListener => "no listener on inbound port (refused)",
            Reason::InTunnelPort => "inbound tunnel port (-e)",
            Reason::InListenerRegistered => "proxy listener registered",
            Reason::InExcludedInterface => "arrived on an excluded interface (-c)",
            Reason::InVirtCaptured => "captured -> outbound port (-k)",
            Reason::InVirtNotIncluded => "not included (-i)",
            Reason::InVirtDropped => {
                "dropped: no listener on the outbound port, or no address on the interface"
            }
            Reason::InIpv6NotCaptured | Reason::InVirtIpv6NotCaptured => IPV6_NOT_CAPTURED,
        }
    }
}

/// The three IPv6 rows' description.
const IPV6_NOT_CAPTURED: &str = "IPv6, not captured (first address is IPv4; no --dual-stack)";

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_in_one_chain() {
        for r in Reason::ALL {
            let holders: Vec<Chain> = Chain::ALL
                .into_iter()
                .filter(|c| c.reasons().contains(&r))
                .collect();
            assert_eq!(holders, vec![r.chain()], "{r:?}");
            assert_eq!(Reason::from_u32(r as u32), Some(r));
        }
        let listed: usize = Chain::ALL.iter().map(|c| c.reasons().len()).sum();
        assert_eq!(listed, Reason::ALL.len());
    }
}
