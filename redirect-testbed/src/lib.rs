//! Everything that exists to test, demo or benchmark redirect, kept out of
//! the product crate (`redirect-userspace`): the `redirect-kit` network
//! tools (sidecar proxy, echo server, client, stress and churn tools), the
//! demos (one pod; Bookinfo's four pods with HAProxy sidecars), the
//! eBPF-vs-iptables benchmark, the fuzz entry points and the
//! throwaway namespaces the tests run in. It depends on the product; the
//! product never depends on it.
pub mod bench;
pub mod bookinfo;
pub mod demo;
pub mod difftest;
pub mod fuzzing;
pub mod haproxy;
pub mod istio_rules;
pub mod kit;
pub mod sandbox;
