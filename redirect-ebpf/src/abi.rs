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
/// tcx verdicts: on to the next program (and the stack), or drop.
pub const TCX_NEXT: i32 = -1;
pub const TCX_DROP: i32 = 2;
/// Ethertypes (`skb->protocol`, network order on the wire).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// TCP header flags (byte 13).
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;
/// `bpf_l4_csum_replace` flag: the field is part of the pseudo-header.
pub const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `bpf_sk*_lookup_*`: look up in the netns of the packet's device.
pub const BPF_F_CURRENT_NETNS: u64 = u64::MAX;
