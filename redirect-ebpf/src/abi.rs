//! Kernel constants the aya bindings do not carry (uapi values).

/// sk_lookup and sk_msg verdicts.
pub const SK_PASS: u32 = 1;
pub const SK_DROP: u32 = 0;
/// The ifindex of `lo` in every netns.
pub const LOOPBACK_IFINDEX: u32 = 1;
/// `TCP_CLOSE` of the kernel's TCP states.
pub const TCP_CLOSE: u32 = 7;
/// sock_ops callbacks (`BPF_SOCK_OPS_*_CB`) and the flag asking for state
/// changes (`BPF_SOCK_OPS_STATE_CB_FLAG`).
pub const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
pub const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
pub const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
pub const BPF_SOCK_OPS_STATE_CB: u32 = 10;
pub const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
pub const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;
