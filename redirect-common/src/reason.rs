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
    // Inbound (PREROUTING chain), one per new TCP connection from outside.
    InCaptured = 40,
    InExcludedPort = 41,
    InNotIncluded = 42,
    InNoListener = 43,
    InTunnelPort = 44,
    InListenerRegistered = 45,
    // Acceleration (sockops + sk_msg).
    AccelInserted = 50,
    AccelRedirected = 51,
    AccelFallback = 52,
    AccelBulk = 53,
    AccelSkippedShort = 54,
    AccelRemoved = 55,
}

/// Which chain a reason belongs to, for the `redirect stats` layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    Output,
    Prerouting,
    OrigDst,
    Accel,
    Errors,
}

impl Reason {
    pub const ALL: [Reason; 32] = [
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
        Reason::OrigDstOutbound,
        Reason::OrigDstInbound,
        Reason::OrigDstMissing,
        Reason::PeerNameRewritten,
        Reason::ErrOrigMapFull,
        Reason::ErrTupleMapFull,
        Reason::ErrListenerMapFull,
        Reason::ErrSockMapFull,
        Reason::InCaptured,
        Reason::InExcludedPort,
        Reason::InNotIncluded,
        Reason::InNoListener,
        Reason::InTunnelPort,
        Reason::InListenerRegistered,
        Reason::AccelInserted,
        Reason::AccelRemoved,
        Reason::AccelRedirected,
        Reason::AccelFallback,
        Reason::AccelBulk,
        Reason::AccelSkippedShort,
    ];

    pub fn from_u32(v: u32) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| *r as u32 == v)
    }

    pub const fn chain(self) -> Chain {
        match self as u32 {
            1..=12 => Chain::Output,
            20..=23 => Chain::OrigDst,
            30..=39 => Chain::Errors,
            50..=59 => Chain::Accel,
            _ => Chain::Prerouting,
        }
    }

    /// iptables-style target: what happened to the connection.
    pub const fn target(self) -> &'static str {
        match self {
            Reason::OutCaptured | Reason::OutCapturedPort => "REDIRECT",
            Reason::OutProxyToSelf | Reason::InCaptured => "REDIRECT",
            Reason::InNoListener | Reason::ErrOrigMapFull => "REJECT",
            Reason::OrigDstOutbound | Reason::OrigDstInbound | Reason::PeerNameRewritten => {
                "ANSWER"
            }
            Reason::OrigDstMissing => "MISSING",
            Reason::InListenerRegistered => "LISTEN",
            Reason::ErrTupleMapFull | Reason::ErrListenerMapFull | Reason::ErrSockMapFull => {
                "ERROR"
            }
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
            Reason::OrigDstOutbound => "orig_dst_outbound",
            Reason::OrigDstInbound => "orig_dst_inbound",
            Reason::OrigDstMissing => "orig_dst_missing",
            Reason::PeerNameRewritten => "getpeername_rewritten",
            Reason::ErrOrigMapFull => "error_orig_map_full",
            Reason::ErrTupleMapFull => "error_tuple_map_full",
            Reason::ErrListenerMapFull => "error_listener_map_full",
            Reason::ErrSockMapFull => "error_sockmap_update",
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
            Reason::OutNotTcp => "not TCP",
            Reason::OrigDstOutbound => "SO_ORIGINAL_DST answered (outbound)",
            Reason::OrigDstInbound => "SO_ORIGINAL_DST answered (inbound)",
            Reason::OrigDstMissing => "SO_ORIGINAL_DST asked, no record",
            Reason::PeerNameRewritten => "getpeername shows original peer",
            Reason::ErrOrigMapFull => "original-destination map full (connect refused, EPERM)",
            Reason::ErrTupleMapFull => "tuple map full (proxy gets no SO_ORIGINAL_DST)",
            Reason::ErrListenerMapFull => "listener map update failed",
            Reason::ErrSockMapFull => "acceleration sockhash update failed (normal path used)",
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
            Reason::InExcludedPort => "excluded port (-d; ssh 22 with -b *)",
            Reason::InNotIncluded => "not included (-b)",
            Reason::InNoListener => "no listener on inbound port (refused)",
            Reason::InTunnelPort => "inbound tunnel port (-e)",
            Reason::InListenerRegistered => "proxy listener registered",
        }
    }
}
